"""The benchmark runs end to end in a tiny configuration, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

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


def test_a_run_without_out_leaves_the_checkout_alone(tmp_path: Any) -> None:
    committed = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in committed.rglob("*") if p.is_file()}
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "--backends", "memory", "--peers", "none",
            "--scenarios", "a", "--ops", "20", "--repeat", "1", "--seconds", "1",
            "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert {p: p.stat().st_mtime_ns for p in committed.rglob("*") if p.is_file()} == before
    scratch = [p for p in tmp_path.iterdir() if p.name.startswith("sessionkit-benchmarks-")]
    assert len(scratch) == 1 and (scratch[0] / "results.json").exists()
    assert str(scratch[0]) in done.stderr


def test_cell_counts_lost_updates_of_a_non_atomic_peer(tmp_path: Any) -> None:
    """The lost-update column is real: an unlocked dict loses increments under threads."""
    from benchmarks import cell, subjects

    class Unlocked(subjects.FloorDict):
        name = "unlocked dict"

        def increment(self, key: str) -> None:
            session = self.data.setdefault(key, {})
            value = session.get("count", 0)
            time.sleep(0)  # lets another thread run between the read and the write
            session["count"] = value + 1

    subjects.ALL["unlocked"] = Unlocked
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    lost = []
    try:
        # a machine busy enough can still run the threads one after another: a few tries
        for _ in range(3):
            result = cell.run({"scenario": "b", "subject": "unlocked", "ops": 20000, "repeat": 1,
                               "seconds": 5, "workdir": str(tmp_path)})
            lost.append(result["lost"])
            if result["lost"]:
                break
    finally:
        sys.setswitchinterval(old)
        del subjects.ALL["unlocked"]
    assert lost[-1] > 0, lost


def test_redis_benchmark_runs_in_a_tiny_configuration(tmp_path: Any) -> None:
    """The Redis benchmark starts its own server, runs every scenario, and stops the server."""
    from . import redis_servers

    redis_servers.need_binaries()
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.redis_bench", "--quick",
            "--ops", "40", "--repeat", "1", "--seconds", "0.2", "--handovers", "16",
            "--out", str(out),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for title in ("(a) 1 thread, 1 key", "(b) 8 threads, same key", "(c) 8 threads, 8 keys",
                  "(d) 4 processes, same key", "Hand-over: 8 threads, 1 key", "Targets"):
        assert f"## {title}" in table
    for name in ("sessionkit-redis", "redis-py-lock", "plain-get-set"):
        assert f"| {name} |" in table
    assert (out / "results.md").read_text() in table
    results = json.loads((out / "results.json").read_text())
    for scenario in "abcd":
        rows = results["scenarios"][scenario]
        for name in ("sessionkit-redis", "redis-py-lock"):
            assert rows[name]["lost"] == 0 and rows[name]["errors"] == 0, (scenario, name, rows[name])
            assert rows[name]["expected"] > 0
        assert rows["redis-py-lock"]["median_ratio"] == 1.0
    # one reply read per round trip: lock-and-read, then write-and-release
    assert results["scenarios"]["a"]["sessionkit-redis"]["median_round_trips"] == 2.0
    assert results["scenarios"]["a"]["redis-py-lock"]["median_round_trips"] == 4.0
    for name in ("sessionkit-redis", "redis-py-lock"):
        handover = results["handover"][name]
        assert handover["handovers"] > 0 and handover["lost"] == 0 and handover["overlaps"] == 0
    # the server it started is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", results["environment"]["redis_server_port"])) != 0


def test_fairness_benchmark_runs_in_a_tiny_configuration(tmp_path: Any) -> None:
    """Every contention shape runs, the counters come out exact, and no thread of a process starves."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fairness", "--seconds", "0.5", "--backends", "memory,msgpack",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "fairness.md").read_text() in done.stdout
    rows = json.loads((out / "fairness.json").read_text())["rows"]
    assert [(r["backend"], r["processes"], r["threads"]) for r in rows] == [
        ("memory", 1, 8), ("msgpack", 1, 8), ("msgpack", 4, 1), ("msgpack", 4, 8)
    ]
    for row in rows:
        assert row["exact"] and row["errors"] == 0 and row["entries"] > 0, row
        if row["processes"] == 1:  # processes started on a loaded machine may miss much of 0.5 s
            assert row["starved"] == 0, row


def test_floor_benchmark_runs_and_its_inline_loop_counts_exactly(tmp_path: Any) -> None:
    """The floor loop makes real read-modify-writes, in one thread and in four processes sharing its
    files: every subject's counter ends at the number made."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", "--seconds", "0.2", "--repeat", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "floor.md").read_text() in done.stdout
    result = json.loads((out / "floor.json").read_text())
    assert list(result["scenarios"]) == ["1t1k", "4p1k"]
    floors = ["floor", "floor-unchecked"]  # with every check, with none
    for scenario, first in (("1t1k", [*floors, "codec", "memory", "sessionkit"]), ("4p1k", [*floors, "sessionkit"])):
        got = result["scenarios"][scenario]
        subjects = [row["subject"] for row in got["rows"]]
        assert subjects[: len(first)] == first, (scenario, subjects)
        for peer in ("diskcache", "lmdb"):  # beside them when installed (the benchmark extra)
            assert (peer in subjects) == (importlib.util.find_spec(peer) is not None), (peer, subjects)
        assert set(got["counts"]) == set(subjects)
        for name, (counted, made) in got["counts"].items():
            assert counted == made > 500, (scenario, name, counted, made)
        for row in got["rows"]:
            assert row["ops_s"] > 0 and row[f"vs_{row['subject']}"] == 1.0
    assert "memory − codec:" in done.stdout
    assert ("3× diskcache needs" in done.stdout) == (importlib.util.find_spec("diskcache") is not None)


def test_machine_benchmark_runs_and_its_syncs_write_what_they_say(tmp_path: Any) -> None:
    """The machine's ceilings: every process count measured against 1, every kind of sync made and checked."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.machine", "--seconds", "0.2", "--repeat", "1", "--syncs", "30",
         "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "machine.md").read_text() in done.stdout
    result = json.loads((out / "machine.json").read_text())
    for kind in ("cpu_scaling", "cpu_scaling_working_set"):  # a bare loop, and one over a dict of 10,000 entries
        assert list(result[kind]) == ["1", "2", "4", "8"]
        assert result[kind]["1"]["each"] == [1.0]
        assert all(row["median"] > 0 for row in result[kind].values())
    assert result["working_set_entries"] == 10_000
    assert list(result["sync"]) == ["append", "overwrite", "append-fstat", "overwrite-fstat", "sqlite-full"]
    assert all(row["median_us"] > 0 and len(row["each_us"]) == 1 for row in result["sync"].values())
    # the appends grew their files by each record, the overwrites kept their size, SQLite stored the last row
    assert result["sync_checks"] == dict.fromkeys(result["sync"], True)
    assert list(result["sync_ratios"]) == ["append_over_overwrite", "append-fstat_over_overwrite",
                                           "overwrite-fstat_over_overwrite", "sqlite-full_over_overwrite"]
    assert list(tmp_path.iterdir()) == [out]  # the sync files are gone


@pytest.mark.skipif(bool(os.environ.get("SESSIONKIT_RERUN")), reason="a harness, checked once by the main run")
def test_tail_benchmark_runs_each_set_up_and_counts_exactly(tmp_path: Any) -> None:
    """Every set-up makes real read-modify-writes; merges run where each one says, and only there."""
    out = tmp_path / "out"
    ops = 20_000  # 20 MB written over 10 MB live: every shard needs a merge
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tail", "--ops", str(ops), "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "tail.md").read_text() in done.stdout
    result = json.loads((out / "tail.json").read_text())
    assert list(result["runs"]) == ["helper", "thread", "none", "busy-thread"]
    for mode, (run,) in result["runs"].items():
        assert run["counted"] == ops, (mode, run)
        assert 0 < run["p50_us"] <= run["p99_us"] <= run["p999_us"] <= run["max_us"], (mode, run)
        assert (run["merges"] > 0) == (mode in ("helper", "thread")), (mode, run)
