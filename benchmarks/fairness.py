"""Lock fairness: how long a waiter waits to enter ``with sessions.open(key)`` on one contended key.

    python -m benchmarks.fairness [--seconds S] [--backends memory,msgpack,shelve,redis]
                                  [--think-us U] [--out DIR | --save]

Every waiter (a thread, in one process or in several) loops for ``S``
seconds over the same key: note the time, enter ``with sessions.open(key) as
s``, note the time again, add one to ``s["count"]``, leave the block, and
(with ``--think-us``) wait a little before asking again.  The *wait* of one
entry is the time between the two notes: the per-key lock (threads in the
process, then the store's lock across processes) and the read of the session.

Three contention shapes, on each backend that can run them:

``8 threads``
    one process, eight threads;
``4 processes``
    four processes of one thread each (disk backends and Redis);
``4 processes x 8 threads``
    thirty-two waiters, the worst case for a lock that lets whoever asks
    first after a release win.

For each shape the report gives the p50, p99 and maximum wait over all
entries, the entries per second, and the share of the fairest and least
fairly served waiter: each waiter's entries divided by the mean over all
waiters (1.0 is an exact fair share).  A waiter *starves* if it entered
fewer than 10% of the mean; the report counts them.  Finally the counter
is read back: it must equal the entries counted, or the lock let two
holders in at once.

The processes start together at a wall-clock instant, after each has opened
the store; every process is a fresh interpreter (``spawn``).  Redis runs on a
server the run starts on a free loopback port (persistence off), and is left
out, with a note, if ``redis-server`` is not installed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from .redis_bench import percentile

SAVED = Path(__file__).resolve().parent / "results" / "fairness"  # the committed run (--save)
BACKENDS = ("memory", "msgpack", "shelve", "redis")
SHAPES = {  # name: (processes, threads per process)
    "8 threads": (1, 8),
    "4 processes": (4, 1),
    "4 processes x 8 threads": (4, 8),
}
STARVED_SHARE = 0.10  # a waiter with fewer entries than this share of the mean starves
KEY = "contended"
START_AFTER_S = 1.0  # the processes open the store, then start together this long after the launch


def _storage(backend: str, where: str) -> Any:
    from sessionkit import MemoryStorage, MsgpackFileStorage, RedisStorage, ShelveStorage

    if backend == "memory":
        return MemoryStorage()
    if backend == "msgpack":
        return MsgpackFileStorage(os.path.join(where, "msgpack"))
    if backend == "shelve":
        return ShelveStorage(os.path.join(where, "shelf", "sessions"))
    if backend == "redis":
        import redis

        return RedisStorage(redis.Redis.from_url(where), prefix="fairness:")
    raise SystemExit(f"unknown backend {backend}")


def _waiters(backend: str, where: str, threads: int, start_at: float, seconds: float,
             think_s: float) -> dict[str, Any]:
    """Run ``threads`` waiters in this process; their waits (seconds) and entry counts."""
    from sessionkit import Sessions

    storage = _storage(backend, where)
    sessions = Sessions(storage, initial=dict)
    waits = [array("d") for _ in range(threads)]
    errors: list[str] = []
    stop_at = start_at + seconds

    def waiter(mine: Any) -> None:
        clock = time.perf_counter
        wall = time.time
        delay = start_at - wall()
        if delay > 0:
            time.sleep(delay)
        try:
            while wall() < stop_at:
                asked = clock()
                with sessions.open(KEY) as s:
                    mine.append(clock() - asked)
                    s["count"] = s.get("count", 0) + 1
                if think_s:
                    time.sleep(think_s)
        except Exception as exc:  # shown in the report; the run goes on
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    pool = [threading.Thread(target=waiter, args=(mine,)) for mine in waits]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    with sessions.open(KEY) as s:
        count = int(s.get("count", 0))
    storage.close()
    return {"waits": [list(w) for w in waits], "errors": errors, "count": count}


def _process_main(queue: Any, backend: str, where: str, threads: int, start_at: float, seconds: float,
                  think_s: float) -> None:
    try:
        queue.put(_waiters(backend, where, threads, start_at, seconds, think_s))
    except BaseException as exc:  # the parent reports it
        queue.put({"waits": [], "errors": [f"{type(exc).__name__}: {exc}"[:300]], "count": 0})


def measure(backend: str, where: str, processes: int, threads: int, seconds: float,
            think_s: float) -> dict[str, Any]:
    """One contention shape on one backend: every waiter's waits, summarised."""
    start_at = time.time() + START_AFTER_S + 0.5 * processes
    if processes == 1:
        parts = [_waiters(backend, where, threads, start_at, seconds, think_s)]
    else:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_process_main, args=(queue, backend, where, threads, start_at, seconds, think_s))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        parts = [queue.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(30)
    per_waiter = [w for part in parts for w in part["waits"]]
    entries = [len(w) for w in per_waiter]
    every = [x for w in per_waiter for x in w]
    mean = sum(entries) / len(entries) if entries else 0.0
    counted = max((part["count"] for part in parts), default=0)
    errors = [e for part in parts for e in part["errors"]]
    return {
        "backend": backend,
        "processes": processes,
        "threads": threads,
        "seconds": seconds,
        "entries": sum(entries),
        "per_s": sum(entries) / seconds,
        "p50_us": (percentile(every, 50) or 0.0) * 1e6,
        "p99_us": (percentile(every, 99) or 0.0) * 1e6,
        "max_ms": max(every, default=0.0) * 1e3,
        "waiters": len(entries),
        "min_share": min(entries) / mean if mean else 0.0,
        "max_share": max(entries) / mean if mean else 0.0,
        "starved": sum(1 for n in entries if n < STARVED_SHARE * mean),
        "counted": counted,
        "exact": counted == sum(entries),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def environment() -> dict[str, Any]:
    """Python, platform, CPUs and package versions."""
    import msgpack

    import sessionkit

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sessionkit": sessionkit.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }
    binary = shutil.which("redis-server")
    if binary:
        import subprocess

        env["redis_server"] = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return env


def markdown(results: dict[str, Any]) -> str:
    """The report: one row per backend and contention shape."""
    env = results["environment"]
    lines = [
        "# Lock fairness: one key, contending waiters",
        "",
        f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; sessionkit {env['sessionkit']}; "
        f"{results['seconds']:g} s per row; think time {results['think_us']:g} µs between a waiter's entries.",
        "",
        "*wait*: from asking to being inside the block (lock and read). *share*: a waiter's entries over the "
        f"mean (fairest / least fair); *starved*: waiters under {STARVED_SHARE:.0%} of the mean. "
        "*exact*: the counter read back equals the entries counted.",
        "",
        "| backend | waiters | entries/s | p50 wait µs | p99 wait µs | max wait ms | share min / max | starved "
        "| exact | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        shape = f"{row['processes']} proc x {row['threads']} threads" if row["processes"] > 1 else (
            f"{row['threads']} threads")
        lines.append(
            f"| {row['backend']} | {shape} | {row['per_s']:,.0f} | {row['p50_us']:,.0f} | {row['p99_us']:,.0f} "
            f"| {row['max_ms']:,.1f} | {row['min_share']:.2f} / {row['max_share']:.2f} | {row['starved']} "
            f"| {'yes' if row['exact'] else 'NO'} | {row['errors'] or ''}"
            f"{(' (' + row['first_error'] + ')') if row['first_error'] else ''} |"
        )
    for note in results["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fairness", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="how long each row's waiters run (default 5)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated ({','.join(BACKENDS)})")
    p.add_argument("--think-us", type=float, default=0.0,
                   help="microseconds a waiter sleeps between leaving the block and asking again (default 0)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder (default: a new scratch folder under the temporary directory)")
    where.add_argument("--save", action="store_true", help=f"write to {SAVED.relative_to(SAVED.parents[2])}/")
    args = p.parse_args(argv)
    unknown = [b for b in args.backends.split(",") if b and b not in BACKENDS]
    if unknown:
        p.error(f"unknown backends: {', '.join(unknown)}")
    return args


def run(backends: list[str], seconds: float, think_us: float) -> dict[str, Any]:
    """Every shape on every backend that can run it; Redis on a server of its own."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    server = None
    with tempfile.TemporaryDirectory(prefix="sessionkit-fairness-") as scratch:
        try:
            for backend in backends:
                where = scratch
                if backend == "redis":
                    if not shutil.which("redis-server"):
                        notes.append("redis: left out (no redis-server on PATH).")
                        continue
                    from tests.redis_servers import RedisServer  # the tests' own server runner

                    server = RedisServer(Path(scratch) / "redis", binary=shutil.which("redis-server"))
                    where = server.url
                for shape, (processes, threads) in SHAPES.items():
                    if backend == "memory" and processes > 1:
                        continue  # one process's memory
                    run_dir = os.path.join(scratch, f"{backend}-{processes}x{threads}")
                    os.makedirs(run_dir, exist_ok=True)
                    if backend == "redis":
                        import redis

                        redis.Redis.from_url(where).flushall()
                    else:
                        where = run_dir
                    print(f"  {backend}: {shape} ...", file=sys.stderr, flush=True)
                    rows.append(measure(backend, where, processes, threads, seconds, think_us / 1e6))
        finally:
            if server is not None:
                server.stop()
    return {"environment": environment(), "seconds": seconds, "think_us": think_us, "rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    backends = [b for b in args.backends.split(",") if b]
    results = run(backends, args.seconds, args.think_us)
    text = markdown(results)
    out = SAVED if args.save else Path(args.out or tempfile.mkdtemp(prefix="sessionkit-fairness-report-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.md").write_text(text)
    (out / "fairness.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"written to {out}", file=sys.stderr)
    bad = [r for r in results["rows"] if not r["exact"] or r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
