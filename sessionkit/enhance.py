"""enhance_storage(): migrations and expiry for any storage, in grammY's envelope.

A value is stored as ``{"__d": data, "v": version, "e": expiry}``: ``v`` only
with migrations, ``e`` (integer milliseconds since the epoch) only with a
``ttl``.  This is the stored form of grammY's ``enhanceStorage``, so a store
can be shared with a grammY bot in either direction.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator, Mapping

from ._locks import shared_key_locks
from .storage.base import StorageAdapter, ttl_seconds

__all__ = ["enhance_storage", "EnhancedStorage"]

Migration = Callable[[Any], Any]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and "__d" in value


class EnhancedStorage:
    """A storage that wraps another one with migrations and/or expiry.

    It is itself a storage: it keeps the inner storage's ``has``, ``keys``,
    ``values``, ``items``, ``lock`` and ``close`` (listings hide expired
    entries).  Build it with :func:`enhance_storage`.
    """

    def __init__(
        self,
        storage: StorageAdapter,
        migrations: Mapping[int | float, Migration] | None = None,
        ttl: float | timedelta | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self._clock = clock
        ttl_s = ttl_seconds(ttl)
        self._ttl_ms = None if ttl_s is None else ttl_s * 1000.0
        self._versions: list[int | float] = []
        self._migrations: dict[int | float, Migration] = {}
        if migrations is not None:
            if not isinstance(migrations, Mapping):
                raise TypeError(
                    "migrations must be a mapping of version -> function, e.g. {1: upgrade}, "
                    f"not {type(migrations).__name__}"
                )
            if not migrations:
                raise ValueError("migrations is empty: give at least one {version: function}")
            for version, fn in migrations.items():
                if not _is_number(version):
                    raise TypeError(f"migration versions are numbers, not {version!r}")
                if not callable(fn):
                    raise TypeError(f"migration {version!r} is not callable")
            self._migrations = dict(migrations)
            self._versions = sorted(self._migrations)

    def __repr__(self) -> str:
        return (
            f"EnhancedStorage({self.storage!r}, versions={self._versions}, "
            f"ttl_ms={self._ttl_ms})"
        )

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def _envelope(self, data: Any) -> dict[str, Any]:
        env: dict[str, Any] = {"__d": data}
        if self._versions:
            env["v"] = self._versions[-1]
        if self._ttl_ms is not None:
            env["e"] = int(self._now_ms() + self._ttl_ms)
        return env

    def _expired(self, env: dict[str, Any]) -> bool:
        expiry: Any = env.get("e")
        return self._ttl_ms is not None and _is_number(expiry) and expiry < self._now_ms()

    def _migrate(self, env: dict[str, Any]) -> Any:
        data = env["__d"]
        if not self._versions:
            return data
        current: Any = env.get("v")
        for version in self._versions:
            if not _is_number(current) or version > current:
                data = self._migrations[version](data)
        return data

    def _open(self, stored: Any) -> dict[str, Any] | None:
        if stored is None:
            return None
        return stored if _is_envelope(stored) else {"__d": stored}

    # -- the StorageAdapter contract ----------------------------------------

    def read(self, key: str) -> Any | None:
        env = self._open(self.storage.read(key))
        if env is None:
            return None
        if self._ttl_ms is not None:
            if self._expired(env):
                self.storage.delete(key)
                return None
            if not _is_number(env.get("e")):
                # no expiry yet (bare or enveloped): give it one now
                env = dict(env)
                env["e"] = int(self._now_ms() + self._ttl_ms)
                self.storage.write(key, env)
        return self._migrate(env)

    def write(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("None is never stored; use delete() to remove a session")
        self.storage.write(key, self._envelope(value))

    def delete(self, key: str) -> None:
        self.storage.delete(key)

    def has(self, key: str) -> bool:
        env = self._open(self.storage.read(key))
        return env is not None and not self._expired(env)

    def items(self) -> Iterator[tuple[str, Any]]:
        live = []
        for key, stored in self.storage.items():  # type: ignore[attr-defined]
            env = self._open(stored)
            if env is not None and not self._expired(env):
                live.append((key, self._migrate(env)))
        return iter(live)

    def keys(self) -> Iterator[str]:
        if self._ttl_ms is None:
            return iter(list(self.storage.keys()))  # type: ignore[attr-defined]
        return iter([key for key, _ in self.items()])

    def values(self) -> Iterator[Any]:
        return iter([value for _, value in self.items()])

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]:
        lock = getattr(self.storage, "lock", None)
        if callable(lock):
            return lock(key, timeout)  # type: ignore[no-any-return]
        return shared_key_locks(self.storage).lock(key, timeout)

    def close(self) -> None:
        close = getattr(self.storage, "close", None)
        if callable(close):
            close()


def enhance_storage(
    storage: StorageAdapter,
    migrations: Mapping[int | float, Migration] | None = None,
    ttl: float | timedelta | None = None,
    clock: Callable[[], float] = time.time,
) -> EnhancedStorage:
    """Wrap ``storage`` with migrations and/or expiry, stored in grammY's envelope.

    ``migrations`` maps a version number to a function ``old -> new``; on read,
    every migration above the stored version runs in order (a value stored
    without an envelope is older than every version).  ``ttl`` (seconds or
    ``timedelta``) expires a value that long after its last write.
    """
    return EnhancedStorage(storage, migrations=migrations, ttl=ttl, clock=clock)
