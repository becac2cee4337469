"""A writer killed by tests/test_shelve_faults.py: random keys, sizes and deletes, each logged.

``python -m tests.shelf_writer <where> <seed> <log>``: before each write it
logs ``w <key> <n>`` (``-`` for a delete), after the write returns ``a <key>
<n>``, so the parent knows every acknowledged value and the one in flight.
"""

from __future__ import annotations

import os
import random
import sys

from tests.workers import open_store


def main(where: str, seed: int, log: str) -> None:
    rng = random.Random(seed)
    storage = open_store(where)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
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
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
