"""The README's examples run, and its commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M):
        lines = [line[4:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines))
    return blocks


@pytest.mark.parametrize("number", range(len(python_blocks(README))))
def test_readme_example_runs(number: int, tmp_path: Any, monkeypatch: Any, request: Any) -> None:
    monkeypatch.chdir(tmp_path)
    if "REDIS_URL" in python_blocks(README)[number]:  # a real server, started by the tests
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("redis_server").url)
    exec(compile(python_blocks(README)[number], f"README.rst block {number}", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"^    (python -m pip install -e .*pytest.*)$", README, re.M)
    assert command is not None
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()


def test_demo_reports_no_lost_update() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sessionkit.demo", "--threads", "4", "--updates", "200"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert "no update was lost" in out
    assert "800 updates" in out


def test_demo_on_a_directory_carries_counts_across_runs(tmp_path: Any) -> None:
    command = [sys.executable, "-m", "sessionkit.demo", "--dir", str(tmp_path / "s"),
               "--threads", "4", "--updates", "100", "--chats", "3"]
    first = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    second = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "no update was lost" in first and "no update was lost" in second

    def befores(out: str) -> list[int]:
        rows = [line.split() for line in out.splitlines() if line.startswith("chat-")]
        return [int(row[1]) for row in rows]

    assert sum(befores(first)) == 0
    assert sum(befores(second)) == 400


def test_readme_headline_table_matches_the_committed_run() -> None:
    from benchmarks.headline import table

    start = README.index(".. headline-table-start\n") + len(".. headline-table-start\n")
    end = README.index(".. headline-table-end\n")
    shown = README[start:end].strip("\n") + "\n"  # the table sits between blank lines
    assert shown == table(str(ROOT / "benchmarks" / "results" / "results.json"))


def test_readme_backend_table_quotes_the_committed_run() -> None:
    """The "Choosing a backend" table's RMW/s column is scenario (a) of the committed run."""
    import json

    cells = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())["cells"]
    one_thread = {c["subject"]: c["ops_s"] for c in cells if c["scenario"] == "a" and "ops_s" in c}
    section = README[README.index("Choosing a backend\n"):README.index("msgpack's types are")]
    quoted = dict(re.findall(r"^``(\w+Storage)``.*?\s([\d,]+)$", section, re.M))
    subjects = {"MemoryStorage": "memory", "MsgpackFileStorage": "msgpack", "ShelveStorage": "shelve"}
    assert set(quoted) == set(subjects)
    for backend, subject in subjects.items():
        assert quoted[backend] == f"{one_thread[subject]:,.0f}", backend


def test_readme_cli_examples_run(tmp_path: Any, request: Any) -> None:
    """Every ``sessionkit`` line of the README runs, on real stores made as a bot would."""
    import shlex

    from sessionkit import MsgpackFileStorage, ShelveStorage

    section = README[README.index("The ``sessionkit`` command\n"):README.index("A store is one argument")]
    lines = [line.strip().split("  #")[0].strip() for line in section.splitlines() if line.startswith("    sessionkit ")]
    assert len(lines) >= 7
    store = MsgpackFileStorage(tmp_path / "sessions")
    for key in ("chat:1", "chat:2", "42"):
        store.write(key, {"count": 1})
    store.close()
    shelf = ShelveStorage(tmp_path / "prefs.db")
    shelf.write("42", {"lang": "en"})
    shelf.close()
    port = request.getfixturevalue("redis_server").port
    outputs = {}
    for line in lines:
        args = shlex.split(line.replace("127.0.0.1:6379", f"127.0.0.1:{port}"))[1:]
        done = subprocess.run([sys.executable, "-m", "sessionkit", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr)
        outputs[args[0]] = done.stdout
    assert outputs["ls"].split() == ["chat:1", "chat:2"]
    assert '"count": 1' in outputs["show"]
    assert ShelveStorage(tmp_path / "prefs.db").read("42") is None  # rm removed it


def test_readme_engine_table_quotes_the_committed_engine_run() -> None:
    """Every cell of the table beside LMDB, SQLite and diskcache is the committed run's figure."""
    import json
    import statistics

    sc = json.loads((ROOT / "benchmarks" / "results" / "engine" / "engine.json").read_text())["scenarios"]
    names = ["sessionkit", "lmdb", "sqlite-wal", "diskcache"]

    def ops(scenario: str, name: str) -> str:
        return f"{sc[scenario][name]['median_ops_s']:,.0f}"

    expected = {
        "1 thread, 1 key (ops/s)": [ops("1t1k", n) for n in names],
        "4 processes, 1 key: slowest process's share": [
            f"{statistics.median(sc['4p1k'][n]['least_shares']):.2f}" for n in names],
        "4 processes, a key each (ops/s)": [ops("4p4k", n) for n in names],
        "random keys, 8 processes ÷ 1 process": [
            f"{sc['random'][n]['by_processes']['8']['median_scaling']:.2f}" for n in names],
        "2 ms handler, 8 threads x 4 processes (ops/s)": [ops("handler", n) for n in names],
        "p99.9 / max latency, 1 KB values (µs)": [
            f"{sc['latency'][n]['p999_us']:,.0f} / {sc['latency'][n]['max_us']:,.0f}" for n in names],
        "worst operation while another process merges": [f"{sc['stall'][n]['worst_max_ms']:.1f} ms" for n in names],
        "open 1M sessions: first RMW (ms) / RSS (MB)": [
            f"{sc['open1m'][n]['median_first_ms']:.1f} / {sc['open1m'][n]['median_rss_mb']:.0f}" for n in names],
        "durable, 4 processes, a key each (ops/s)": [
            ops_ for ops_ in (f"{sc['durable']['4p4k'][n]['median_ops_s']:,.0f}"
                              for n in ("sessionkit-durable", "lmdb-sync", "sqlite-full"))] + ["–"],
    }
    start = README.index("scenario                                           sessionkit")
    table = README[start:README.index("\n\n", start)]
    shown = {}
    for line in table.splitlines()[2:-1]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        shown[label] = cells
    assert shown == expected
