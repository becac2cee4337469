"""One benchmark cell (scenario x subject x size), run in a fresh process.

    python -m benchmarks.cell '{"scenario": "a", "subject": "msgpack", ...}'

Prints one line of JSON with the timings of every repetition.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import sys
import threading
import time
from typing import Any

from .subjects import ALL, Subject

SCENARIOS = {
    "a": "1 thread, 1 key",
    "b": "8 threads, same key",
    "c": "8 threads, 8 keys",
    "d": "4 processes, same key",
    "e": "1 thread, random keys after prefilling N sessions",
    "f": "read-only handler",
    "g": "lazy session never touched",
}
THREADS = 8
PROCESSES = 4
PREFILL_LIMIT_S = 60.0


def disk_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def rss_mb() -> float:
    """Peak RSS of this process.  VmHWM, not ru_maxrss: on Linux ru_maxrss
    survives fork and exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Counter:
    """Ops done and errors seen, across threads."""

    def __init__(self) -> None:
        self.ops = 0
        self.errors = 0
        self.first_error = ""
        self.lock = threading.Lock()

    def add(self, ops: int, errors: int, first: str) -> None:
        with self.lock:
            self.ops += ops
            self.errors += errors
            self.first_error = self.first_error or first


def loop(fn: Any, keys: list[str], ops: int, deadline: float, counter: Counter) -> None:
    start = time.perf_counter()
    done = errors = 0
    first = ""
    n = len(keys)
    every = 0  # look at the clock after the first operation, then every 16 if fast
    for i in range(ops):
        try:
            fn(keys[i % n])
            done += 1
        except Exception as exc:  # counted and shown, never hidden
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"[:200]
        if (i & every) == every:
            now = time.perf_counter()
            if now > deadline:
                break
            if i == 0 and now - start < 0.001:
                every = 15
    counter.add(done, errors, first)


def timed_threads(fn: Any, keysets: list[list[str]], ops: int, seconds: float) -> tuple[float, Counter]:
    counter = Counter()
    barrier = threading.Barrier(len(keysets) + 1)
    deadline = [0.0]

    def work(keys: list[str]) -> None:
        barrier.wait()
        loop(fn, keys, ops // len(keysets), deadline[0], counter)

    threads = [threading.Thread(target=work, args=(keys,)) for keys in keysets]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start, counter


def _process_worker(name: str, workdir: str, key: str, ops: int, seconds: float, rounds: int,
                    barrier: Any, results: Any) -> None:
    subject = ALL[name](workdir)
    for _ in range(rounds):
        counter = Counter()
        barrier.wait()
        loop(subject.increment, [key], ops, time.perf_counter() + seconds, counter)
        results.put((counter.ops, counter.errors, counter.first_error, rss_mb()))
        barrier.wait()
    subject.close()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    scenario, name, size = spec["scenario"], spec["subject"], spec.get("size") or 0
    ops, repeat, seconds, workdir = spec["ops"], spec["repeat"], spec["seconds"], spec["workdir"]
    result: dict[str, Any] = {"scenario": scenario, "subject": name, "size": size}
    cls: Any = ALL[name]
    result["name"] = cls.name
    result["group"] = cls.group
    if scenario == "d" and not cls.shared_by_processes:
        return {**result, "skipped": "in-process only"}
    if scenario == "g" and not cls.lazy_capable:
        return {**result, "skipped": "has no lazy session"}

    if scenario == "e":
        skip = prefill(name, workdir, size, cls.shared_by_processes)
        if skip:
            return {**result, "skipped": skip}
        subject: Subject = ALL[name](workdir) if cls.shared_by_processes else _PREFILLED[0]
        subject.prepare([], prefilled=True)
        rng = random.Random(7)
        # only the keys this cell uses: a list of all N would weigh on its RSS
        keysets = [[f"chat:{rng.randrange(size)}" for _ in range(ops)]]
    else:
        subject = ALL[name](workdir)
        if scenario == "c":
            keysets = [[f"chat:{i}"] for i in range(THREADS)]
        elif scenario == "b":
            keysets = [["chat:1"]] * THREADS
        else:
            keysets = [["chat:1"]]
        subject.prepare(sorted({k for ks in keysets for k in ks}), prefilled=False)

    fn = {"f": subject.read_count, "g": subject.lazy_untouched}.get(scenario, subject.increment)
    if scenario == "f":
        subject.increment("chat:1")

    times: list[float] = []
    done: list[int] = []
    errors = 0
    first_error = ""
    increments = 1 if scenario == "f" else 0
    if scenario == "d":
        times, done, errors, first_error, increments = run_processes(name, workdir, ops, seconds, repeat)
    else:
        warm, counter = timed_threads(fn, keysets, max(ops // 10, len(keysets)), seconds / 4)
        increments += counter.ops if fn == subject.increment else 0
        for _ in range(repeat):
            elapsed, counter = timed_threads(fn, keysets, ops, seconds)
            times.append(elapsed)
            done.append(counter.ops)
            errors += counter.errors
            first_error = first_error or counter.first_error
            if fn == subject.increment:
                increments += counter.ops
    lost = None
    if scenario in ("a", "b", "c", "d", "f"):
        counted = sum(subject.read_count(k) for k in {k for ks in keysets for k in ks})
        lost = increments - counted
    subject.close()
    us = [t / max(n, 1) * 1e6 for t, n in zip(times, done)]
    result.update(
        reps=len(us),
        ops_per_rep=done,
        us_per_op=us,
        errors=errors,
        first_error=first_error,
        lost=lost,
        rss_mb=round(max([rss_mb(), *_WORKER_RSS]), 1),
        disk_bytes=disk_bytes(workdir),
    )
    return result


def run_processes(name: str, workdir: str, ops: int, seconds: float, repeat: int) -> tuple[Any, ...]:
    ctx = multiprocessing.get_context("spawn")
    first = ALL[name](workdir)  # create the store once, before the workers race to
    first.prepare(["chat:1"], prefilled=False)
    first.close()
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    rounds = repeat + 1  # the first round is the warm-up
    procs = [
        ctx.Process(target=_process_worker, args=(name, workdir, "chat:1", ops // PROCESSES, seconds, rounds, barrier, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    times, done = [], []
    errors, first_error, increments = 0, "", 0
    for round_ in range(rounds):
        barrier.wait(120)
        start = time.perf_counter()
        barrier.wait(600)
        elapsed = time.perf_counter() - start
        got = [results.get(timeout=60) for _ in procs]
        total = sum(g[0] for g in got)
        increments += total
        errors += sum(g[1] for g in got)
        _WORKER_RSS.append(max(g[3] for g in got))
        first_error = first_error or next((g[2] for g in got if g[2]), "")
        if round_:
            times.append(elapsed)
            done.append(total)
    for p in procs:
        p.join(60)
    return times, done, errors, first_error, increments


_PREFILLED: list[Subject] = []
_WORKER_RSS: list[float] = []  # scenario d: the workers' peak RSS


def _keys(start: int, stop: int) -> list[str]:
    return [f"chat:{i}" for i in range(start, stop)]


def _prefill_child(name: str, workdir: str, start: int, stop: int) -> None:
    subject = ALL[name](workdir)
    subject.prefill(_keys(start, stop))
    subject.close()


def prefill(name: str, workdir: str, size: int, out_of_process: bool) -> str | None:
    """Store ``size`` sessions; a reason to skip if that would take over a minute.

    A sample of the writes is timed (not the set-up) and projected to all of
    them; where the store is on disk the rest is written by a child process,
    so the measuring process only opens the store afterwards.
    """
    subject = ALL[name](workdir)
    sample = min(size, 2000)
    start = time.perf_counter()
    subject.prefill(_keys(0, sample))
    projected = (time.perf_counter() - start) * size / max(sample, 1)
    if projected > PREFILL_LIMIT_S:
        subject.close()
        return f"prefill of {size:,} would take ~{projected:.0f} s"
    if not out_of_process:
        subject.prefill(_keys(sample, size))
        _PREFILLED.append(subject)
        return None
    subject.close()
    if sample < size:
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=_prefill_child, args=(name, workdir, sample, size))
        p.start()
        p.join(PREFILL_LIMIT_S * 2)
        if p.exitcode is None:
            p.kill()
            p.join()
            return f"prefill of {size:,} took over {PREFILL_LIMIT_S * 2:.0f} s"
        if p.exitcode != 0:
            return f"prefill failed (exit {p.exitcode})"
    # Write the prefill's dirty pages out now, so the kernel's writeback
    # does not stall the measured writes to the same pages.
    os.sync()
    return None


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
