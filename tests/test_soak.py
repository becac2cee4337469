"""The soak run (``python -m benchmarks.soak``) end to end, one backend at a time.

Each run takes ``SESSIONKIT_SOAK_SECONDS`` (default 30) seconds plus its
start and final check: worker processes with threads on one store, kill -9
and restarts, a worker that forks, then the invariants.  The Redis run needs
``redis-server`` on PATH; without it the test skips, except in CI (``CI=1``),
where it fails, as the other Redis tests do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak import Tally, check_counts, value_problem

from . import redis_servers
from .helpers import stressed

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("SESSIONKIT_SOAK_SECONDS") or stressed(30, 5))

SUMMARY = re.compile(
    r"^soak (?P<backend>\w+): (?P<elapsed>[\d.]+) s, (?P<processes>\d+) proc x (?P<threads>\d+) threads, "
    r"seed (?P<seed>\d+), (?P<ops>\d+) ops \((?P<increments>\d+) increments, (?P<nested>\d+) nested, [^)]*\), "
    r"(?P<kills>\d+) kill -9, (?P<forks>\d+) forks, (?P<expired>\d+) expired, .*"
    r"lost (?P<lost>\d+), extra (?P<extra>\d+), corrupt (?P<corrupt>\d+), stuck (?P<stuck>\d+), "
    r"errors (?P<errors>\d+): (?P<verdict>OK|FAILED)$",
    re.MULTILINE,
)


def soak(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )


def need_redis() -> None:
    """Skip (fail in CI) unless the Redis soak can run."""
    missing = [] if shutil.which("redis-server") else ["redis-server (apt-get install redis-server)"]
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("redis-py (pip install -e '.[redis]')")
    if not missing:
        return
    message = "the Redis soak needs " + " and ".join(missing)
    if redis_servers.IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["msgpack", "shelve", "redis"])
def test_the_soak_passes(backend: str) -> None:
    if backend == "redis":
        need_redis()
    done = soak("--seconds", f"{SECONDS:g}", "--backend", backend, timeout=SECONDS + 240)
    shown = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, shown
    lines = [line for line in done.stdout.splitlines() if line.startswith("soak ")]
    assert len(lines) == 1, shown
    match = SUMMARY.match(lines[0])
    assert match, f"not a summary line: {lines[0]!r}"
    got = match.groupdict()
    assert got["backend"] == backend and got["verdict"] == "OK"
    assert (got["processes"], got["threads"]) == ("4", "4")
    assert int(got["increments"]) > 0 and int(got["nested"]) > 0, lines[0]
    assert int(got["kills"]) > 0, lines[0]
    if SECONDS >= 10:
        assert int(got["forks"]) > 0, lines[0]
    assert all(got[name] == "0" for name in ("lost", "extra", "corrupt", "stuck", "errors")), lines[0]


def _without_redis_server(tmp_path: Path, ci: str) -> dict[str, str]:
    """An environment whose PATH has no redis-server, with CI set as given."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "PATH": str(empty), "CI": ci}


def test_without_redis_server_the_redis_soak_is_skipped(tmp_path: Path) -> None:
    done = soak("--seconds", "1", "--backend", "redis", env=_without_redis_server(tmp_path, ""))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["redis: skipped (no redis-server)"]


def test_in_ci_a_missing_redis_server_fails_the_soak(tmp_path: Path) -> None:
    done = soak("--seconds", "1", "--backend", "redis", env=_without_redis_server(tmp_path, "1"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("redis: FAILED (no redis-server")


def test_the_help_names_every_option() -> None:
    done = soak("--help")
    assert done.returncode == 0
    for option in ("--seconds", "--backend", "--processes", "--threads", "--seed", "--kill-every", "--keep"):
        assert option in done.stdout
    assert "--worker" not in done.stdout  # the workers' own entry point stays out of the help


# -- the checker itself: it must see a lost (or an extra) increment ------------------------------


def _tally(tmp_path: Path, text: str) -> Tally:
    log = tmp_path / "w0.1.log"
    log.write_text(text)
    tally = Tally()
    tally.read(log)
    return tally


def test_the_count_check_sees_lost_and_extra_increments(tmp_path: Any) -> None:
    # c:0: 4 started, 2 acknowledged, 1 rolled back, 1 in flight when the worker was killed
    tally = _tally(tmp_path, "ready\nt c:0\na c:0\nt c:0\na c:0\nt c:0\nx c:0\nt c:0\na c:")
    assert (tally.started["c:0"], tally.acked["c:0"], tally.undone["c:0"]) == (4, 2, 1)  # last line cut short
    assert check_counts({"c:0": 2}, tally)[:2] == (0, 0)
    assert check_counts({"c:0": 3}, tally)[:2] == (0, 0)  # the in-flight one landed
    lost, extra, problems = check_counts({"c:0": 1}, tally)
    assert (lost, extra) == (1, 0) and "1 lost" in problems[0]
    assert check_counts({"c:0": 4}, tally)[:2] == (0, 1)  # e.g. the rolled-back block was written
    assert check_counts({}, tally)[:2] == (2, 0)  # the key vanished


def test_the_value_check_sees_inconsistent_values() -> None:
    good = {"stats": {"hits": 3, "by": {"w0": 1, "w1": 2}}, "history": [], "deep": {"a": {"b": []}}}
    assert value_problem("n:0", good) == ""
    assert "add up" in value_problem("n:0", {**good, "stats": {"hits": 4, "by": {"w0": 1, "w1": 2}}})
    blob = b"x" * 10
    assert value_problem("big:0", {"blob": blob, "size": 10, "crc": 0}) != ""
    assert value_problem("c:0", {"n": 3}) == "" and value_problem("c:0", {}) == ""
    assert value_problem("c:0", [1]) != "" and value_problem("zz:0", {}) != ""
