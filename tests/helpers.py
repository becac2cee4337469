"""Small real storages and clocks used by the tests (no mocks)."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

#: How long the stress tests run, as a share of their full length: the kill -9
#: loops' cycles and the soak's seconds.  The reruns under the other Pythons
#: (tests/test_other_pythons.py) set ``SESSIONKIT_STRESS=0.25``; the main run
#: keeps 1.
STRESS = float(os.environ.get("SESSIONKIT_STRESS") or 1.0)


def stressed(full: float, least: float = 1) -> float:
    """``full`` scaled by :data:`STRESS`, never under ``least``."""
    return max(least, full * STRESS)


class FakeClock:
    """A clock the test moves by hand, in seconds."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class RecordingStorage:
    """A plain dict storage that records every call, like grammY's spies.

    It has no ``lock``, so ``Sessions`` guards it with its own per-key lock.
    ``read`` hands out the stored object itself, as a naive user storage does.
    """

    def __init__(self, initial: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(initial or {})
        self.calls: list[tuple[str, ...]] = []

    def read(self, key: str) -> Any:
        self.calls.append(("read", key))
        return self.data.get(key)

    def write(self, key: str, value: Any) -> None:
        self.calls.append(("write", key, copy.deepcopy(value)))
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.data.pop(key, None)

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c[0] == op)

    def args(self, op: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == op]


class SlowStorage:
    """Wraps a storage and sleeps between steps, so a lost update shows every time.

    It forwards ``lock`` (when the inner storage has one) so the storage's own
    lock is what the test exercises; ``with_lock=False`` hides it.
    """

    def __init__(self, inner: Any, delay: float = 0.001, with_lock: bool = True) -> None:
        self.inner = inner
        self.delay = delay
        if with_lock and hasattr(inner, "lock"):
            self.lock = inner.lock

    def read(self, key: str) -> Any:
        value = self.inner.read(key)
        time.sleep(self.delay)
        return value

    def write(self, key: str, value: Any) -> None:
        time.sleep(self.delay)
        self.inner.write(key, value)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class NoLock:
    """A lock() that locks nothing: used to prove a race test can fail."""

    def __init__(self) -> None:
        self.entered = 0
        self._mutex = threading.Lock()

    def __call__(self, key: str, timeout: float | None = None) -> "NoLock":
        return self

    def __enter__(self) -> None:
        with self._mutex:
            self.entered += 1

    def __exit__(self, *exc: Any) -> None:
        return None


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real, tiny file system at ``where`` (root only; the test is skipped elsewhere)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def deleted_files_open(directory: str, pid: "int | str" = "self") -> list[str]:
    """The files under ``directory`` that process ``pid`` (this one by
    default) holds open though they were deleted or replaced (Linux /proc)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + os.sep) and target.endswith(" (deleted)"):
            found.append(target)
    return found


def refuses_a_value_of(storage: Any, length: int, key: str = "k") -> None:
    """``storage._raw_write(key, ...)`` of ``length`` bytes raises ``SerializationError`` ("at most"); the
    bytes are an anonymous mapping's address space, so no memory is touched."""
    import mmap

    from sessionkit import SerializationError

    huge = mmap.mmap(-1, length)
    try:
        with pytest.raises(SerializationError, match="at most"):
            storage._raw_write(key, huge)
    finally:
        huge.close()
