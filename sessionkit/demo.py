"""A bot, simulated: many threads update per-chat sessions at once.

Run ``python -m sessionkit.demo`` to use memory, or
``python -m sessionkit.demo --dir ./demo-sessions`` to keep the sessions in a
directory (run it twice: the counts carry on from the first run).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
from collections import Counter
from typing import Sequence

from . import MemoryStorage, Sessions, StorageAdapter


def _storage(directory: str | None) -> StorageAdapter:
    if directory is None:
        return MemoryStorage()
    from .storage.msgpack_file import MsgpackFileStorage

    return MsgpackFileStorage(directory)


def run(directory: str | None, chats: int, threads: int, updates: int, seed: int = 1) -> bool:
    """Send ``threads * updates`` updates; True when no update was lost."""
    storage = _storage(directory)
    sessions = Sessions(storage, initial=dict)
    names = [f"chat-{i}" for i in range(chats)]
    before = {}
    for name in names:
        with sessions.open(name) as s:
            before[name] = s.get("count", 0)

    sent: Counter[str] = Counter()
    sent_lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        mine: Counter[str] = Counter()
        start.wait()
        for _ in range(updates):
            chat = rng.choice(names)
            with sessions.open(chat) as s:  # one update handler
                s["count"] = s.get("count", 0) + 1
                s.setdefault("seen_by", [])
                if n not in s["seen_by"]:
                    s["seen_by"].append(n)
            mine[chat] += 1
        with sent_lock:
            sent.update(mine)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    ok = True
    where = f"directory {directory}" if directory else "memory"
    print(f"{threads} threads sent {sum(sent.values())} updates to {chats} chats ({where})")
    print(f"{'chat':<10} {'before':>7} {'sent':>6} {'after':>6}")
    for name in names:
        with sessions.open(name) as s:
            after = s.get("count", 0)
        expected = before[name] + sent[name]
        ok &= after == expected
        mark = "" if after == expected else f"  LOST {expected - after}"
        print(f"{name:<10} {before[name]:>7} {sent[name]:>6} {after:>6}{mark}")
    print("no update was lost" if ok else "UPDATES WERE LOST")
    close = getattr(storage, "close", None)
    if close is not None:
        close()
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sessionkit.demo", description=__doc__)
    parser.add_argument("--dir", help="keep sessions in this directory (msgpack files)")
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--updates", type=int, default=2000, help="updates per thread")
    args = parser.parse_args(argv)
    return 0 if run(args.dir, args.chats, args.threads, args.updates) else 1


if __name__ == "__main__":
    sys.exit(main())
