"""Cost of one memory-backed session operation against a dict + Lock floor.

    python -m benchmarks.core [--ops N] [--repeat R]

Times, in one run and interleaved, the increment
``with sessions.open(k) as s: s["n"] = s.get("n", 0) + 1`` on MemoryStorage,
the same increment on a plain dict guarded by one ``threading.Lock`` (the
floor), and a lazy session that is never touched.  Prints the median cost per
operation of each and the ratios to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Callable

from sessionkit import MemoryStorage, Sessions


def floor_op(n: int) -> float:
    data: dict[str, dict[str, int]] = {"k": {}}
    lock = threading.Lock()
    start = time.perf_counter()
    for _ in range(n):
        with lock:
            d = data["k"]
            d["n"] = d.get("n", 0) + 1
    return time.perf_counter() - start


def session_op(n: int) -> float:
    sessions = Sessions(MemoryStorage(), initial=dict)
    start = time.perf_counter()
    for _ in range(n):
        with sessions.open("k") as s:
            s["n"] = s.get("n", 0) + 1
    elapsed = time.perf_counter() - start
    with sessions.open("k") as s:
        assert s["n"] == n
    return elapsed


def lazy_untouched_op(n: int) -> float:
    sessions = Sessions(MemoryStorage(), initial=dict, lazy=True)
    start = time.perf_counter()
    for _ in range(n):
        with sessions.open("k"):
            pass
    return time.perf_counter() - start


FLOOR = "floor: dict + Lock"
CASES: dict[str, Callable[[int], float]] = {
    FLOOR: floor_op,
    "memory session RMW": session_op,
    "lazy, untouched": lazy_untouched_op,
}


def measure(ops: int, repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median µs per op of each case, and the median of each case's ratio to
    the floor measured right beside it (pairs cancel the machine's drift)."""
    for fn in CASES.values():  # warm-up
        fn(ops // 10 or 1)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    ratios: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeat):
        for name, fn in CASES.items():
            floor = floor_op(ops)
            cost = fn(ops)
            samples[name].append(cost / ops * 1e6)
            ratios[name].append(cost / floor)
    return (
        {name: statistics.median(v) for name, v in samples.items()},
        {name: statistics.median(v) for name, v in ratios.items()},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=31)
    args = parser.parse_args(argv)
    medians, ratios = measure(args.ops, args.repeat)
    print(f"{args.repeat} interleaved runs of {args.ops} ops; medians")
    print(f"{'case':<22} {'µs/op':>8} {'x floor':>8}")
    for name, us in medians.items():
        print(f"{name:<22} {us:>8.3f} {ratios[name]:>8.2f}")
    print(f"ratio memory RMW / floor: {ratios['memory session RMW']:.2f} (target <= 6)")
    print(f"ratio lazy untouched / floor: {ratios['lazy, untouched']:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
