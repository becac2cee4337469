"""Functions run in child processes (spawned, so they live in an importable module)."""

from __future__ import annotations

import os
import sys
from typing import Any

from sessionkit import MsgpackFileStorage, Sessions, ShelveStorage


def open_store(where: str) -> Any:
    """``shelve:<path>[:<dbm>]`` opens a ShelveStorage, ``redis:<url>|<prefix>`` or
    ``redis-cluster:<url>|<prefix>`` a RedisStorage, anything else a msgpack directory."""
    if where.startswith(("redis:", "redis-cluster:")):
        from sessionkit import RedisStorage

        kind, rest = where.split(":", 1)
        url, prefix = rest.rsplit("|", 1)
        return RedisStorage(url=url, cluster=kind == "redis-cluster", prefix=prefix, lock_expiry=2.0)
    if where.startswith("shelve:"):
        _, path, dbm = (where.split(":", 2) + [""])[:3]
        return ShelveStorage(path, dbm=dbm or None)
    return MsgpackFileStorage(where)


def increment(directory: str, key: str, times: int, start: Any = None) -> None:
    """Increment ``key``'s counter ``times`` times, each in its own session."""
    if start is not None:
        start.wait()
    storage = open_store(directory)
    sessions = Sessions(storage, initial=dict)
    for _ in range(times):
        with sessions.open(key) as s:
            s["n"] = s.get("n", 0) + 1
    storage.close()


def _increment_in_threads(where: str, times: int, threads: int, start: Any, key_of: Any) -> None:
    """``threads`` threads of this process each make ``times`` increments, the
    ``i``-th of thread ``t`` on ``key_of(t, i)``."""
    import threading

    if start is not None:
        start.wait()
    storage = open_store(where)
    sessions = Sessions(storage, initial=dict)

    def work(thread: int) -> None:
        for i in range(times):
            with sessions.open(key_of(thread, i)) as s:
                s["n"] = s.get("n", 0) + 1

    running = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    storage.close()


def increment_threads(where: str, key: str, times: int, threads: int, start: Any = None) -> None:
    """``threads`` threads of this process each increment ``key`` ``times`` times."""
    _increment_in_threads(where, times, threads, start, lambda thread, i: key)


def increment_own_keys(where: str, prefix: str, times: int, threads: int, start: Any = None) -> None:
    """``threads`` threads of this process each increment keys of their own
    (``<prefix>.<thread>.<0-3>``) ``times`` times in all, in turn."""
    _increment_in_threads(where, times, threads, start, lambda thread, i: f"{prefix}.{thread}.{i % 4}")


def write_forever(directory: str, key: str, size: int, ready: Any) -> None:
    """Write ever-new values of ``size`` bytes to ``key`` until killed; ``ready`` is set once the first is made."""
    storage = open_store(directory)
    sessions = Sessions(storage, initial=dict)
    n = 0
    while True:
        n += 1
        with sessions.open(key) as s:
            s["n"] = n
            s["blob"] = bytes([n % 251]) * size
        if n == 1:
            ready.set()


def hold(directory: str, key: str, held: Any, release: Any) -> None:
    """Hold ``key`` open until ``release`` is set."""
    storage = open_store(directory)
    with Sessions(storage).open(key):
        held.set()
        release.wait(30)
    storage.close()


if __name__ == "__main__":  # pragma: no cover - manual use
    increment(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    os._exit(0)
