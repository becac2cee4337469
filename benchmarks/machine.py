"""What this machine allows: the ceilings that two of the engine's targets run into.

    python -m benchmarks.machine [--seconds S] [--repeat N] [--syncs N] [--dir DIR] [--out DIR | --save]

``cpu``
    A pure-Python loop with no I/O and nothing shared, run in 1, 2, 4 and 8
    processes at once; the work all of them did, divided by what 1 process did
    in the same repetition.  No store scales past this: the random-keys target
    of ``benchmarks.engine`` (2, 4 and 8 processes each at least 1.5x one) is
    measured against it, and on a shared machine it moves from run to run.

``cpu-10k``
    The same, but each round updates entries of a dict of 10,000 that each
    process builds for itself (``"chat:N"`` keys, as many as the engine's
    random-keys scenario has sessions), in a shuffled order: about a
    megabyte of memory of its own per process instead of a few cache lines.
    Past 2 processes on 2 CPUs, each process refills its caches whenever
    the scheduler switches it back in, so its rounds cost more CPU time.  It
    is a comparison, not a bound: a store's processes share their sessions
    in the page cache and a mapped index, and touch other memory besides.

``sync``
    One thread writes 150-byte records, each followed by ``os.fdatasync``:

    * ``append``: to the end of a new file, which grows at each write (the
      way sessionkit's msgpack log grows: its size is its end);
    * ``overwrite``: in place, over a file filled with zeros beforehand (the
      way SQLite reuses its WAL from the start after each checkpoint);
    * ``append-fstat`` and ``overwrite-fstat``: the same, with an
      ``os.fstat`` of the file before each write, as the engine makes (it
      checks that its log ends where its index says).  On Linux 6.13 and
      later, a file whose times were looked at gets a fresh fine-grained
      timestamp at its next write, and this machine syncs such a write as
      slowly as an append;
    * ``sqlite-full``: SQLite itself, WAL with ``synchronous=FULL``, one
      ``UPDATE`` of one row per ``BEGIN IMMEDIATE`` ... ``COMMIT`` (the
      durable SQLite subject of ``benchmarks.engine``, without msgpack),
      timed once its WAL has been checkpointed and is written over again,
      as in any store that has run for a while.

    The five take turns; each repetition gives each one's median latency.
    A durable read-modify-write of one key waits for one such sync, so an
    append that syncs slower than an overwrite bounds the durable one-key
    ratios against SQLite.

Results go to ``machine.md`` and ``machine.json`` in ``--out DIR``, or with
``--save`` in ``benchmarks/results/machine/``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .report import save_outputs

SAVED = Path(__file__).resolve().parent / "results" / "machine"  # the committed run (--save)
PROCESSES = (1, 2, 4, 8)
WORKING_SET = 10_000  # cpu-10k: entries of each process's dict (the random-keys scenario's sessions)
RECORD = b"r" * 150
SYNC_MODES = ("append", "overwrite", "append-fstat", "overwrite-fstat", "sqlite-full")
WAL_WRAP = 1500  # commits before the timed ones: SQLite checkpoints its WAL every 1,000 pages


# -- cpu ----------------------------------------------------------------------------------


def _spin(start_at: float, seconds: float, results: Any, entries: int = 0) -> None:
    """Count rounds of a small pure-Python computation from ``start_at`` for ``seconds``; with
    ``entries``, each round updates 1,000 random entries of a dict of that many, built beforehand."""
    table = {f"chat:{i}": 0 for i in range(entries)}
    order = list(table)
    random.Random(os.getpid()).shuffle(order)  # every entry in turn, in no order memory is laid out in
    chunks = [order[i : i + 1000] for i in range(0, entries, 1000)]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    stop = time.monotonic() + seconds
    rounds = acc = 0
    while time.monotonic() < stop:
        if entries:
            for name in chunks[rounds % len(chunks)]:
                table[name] += 1
        else:
            for i in range(1000):
                acc += i * i % 7
        rounds += 1
    results.put(rounds)


def cpu_work(processes: int, seconds: float, context: Any, entries: int = 0) -> int:
    """Rounds that ``processes`` processes, started together, counted in ``seconds`` (``entries``: see _spin)."""
    results = context.Queue()
    start_at = time.monotonic() + 0.5 + 0.05 * processes + entries * 2e-6  # every process is up before the start
    workers = [context.Process(target=_spin, args=(start_at, seconds, results, entries)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=60 + seconds) for _ in workers)
    for worker in workers:
        worker.join(30)
    return total


# -- sync ---------------------------------------------------------------------------------


def _latencies_file(path: str, count: int, filled: bool, stat: bool = False) -> tuple[list[float], bool]:
    """Write ``count`` records one after another, each synced; ``filled``: over a file of zeros made beforehand;
    ``stat``: an ``os.fstat`` of the file before each write.  Also says whether the file ends up the size it
    should (grown by each record, or unchanged)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = count * len(RECORD) + 4096 if filled else 0
        if filled:
            os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
        took = []
        for i in range(count):
            t0 = time.perf_counter()
            if stat:
                os.fstat(fd)
            os.pwrite(fd, RECORD, i * len(RECORD))
            os.fdatasync(fd)
            took.append(time.perf_counter() - t0)
        right_size = os.fstat(fd).st_size == (size if filled else count * len(RECORD))
    finally:
        os.close(fd)
        os.unlink(path)
    return took, right_size


def _latencies_sqlite(path: str, count: int) -> tuple[list[float], bool]:
    cx = sqlite3.connect(path, isolation_level=None)
    try:
        cx.execute("PRAGMA journal_mode=WAL")
        cx.execute("PRAGMA synchronous=FULL")
        cx.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
        cx.execute("INSERT INTO t VALUES ('k', ?)", (RECORD,))
        for i in range(WAL_WRAP):  # past the first checkpoints: the WAL is written over from its start
            # (each value differs: SQLite writes no page for an UPDATE that changes no byte)
            cx.execute("UPDATE t SET v = ? WHERE k = 'k'", (RECORD[:-8] + (i + 1 << 32).to_bytes(8, "big"),))
        took = []
        for i in range(count):
            t0 = time.perf_counter()
            cx.execute("BEGIN IMMEDIATE")
            cx.execute("UPDATE t SET v = ? WHERE k = 'k'", (RECORD[:-8] + i.to_bytes(8, "big"),))
            cx.execute("COMMIT")
            took.append(time.perf_counter() - t0)
        stored = cx.execute("SELECT v FROM t WHERE k = 'k'").fetchone()[0]
        ok = stored[-8:] == (count - 1).to_bytes(8, "big")
    finally:
        cx.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    return took, ok


SYNCS: dict[str, Callable[[str, int], tuple[list[float], bool]]] = {
    "append": partial(_latencies_file, filled=False),
    "overwrite": partial(_latencies_file, filled=True),
    "append-fstat": partial(_latencies_file, filled=False, stat=True),
    "overwrite-fstat": partial(_latencies_file, filled=True, stat=True),
    "sqlite-full": _latencies_sqlite,
}


# -- the run ------------------------------------------------------------------------------


def run(seconds: float, repeat: int, syncs: int, directory: str | None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    scaling: dict[str, list[float]] = {str(n): [] for n in PROCESSES}
    scaling_10k: dict[str, list[float]] = {str(n): [] for n in PROCESSES}
    sync_us: dict[str, list[float]] = {mode: [] for mode in SYNC_MODES}
    checks: dict[str, bool] = {mode: True for mode in SYNC_MODES}
    workdir = tempfile.mkdtemp(prefix="sessionkit-machine-", dir=directory)
    try:
        for j in range(repeat):
            one = cpu_work(1, seconds, context)
            for n in PROCESSES:
                scaling[str(n)].append(1.0 if n == 1 else cpu_work(n, seconds, context) / max(one, 1))
            one = cpu_work(1, seconds, context, WORKING_SET)
            for n in PROCESSES:
                scaling_10k[str(n)].append(1.0 if n == 1 else cpu_work(n, seconds, context, WORKING_SET) / max(one, 1))
            for k in range(len(SYNC_MODES)):
                mode = SYNC_MODES[(j + k) % len(SYNC_MODES)]  # taking turns
                took, ok = SYNCS[mode](os.path.join(workdir, f"sync-{mode}"), syncs)
                sync_us[mode].append(statistics.median(took) * 1e6)
                checks[mode] = checks[mode] and ok
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cpu, cpu_10k = (
        {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "each": v} for n, v in runs.items()}
        for runs in (scaling, scaling_10k)
    )
    sync = {
        mode: {"median_us": statistics.median(v), "min_us": min(v), "max_us": max(v), "each_us": v}
        for mode, v in sync_us.items()
    }
    # per repetition: each kind's latency over a plain overwrite's
    ratios = {
        f"{mode}_over_overwrite": statistics.median(a / b for a, b in zip(sync_us[mode], sync_us["overwrite"]))
        for mode in SYNC_MODES
        if mode != "overwrite"
    }
    return {"seconds": seconds, "repeat": repeat, "syncs": syncs, "cpu_scaling": cpu,
            "cpu_scaling_working_set": cpu_10k, "working_set_entries": WORKING_SET, "sync": sync,
            "sync_ratios": ratios, "sync_checks": checks, "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(), "system": platform.system(),
            "kernel": platform.release()}


def report(result: dict[str, Any]) -> str:
    cpu, sync, ratios = result["cpu_scaling"], result["sync"], result["sync_ratios"]
    out = [
        "# What this machine allows",
        "",
        f"{result['system']} {result['kernel']}, Python {result['python']}, SQLite {result['sqlite']}, "
        f"{result['cpus']} CPUs; {result['repeat']} "
        f"repetitions. See `benchmarks/machine.py`.",
        "",
        f"## CPU: a pure-Python loop in N processes at once, ÷ 1 process ({result['seconds']} s each)",
        "",
        "| processes | median | lowest | highest |",
        "|---:|---:|---:|---:|",
    ]
    for n, row in cpu.items():
        out.append(f"| {n} | {row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} |")
    out += [
        "",
        f"## CPU with a working set: the loop updates a dict of {result['working_set_entries']:,} entries "
        "per process, ÷ 1 process",
        "",
        "About a megabyte of memory of its own per process, refilled after each switch; for comparison with",
        "the engine's random-keys scenario over that many sessions (not a bound on it).",
        "",
        "| processes | median | lowest | highest |",
        "|---:|---:|---:|---:|",
    ]
    for n, row in result["cpu_scaling_working_set"].items():
        out.append(f"| {n} | {row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} |")
    out += [
        "",
        f"## A 150-byte write and `fdatasync`, one thread ({result['syncs']} per repetition; median latency)",
        "",
        "| kind | median µs | lowest | highest | writes/s at the median |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, row in sync.items():
        out.append(f"| {mode} | {row['median_us']:.0f} | {row['min_us']:.0f} | {row['max_us']:.0f} | "
                   f"{1e6 / row['median_us']:,.0f} |")
    out += ["", "Latency over a plain overwrite's (median of the per-repetition ratios): "
            + ", ".join(f"{k.split('_over_')[0]} {v:.2f}×" for k, v in ratios.items()) + "."]
    bad = [mode for mode, ok in result["sync_checks"].items() if not ok]
    if bad:
        out += ["", f"Checks that failed (file size or stored row not as written): {', '.join(bad)}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of each CPU measurement")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions")
    parser.add_argument("--syncs", type=int, default=1000, help="writes with a sync per kind per repetition")
    parser.add_argument("--dir", help="folder the sync files are made in (default: the temporary directory)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for machine.md and machine.json")
    where.add_argument("--save", action="store_true", help="write to benchmarks/results/machine/")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.repeat, args.syncs, args.dir)
    text = report(result)
    print(text, end="")
    save_outputs(args.out, args.save, SAVED, "machine", text, result)
    return 0 if all(result["sync_checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
