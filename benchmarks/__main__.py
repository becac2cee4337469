"""Compare sessionkit's backends with peers and floors, side by side.

    python -m benchmarks [--quick] [--backends memory,msgpack] [--peers diskcache]
                         [--scenarios a,b,e] [--sizes 1000,10000] [--out DIR | --save]

Prints a markdown table on stdout and writes results.md, results.json and
results.png to the output folder: a scratch folder under the system's
temporary directory unless ``--out`` names one, or ``--save`` asks for the
committed ``benchmarks/results/``.  Every cell runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import report
from .cell import SCENARIOS
from .subjects import BACKENDS, FLOORS, PEERS, available

# sizes: N for scenario (e); alternate_sizes: N for scenario (h).  --sizes sets both.
QUICK = {"ops": 300, "repeat": 3, "seconds": 0.25, "sizes": [1000, 10000], "alternate_sizes": [1000, 10000]}
FULL = {"ops": 2000, "repeat": 5, "seconds": 2.0, "sizes": [1000, 10_000, 100_000, 1_000_000],
        "alternate_sizes": [1000, 100_000]}


def _names(text: str | None, known: dict[str, Any], what: str) -> list[str]:
    if text is None:
        return list(known)
    if text in ("", "none"):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", help=f"sessionkit backends ({','.join(BACKENDS)}); default all")
    p.add_argument("--peers", help=f"peers and floors ({','.join([*PEERS, *FLOORS])}), or 'none'; default all")
    p.add_argument("--scenarios", help=f"scenarios ({','.join(SCENARIOS)}); default all")
    p.add_argument("--sizes", help="N for scenarios e and h, comma-separated")
    p.add_argument("--quick", action="store_true", help="fewer operations and sizes: a few minutes")
    p.add_argument("--ops", type=int, help="operations per repetition")
    p.add_argument("--repeat", type=int, help="repetitions per cell")
    p.add_argument("--seconds", type=float, help="time cap per repetition")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder (default: a new scratch folder under the temporary directory)")
    where.add_argument(
        "--save", action="store_true", help="write to benchmarks/results/, the committed run the README quotes"
    )
    p.add_argument("--workdir", help="where stores are created (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.save:
        args.out = os.path.join("benchmarks", "results")
    elif args.out is None:
        args.out = tempfile.mkdtemp(prefix="sessionkit-benchmarks-")
    return args


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = dict(QUICK if args.quick else FULL)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    settings = {
        "ops": args.ops or base["ops"],
        "repeat": args.repeat or base["repeat"],
        "seconds": args.seconds or base["seconds"],
        "sizes": sizes or base["sizes"],
        "alternate_sizes": sizes or base["alternate_sizes"],
        "quick": args.quick,
    }
    subjects = _names(args.backends, BACKENDS, "backends") + _names(args.peers, {**PEERS, **FLOORS}, "peers")
    scenarios = _names(args.scenarios, SCENARIOS, "scenarios")
    notes = []
    runnable = []
    for name in subjects:
        why = available(name)
        if why:
            notes.append(f"- {name}: not run: {why}")
        else:
            runnable.append(name)
    from .subjects import ALL

    cells_todo = []
    skipped: list[dict[str, Any]] = []
    for scenario in scenarios:
        sized = {"e": settings["sizes"], "h": settings["alternate_sizes"]}
        for size in sized.get(scenario, [0]):
            for name in runnable:
                cls: Any = ALL[name]
                why = None
                if scenario in ("d", "h") and not cls.shared_by_processes:
                    why = "in-process only"
                elif scenario == "g" and not cls.lazy_capable:
                    why = "has no lazy session"
                if why:
                    skipped.append({"scenario": scenario, "subject": name, "size": size, "name": cls.name,
                                    "group": cls.group, "skipped": why})
                else:
                    cells_todo.append((scenario, name, size))
    root = args.workdir or tempfile.mkdtemp(prefix="sessionkit-bench-")
    os.makedirs(root, exist_ok=True)
    env = report.environment(root)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, (scenario, name, size) in enumerate(cells_todo, 1):
        progress(
            f"[{i}/{len(cells_todo)}] ({scenario}) {SCENARIOS[scenario]}"
            f"{f' N={size:,}' if size else ''} · {name} · {time.monotonic() - started:.0f} s"
        )
        workdir = tempfile.mkdtemp(dir=root)
        spec = {"scenario": scenario, "subject": name, "size": size, "workdir": workdir, **{
            k: settings[k] for k in ("ops", "repeat", "seconds")}}
        results.append(run_cell(spec))
        shutil.rmtree(workdir, ignore_errors=True)
    progress(f"done: {len(cells_todo)} cells in {time.monotonic() - started:.0f} s\n")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)

    results.extend(skipped)
    text = report.markdown(results, env, settings)
    if notes:
        text += "\n## Not run\n\n" + "\n".join(notes) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    report.write_json(os.path.join(args.out, "results.json"), results, env, settings)
    chart_note = report.write_chart(os.path.join(args.out, "results.png"), results)
    if chart_note:
        text += f"\n{chart_note}\n"
    print(text)
    print(f"(results.md, results.json and results.png are in {args.out})", file=sys.stderr)
    return 0


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.cell", json.dumps(spec)]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    failure = {"scenario": spec["scenario"], "subject": spec["subject"], "size": spec["size"]}
    from .subjects import ALL

    failure["name"] = ALL[spec["subject"]].name  # type: ignore[attr-defined]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        return {**failure, "failure": "timed out"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {**failure, "failure": f"exit {done.returncode}: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
