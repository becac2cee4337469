"""One benchmark cell (scenario x subject x size), run in a fresh process.

    python -m benchmarks.cell '{"scenario": "a", "subject": "msgpack", ...}'

Prints one line of JSON with the timings of every repetition.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import resource
import statistics
import struct
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
    "h": "1 process vs 2 processes strictly alternating, random keys after prefilling N sessions",
}
THREADS = 8
PROCESSES = 4
PREFILL_LIMIT_S = 60.0
OP_LIMIT_S = 0.05  # (h): slower than this per operation in one process, alternation is not timed
SYNC_HANDOFFS = 2000  # (h): the fewest hand-offs the no-op pass times (they take microseconds)


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
    if scenario == "h":
        if not cls.shared_by_processes:
            return {**result, "skipped": "in-process only"}
        return {**result, **run_alternating(name, workdir, size, ops, repeat, seconds)}

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


# -- (h) one process, then two strictly alternating ---------------------------------
#
# Two spawned workers share one prefilled store; the leader times passes
# over the same random keys:
#   solo  first, a warm-up and `repeat` passes by the leader alone, before the
#         follower has written anything (so no cache of the leader's is stale);
#   pair  then, each round, the leader does keys 0, 2, 4, ... and the follower
#         1, 3, 5, ..., handing a token back and forth through two pipes: each
#         operation starts after the other process's write, so every one of
#         them finds the store changed by the other process since it last
#         looked;
#   sync  right after each pair pass, the same hand-offs around a no-op: what
#         the token itself costs; its median is subtracted from the pair passes.
# µs/op for the pair is its wall time over the operations of both workers;
# each pass also records CPU time (the leader's, plus the follower's in the
# alternating passes), which other load on the machine disturbs far less,
# and the time spent inside the operations themselves (both workers'), which
# needs no hand-off subtracted: the cost per operation the store itself adds.

_GO, _NOOP, _RESET, _CPU, _QUIT = b"i", b"n", b"r", b"t", b"q"
_OK, _FAILED = b"k", b"e"
_SECONDS = struct.Struct("<dd")  # the follower's CPU seconds, and seconds inside its operations


def _noop(key: str) -> None:
    pass


def _dbm_of(subject: Subject) -> str | None:
    return getattr(getattr(subject, "storage", None), "dbm", None)


def _handoff(rfd: int, wfd: int, command: bytes) -> bytes:
    os.write(wfd, command)
    reply = os.read(rfd, 1)
    if not reply:
        raise RuntimeError("the other worker of (h) went away")
    return reply


def _follower_cpu(rfd: int, wfd: int) -> tuple[float, float]:
    """The follower's CPU seconds so far, and its seconds inside operations."""
    os.write(wfd, _CPU)
    raw = b""
    while len(raw) < _SECONDS.size:
        chunk = os.read(rfd, _SECONDS.size - len(raw))
        if not chunk:
            raise RuntimeError("the other worker of (h) went away")
        raw += chunk
    cpu, busy = _SECONDS.unpack(raw)
    return float(cpu), float(busy)


def _alternate_follower(name: str, workdir: str, keys: list[str], rx: Any, tx: Any, results: Any) -> None:
    rfd, wfd = rx.fileno(), tx.fileno()
    subject = ALL[name](workdir)
    subject.prepare([], prefilled=True)
    first = ""
    i = 1
    n = len(keys)
    busy = 0.0
    while True:
        command = os.read(rfd, 1)
        if command in (_QUIT, b""):
            break
        reply = _OK
        if command == _GO:
            began = time.perf_counter()
            try:
                subject.increment(keys[i % n])
            except Exception as exc:  # counted by the leader, shown once
                reply = _FAILED
                first = first or f"{type(exc).__name__}: {exc}"[:200]
            busy += time.perf_counter() - began
            i += 2
        elif command == _NOOP:
            _noop(keys[i % n])
        elif command == _RESET:
            i = 1
        elif command == _CPU:
            reply = _SECONDS.pack(time.process_time(), busy)
        os.write(wfd, reply)
    subject.close()
    results.put(("follower", {"first_error": first, "rss_mb": rss_mb()}))


def _alternate_leader(name: str, workdir: str, keys: list[str], ops: int, seconds: float, rounds: int,
                      size: int, rx: Any, tx: Any, results: Any) -> None:
    rfd, wfd = rx.fileno(), tx.fileno()
    subject = ALL[name](workdir)
    subject.prepare([], prefilled=True)
    n = min(len(keys), ops)
    out: dict[str, Any] = {"solo": [], "pair": [], "sync": [], "solo_cpu": [], "pair_cpu": [], "sync_cpu": [],
                           "solo_inop": [], "pair_inop": [],
                           "pair_ops": [], "errors": 0, "first_error": "", "increments": 0, "reached": 0,
                           "dbm": _dbm_of(subject)}

    def failed(exc: Exception) -> None:
        out["errors"] += 1
        out["first_error"] = out["first_error"] or f"{type(exc).__name__}: {exc}"[:200]

    def solo() -> tuple[float, float, int, float]:
        done = 0
        busy = 0.0
        cpu = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds
        for i in range(n):
            began = time.perf_counter()
            try:
                subject.increment(keys[i])
                done += 1
            except Exception as exc:
                failed(exc)
            busy += time.perf_counter() - began
            if time.perf_counter() > deadline:
                i += 1
                break
        else:
            i = n
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        out["reached"] = max(out["reached"], i)
        out["increments"] += done
        return elapsed, cpu, done, busy

    def alternate(fn: Any, command: bytes, n: int) -> tuple[float, float, int, float]:
        _handoff(rfd, wfd, _RESET)
        done = 0
        i = 0
        f_cpu, f_busy = _follower_cpu(rfd, wfd)
        cpu = -f_cpu - time.process_time()
        busy = -f_busy
        start = time.perf_counter()
        deadline = start + seconds
        while i < n:
            began = time.perf_counter()
            try:
                fn(keys[i % len(keys)])
                done += 1
            except Exception as exc:
                failed(exc)
            busy += time.perf_counter() - began
            if i + 1 < n:
                if _handoff(rfd, wfd, command) == _OK:
                    done += 1
                else:
                    out["errors"] += 1
            i += 2
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - start
        f_cpu, f_busy = _follower_cpu(rfd, wfd)
        cpu += time.process_time() + f_cpu  # both workers' CPU time
        busy += f_busy  # both workers' time inside operations
        if fn is not _noop:
            out["reached"] = max(out["reached"], min(i, n))
            out["increments"] += done
        return elapsed, cpu, done, busy

    try:
        for round_ in range(rounds):  # the first round of each kind is the warm-up
            solo_t, solo_c, solo_n, solo_b = solo()
            if round_ == 0 and solo_t / max(solo_n, 1) > OP_LIMIT_S:
                out["skipped"] = (f"{solo_t / max(solo_n, 1) * 1e3:,.0f} ms per operation in one process "
                                  f"at N = {size:,}: alternation not timed")
                break
            if round_:
                out["solo"].append(solo_t / max(solo_n, 1) * 1e6)
                out["solo_cpu"].append(solo_c / max(solo_n, 1) * 1e6)
                out["solo_inop"].append(solo_b / max(solo_n, 1) * 1e6)
        for round_ in range(rounds if "skipped" not in out else 0):
            pair_t, pair_c, pair_n, pair_b = alternate(subject.increment, _GO, n)
            sync_t, sync_c, sync_n, _ = alternate(_noop, _NOOP, max(n, SYNC_HANDOFFS))
            if round_:
                out["pair"].append(pair_t / max(pair_n, 1) * 1e6)
                out["sync"].append(sync_t / max(sync_n, 1) * 1e6)
                out["pair_cpu"].append(pair_c / max(pair_n, 1) * 1e6)
                out["sync_cpu"].append(sync_c / max(sync_n, 1) * 1e6)
                out["pair_ops"].append(pair_n)
                out["pair_inop"].append(pair_b / max(pair_n, 1) * 1e6)
    finally:
        try:
            os.write(wfd, _QUIT)
        except OSError:
            pass  # the follower is gone already; its exit code says why
    subject.close()
    out["rss_mb"] = rss_mb()
    results.put(("leader", out))


def _collect(procs: list[Any], results: Any, want: int, timeout: float) -> dict[str, Any]:
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < want:
        try:
            tag, data = results.get(timeout=0.5)
            got[tag] = data
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker of (h) exited with {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError("the workers of (h) timed out") from None
    return got


def run_alternating(name: str, workdir: str, size: int, ops: int, repeat: int, seconds: float) -> dict[str, Any]:
    """Scenario (h): µs/op of one process, of two strictly alternating, and of the hand-off alone."""
    skip = prefill(name, workdir, size, out_of_process=True)
    if skip:
        return {"skipped": skip}
    rng = random.Random(7)
    keys = [f"chat:{rng.randrange(size)}" for _ in range(max(ops, 2))]
    subject = ALL[name](workdir)
    initial = subject.read_count(keys[0])  # what prefill left in every session (0, or 1 for some)
    subject.close()
    ctx = multiprocessing.get_context("spawn")
    to_follower_r, to_follower_w = ctx.Pipe(duplex=False)
    to_leader_r, to_leader_w = ctx.Pipe(duplex=False)
    results = ctx.Queue()
    leader = ctx.Process(target=_alternate_leader, args=(
        name, workdir, keys, ops, seconds, repeat + 1, size, to_leader_r, to_follower_w, results))
    follower = ctx.Process(target=_alternate_follower, args=(
        name, workdir, keys, to_follower_r, to_leader_w, results))
    follower.start()
    leader.start()
    for end in (to_follower_r, to_follower_w, to_leader_r, to_leader_w):
        end.close()  # the workers hold them now: one's exit is the other's EOF
    try:
        got = _collect([leader, follower], results, 2, timeout=(repeat + 1) * (3 * seconds + 60) + 120)
    finally:
        for p in (leader, follower):
            p.join(30)
            if p.exitcode is None:
                p.kill()
                p.join()
    lead, follow = got["leader"], got["follower"]
    out: dict[str, Any] = {"dbm": lead["dbm"]} if lead["dbm"] else {}
    if "skipped" in lead:
        return {**out, "skipped": lead["skipped"]}
    subject = ALL[name](workdir)
    touched = set(keys[: lead["reached"]])
    counted = sum(subject.read_count(k) for k in touched) - initial * len(touched)
    subject.close()
    handoff = statistics.median(lead["sync"]) if lead["sync"] else 0.0  # short passes: one preemption shows
    net = [p - handoff for p in lead["pair"]]
    out.update(
        reps=len(net),
        ops_per_rep=lead["pair_ops"],
        us_per_op=net,  # two processes, the hand-off subtracted
        solo_us_per_op=lead["solo"],
        pair_us_per_op=lead["pair"],
        sync_us_per_op=lead["sync"],
        # CPU time (both workers' in the alternating passes): steadier than wall time on a busy machine
        solo_cpu_us_per_op=lead["solo_cpu"],
        pair_cpu_us_per_op=lead["pair_cpu"],
        sync_cpu_us_per_op=lead["sync_cpu"],
        solo_inop_us_per_op=lead["solo_inop"],
        pair_inop_us_per_op=lead["pair_inop"],
        errors=lead["errors"],
        first_error=lead["first_error"] or follow["first_error"],
        lost=lead["increments"] - counted,
        rss_mb=round(max(lead["rss_mb"], follow["rss_mb"]), 1),
        disk_bytes=disk_bytes(workdir),
    )
    return out


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
