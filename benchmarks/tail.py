"""Where the msgpack engine's tail latency comes from: its merges.

    python -m benchmarks.tail [--ops N] [--repeat R] [--out DIR | --save]

The ``latency`` scenario of ``benchmarks.engine``, sessionkit alone: one
thread makes ``--ops`` read-modify-writes of 1 KB sessions on random keys of
10,000 (``Sessions(MsgpackFileStorage(dir), initial=dict)``), each one
timed.  Writing 1 KB values that fast, the store needs a merge of one of its
16 shards every few milliseconds, and the run repeats in four set-ups that
differ only in where that work goes:

``helper``
    as shipped: the process's merge thread hands each merge to a helper
    process (``sessionkit.storage._merge_helper``) and waits for it without
    the GIL; the timed process moves to the new files when it next writes
    to a merged shard.
``thread``
    ``SESSIONKIT_MERGES=thread``: the merge thread merges itself, paced,
    sharing the GIL with the timed thread.
``none``
    no merges at all (the logs grow without bound): what the engine's own
    path costs, the floor of the tail.
``busy-thread``
    no merges, but a thread beside the timed one doing pure-Python work in
    slices of the merge thread's (``PACE`` of work, then ``PAUSE`` asleep):
    what a background thread at that duty costs the request thread by
    taking the GIL, whatever its work.

Each set-up runs in a fresh process; the set-ups take turns within a
repetition.  The report gives the median over repetitions of p50, p99,
p99.9 and max (µs), and the merges made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .report import save_outputs

SAVED = Path(__file__).resolve().parent / "results" / "tail"
MODES = ("helper", "thread", "none", "busy-thread")
SESSIONS = 10_000
PAD = b"x" * 1000


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q / 100))] / 1e3


def one_run(mode: str, ops: int, seed: int) -> dict[str, Any]:
    """One set-up, in this process: prefill, then ``ops`` timed read-modify-writes."""
    from sessionkit import MsgpackFileStorage, Sessions
    from sessionkit.storage import _shard

    merged = [0]
    if mode == "thread":
        os.environ["SESSIONKIT_MERGES"] = "thread"
    if mode in ("none", "busy-thread"):
        _shard.MERGER.request = lambda shard: None  # type: ignore[method-assign]
        _shard.SLACK = 1 << 50  # never overdue either
    if mode == "thread":
        merge = _shard.Shard.merge

        def counting(self: Any, *args: Any, **kwargs: Any) -> bool:
            done = merge(self, *args, **kwargs)
            merged[0] += bool(done)
            return done

        _shard.Shard.merge = counting  # type: ignore[method-assign]
    directory = tempfile.mkdtemp(prefix="sessionkit-tail-")
    try:
        storage = MsgpackFileStorage(directory)
        sessions = Sessions(storage, initial=dict)
        for i in range(SESSIONS):
            storage.write(f"chat:{i}", {"count": 0, "pad": PAD})
        os.sync()
        if mode == "busy-thread":
            quit_busy = threading.Event()

            def busy() -> None:
                clock = time.perf_counter
                while not quit_busy.is_set():
                    until = clock() + _shard.PACE
                    x = 0
                    while clock() < until:
                        for i in range(20):
                            x += i
                    time.sleep(_shard.PAUSE)

            threading.Thread(target=busy, daemon=True).start()
        pick = random.Random(seed).randrange
        clock = time.perf_counter_ns
        latencies = []
        for _ in range(ops):
            key = f"chat:{pick(SESSIONS)}"
            t0 = clock()
            with sessions.open(key) as s:
                s["count"] = s.get("count", 0) + 1
            latencies.append(clock() - t0)
        if mode == "busy-thread":
            quit_busy.set()
        _shard.MERGER.wait()
        counted = sum(storage.read(f"chat:{i}")["count"] for i in range(SESSIONS))
        storage.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    latencies.sort()
    return {
        "p50_us": _percentile(latencies, 50), "p99_us": _percentile(latencies, 99),
        "p999_us": _percentile(latencies, 99.9), "max_us": latencies[-1] / 1e3,
        "merges": _shard.MERGER.helper.merges if mode == "helper" else merged[0],
        "counted": counted,
    }


def run(ops: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    root = Path(__file__).resolve().parent.parent
    for rep in range(repeat):
        for mode in MODES[rep % len(MODES):] + MODES[: rep % len(MODES)]:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.tail", "--one", mode, "--ops", str(ops), "--seed", str(rep)],
                cwd=root, capture_output=True, text=True, timeout=600, check=True,
            )
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {
        mode: {field: statistics.median(r[field] for r in got) for field in got[0] if field != "counted"}
        for mode, got in runs.items()
    }
    return {"ops": ops, "repeat": repeat, "runs": runs, "median": summary,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "cpus": os.cpu_count()}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"# Tail latency of 1 KB read-modify-writes by where merges run ({result['ops']:,} ops, "
        f"median of {result['repeat']} runs; {result['system']}, Python {result['python']}, "
        f"{result['cpus']} CPUs)",
        "",
        "| set-up | p50 µs | p99 µs | p99.9 µs | max µs | merges |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, row in result["median"].items():
        lines.append(f"| {mode} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['p999_us']:.1f} | "
                     f"{row['max_us']:,.0f} | {row['merges']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=200_000, help="timed read-modify-writes per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each set-up")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a single run, printed as JSON
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for tail.md and tail.json")
    where.add_argument("--save", action="store_true", help="write to benchmarks/results/tail/")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one, args.ops, args.seed)))
        return 0
    result = run(args.ops, args.repeat)
    text = report(result)
    print(text, end="")
    save_outputs(args.out, args.save, SAVED, "tail", text, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
