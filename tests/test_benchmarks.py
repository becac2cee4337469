"""The benchmark runs end to end in a tiny configuration, so it cannot rot."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_runs_in_a_tiny_configuration(tmp_path: Any) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks",
            "--backends", "memory,msgpack", "--peers", "floor-dict",
            "--scenarios", "a,b,d,e,g,h", "--sizes", "50",
            "--ops", "40", "--repeat", "1", "--seconds", "1",
            "--out", str(out), "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "| sessionkit memory |" in table and "| sessionkit msgpack |" in table
    assert "(d) 4 processes, same key" in table
    assert "skipped: in-process only" in table  # memory and the dict floor in (d)
    results = json.loads((out / "results.json").read_text())
    timed = [c for c in results["cells"] if "median_us" in c]
    assert {c["scenario"] for c in timed} == {"a", "b", "d", "e", "g", "h"}
    assert "| 2p/1p (raw) |" in table  # (h): one process vs two alternating
    assert all(c["lost"] in (0, None) and c["errors"] == 0 for c in timed)
    assert (out / "results.md").read_text() in table


def test_cell_counts_lost_updates_of_a_non_atomic_peer(tmp_path: Any) -> None:
    """The lost-update column is real: an unlocked dict loses increments under threads."""
    from benchmarks import cell, subjects

    class Unlocked(subjects.FloorDict):
        name = "unlocked dict"

        def increment(self, key: str) -> None:
            session = self.data.setdefault(key, {})
            value = session.get("count", 0)
            for _ in range(50):  # widen the window between read and write
                pass
            session["count"] = value + 1

    subjects.ALL["unlocked"] = Unlocked
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        result = cell.run({"scenario": "b", "subject": "unlocked", "ops": 20000, "repeat": 1,
                           "seconds": 5, "workdir": str(tmp_path)})
    finally:
        sys.setswitchinterval(old)
        del subjects.ALL["unlocked"]
    assert result["lost"] > 0
