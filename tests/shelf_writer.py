"""A writer killed by the kill -9 loops: random keys, sizes and deletes, each logged.

``python -m tests.shelf_writer <where> <seed> <log> [merge-often]``: before
each write it logs ``w <key> <n>`` (``-`` for a delete), after the write
returns ``a <key> <n>``, so the parent knows every acknowledged value and the
one in flight.  ``merge-often`` (a msgpack store): its shards are merged
after 16 KiB of dead bytes instead of 1 MiB, and each merge made in this
process logs ``m+ <shard> 0`` when it starts and ``m- <shard> 0`` when it
ends, so the parent knows which kills landed inside a background merge (a
merge helper, ``SESSIONKIT_MERGES=process``, is started again at once after
the parent kills it).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

from tests.workers import open_store


def read_log(path: Path) -> tuple[dict[str, int | None], tuple[str, int | None] | None, bool]:
    """What a killed writer's log says: each key's last acknowledged value
    (None: deleted), the write in flight (or None), and whether it died inside
    a merge (``merge-often`` only)."""
    acked: dict[str, int | None] = {}
    pending: tuple[str, int | None] | None = None
    merging = 0
    # A kill can cut the writer's last ``os.write`` where it crosses a page
    # boundary ("a k3 24000388" becomes "a k3 2400"), so only lines that end
    # in a newline are whole; what follows the last newline is read below.
    *lines, tail = path.read_text().split("\n")
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue  # "ready"
        kind, key, n = parts
        if kind == "m+":
            merging += 1
        elif kind == "m-":
            merging -= 1
        elif kind == "w":
            pending = (key, None if n == "-" else int(n))
        elif kind == "a":
            acked[key] = None if n == "-" else int(n)
            pending = None
    if pending is not None and tail.startswith("a"):
        key, value = pending
        if f"a {key} {'-' if value is None else value}".startswith(tail):
            # The write in flight returned (its acknowledgement was being
            # logged): hold the store to it, not to the value before it.
            acked[key] = value
            pending = None
    return acked, pending, merging > 0


def merge_often(fd: int) -> None:
    from sessionkit.storage import _merge_helper, _shard

    _shard.SLACK = 16 << 10
    _merge_helper.RETRY_AFTER = 0.0  # a helper the parent killed is replaced at the next merge
    merge = _shard.Shard.merge

    def logged(self: Any, *args: Any, **kwargs: Any) -> bool:
        os.write(fd, f"m+ {self.number} 0\n".encode())
        try:
            return merge(self, *args, **kwargs)
        finally:
            os.write(fd, f"m- {self.number} 0\n".encode())

    _shard.Shard.merge = logged  # type: ignore[method-assign]


def main(where: str, seed: int, log: str, mode: str = "") -> None:
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if mode == "merge-often":
        merge_often(fd)
    storage = open_store(where)
    n = seed * 1_000_000
    os.write(fd, b"ready\n")
    while True:
        n += 1
        key = f"k{rng.randrange(12)}"
        if rng.random() < 0.1:
            os.write(fd, f"w {key} -\n".encode())
            storage.delete(key)
            os.write(fd, f"a {key} -\n".encode())
        else:
            size = rng.choice((10, 100, 500, 2000, 6000))
            os.write(fd, f"w {key} {n}\n".encode())
            storage.write(key, {"n": n, "blob": bytes([n % 251]) * size})
            os.write(fd, f"a {key} {n}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
