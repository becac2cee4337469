"""A writer interrupted by ``KeyboardInterrupt`` every few dozen microseconds.

``python -m tests.interrupted_writer <directory> <seconds> [write|merge|claim]``:
writes to a msgpack store while a ``SIGALRM`` timer raises
``KeyboardInterrupt`` 5 to 120 µs into each write, wherever the engine is
(locking, appending, indexing anew, opening files), for ``seconds``; with
``merge``, the writes go uninterrupted and the timer lands 20 to 1,500 µs
into a merge of the shard made in this thread after every 20 of them (as
``purge_expired()`` and an overdue writer make one); with ``claim``, nothing is
written, and it lands 1 to 60 µs into every call, a merge with nothing to
merge (its claim and the shard's merge slot taken and let go), after which
the claim and the slot are checked.  Then it checks that
every write that returned reads back, and prints one JSON line: writes,
interrupts, errors other than the interrupt, wrong values, its open
descriptors before and after, its slowest merge call, and, once the
storm is over, whether its merge claim or the shard's merge slot was left
taken and whether a merge in another thread still ends in time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Callable


def main(directory: str, seconds: float, mode: str = "write") -> None:
    import resource

    from sessionkit import MsgpackFileStorage

    # An interrupt that lands between a file's opening and the line that
    # keeps its descriptor leaks that descriptor (about one interrupt in ten
    # here, where most land in system calls); tens of thousands of them must
    # not run out of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    storage = MsgpackFileStorage(directory)
    storage.write("warm", 1)
    fds_before = len(os.listdir("/proc/self/fd"))

    # Raises only while armed: a signal that arrived just before its timer
    # was stopped runs its handler at Python's next check, which may fall
    # outside the ``try`` below, and must do nothing there.
    armed = [False]

    def interrupt(*_: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    left = {"claim": 0, "slot": 0}  # claim mode: calls that left the claim or the merge slot taken
    slot_held = _slot_probe(directory, storage._shards[0].merge_slot)
    rng = random.Random(7)
    acked: dict[str, int] = {}
    writes = interrupts = 0
    slowest_merge = 0.0  # seconds: a merge waits for another's claim, never for a claim left behind
    errors: list[str] = []
    end = time.monotonic() + seconds
    merging = mode == "merge"
    claiming = mode == "claim"
    while time.monotonic() < end and len(errors) < 5:
        writes += 1
        key = f"v{writes % 20}"
        try:
            armed[0] = True
            if claiming:
                key = ""
                # a merge with nothing to merge: its claim and the shard's
                # merge slot taken and let go, where the timer lands
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 60e-6))
                    storage._shards[0].merge(0.0)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    armed[0] = False
                finally:
                    # checked after every call: this process's next merge takes
                    # and lets go of them again, hiding what one left taken
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    armed[0] = False
                    left["claim"] += bool(storage._shards[0].claims)
                    left["slot"] += slot_held()
                continue
            if merging and writes % 20 == 0:
                key = ""  # nothing in flight
                began = time.monotonic()
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(20e-6, 1500e-6))
                    storage._shards[0].merge(0.0, wait=True, force=True)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    armed[0] = False
                finally:
                    slowest_merge = max(slowest_merge, time.monotonic() - began)
                continue
            if mode == "write":
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(5e-6, 120e-6))
            storage.write(key, {"n": writes})
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
            acked[key] = writes
        except KeyboardInterrupt:
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
            interrupts += 1
            acked.pop(key, None)  # in flight: either value may be there
        except Exception as exc:  # noqa: BLE001 - reported to the test
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
            errors.append(repr(exc))
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    shard = storage._shards[0]
    claim_left = bool(shard.claims)  # this process's merge claim, left taken by an interrupt
    slot_free = _slot_comes_free(directory, shard.merge_slot)
    merged_after = _merges_in_time(shard)
    storage.write("final", 1)
    wrong = {key: [storage.read(key), n] for key, n in acked.items() if (storage.read(key) or {}).get("n") != n}
    fds_after = len(os.listdir("/proc/self/fd"))
    storage.close()
    print(json.dumps({"writes": writes, "interrupts": interrupts, "errors": errors, "wrong": wrong,
                      "fds_before": fds_before, "fds_after": fds_after, "slowest_merge_s": slowest_merge,
                      "claim_left": claim_left, "slot_free": slot_free, "merged_after": merged_after,
                      "left_taken": left}),
          flush=True)


def _slot_comes_free(directory: str, slot: int, seconds: float = 5.0) -> bool:
    """Whether the shard's merge slot can be locked through another open file
    description of the lock file (it conflicts with this process's own locks
    as another process's would) within ``seconds``: the neighbour's merges
    hold it a moment at a time, a lock this process left taken for ever."""
    import fcntl
    import struct

    probe = os.open(os.path.join(directory, "sessionkit.lock"), os.O_RDWR)
    try:
        end = time.monotonic() + seconds
        while True:
            try:
                fcntl.fcntl(probe, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, slot, 1, 0))  # F_OFD_SETLK
                return True
            except OSError:
                if time.monotonic() > end:
                    return False
                time.sleep(0.01)
    finally:
        os.close(probe)  # its lock goes with it


def _slot_probe(directory: str, slot: int) -> "Callable[[], bool]":
    """A check of whether the shard's merge slot is locked (by anyone: a
    lock of this process conflicts with another open file description's)."""
    import fcntl
    import struct

    probe = os.open(os.path.join(directory, "sessionkit.lock"), os.O_RDWR)
    ask = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, slot, 1, 0)

    def held() -> bool:
        answer = fcntl.fcntl(probe, 36, ask)  # F_OFD_GETLK
        return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK

    return held


def _merges_in_time(shard: object, seconds: float = 10.0) -> bool:
    """Whether a merge of the shard, in another thread, ends within ``seconds``."""
    import threading

    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(shard.merge(0.0, wait=True, force=True)), daemon=True)
    worker.start()
    worker.join(seconds)
    return done == [True]


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:])
