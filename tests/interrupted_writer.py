"""A writer interrupted by ``KeyboardInterrupt`` every few dozen microseconds.

``python -m tests.interrupted_writer <directory> <seconds> [write|merge]``:
writes to a msgpack store while a ``SIGALRM`` timer raises
``KeyboardInterrupt`` 5 to 120 µs into each write, wherever the engine is
(locking, appending, indexing anew, opening files), for ``seconds``; with
``merge``, the writes go uninterrupted and the timer lands 20 to 1,500 µs
into a merge of the shard made in this thread after every 20 of them (as
``purge_expired()`` and an overdue writer make one).  Then it checks that
every write that returned reads back, and prints one JSON line: writes,
interrupts, errors other than the interrupt, wrong values, its open
descriptors before and after, and its slowest merge call.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time


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
    rng = random.Random(7)
    acked: dict[str, int] = {}
    writes = interrupts = 0
    slowest_merge = 0.0  # seconds: a merge waits for another's claim, never for a claim left behind
    errors: list[str] = []
    end = time.monotonic() + seconds
    merging = mode == "merge"
    while time.monotonic() < end and len(errors) < 5:
        writes += 1
        key = f"v{writes % 20}"
        try:
            armed[0] = True
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
            if not merging:
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
    storage.write("final", 1)
    wrong = {key: [storage.read(key), n] for key, n in acked.items() if (storage.read(key) or {}).get("n") != n}
    fds_after = len(os.listdir("/proc/self/fd"))
    storage.close()
    print(json.dumps({"writes": writes, "interrupts": interrupts, "errors": errors, "wrong": wrong,
                      "fds_before": fds_before, "fds_after": fds_after, "slowest_merge_s": slowest_merge}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:])
