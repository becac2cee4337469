"""The whole suite again under every other CPython 3.9-3.13 on the machine, and the shelve tests once per dbm.

This project's Python is one version, and may have only dbm.dumb.  The
suite reruns under each interpreter that ``tests/pythons.py`` finds
(pyenv's, and Debian's ``python3``, which gets dbm.gnu and dbm.ndbm from
``python3-gdbm``), in the venv that ``python tests/pythons.py prepare`` made
for it (``.ci/run`` does that before the tests):

* the **whole suite** once per interpreter, its stress tests (the kill -9
  loops, the soak) at a quarter of their length (``SESSIONKIT_STRESS=0.25``);
  the tests marked ``slow`` (the longest stress loops) only under Debian's
  ``python3`` (the one with every dbm), the main run having them at full
  length;
* the **shelve tests** once more for each further dbm the interpreter has
  (dbm.gnu and dbm.ndbm on Debian's, dbm.sqlite3 on 3.13).

So that this takes minutes, not an hour, the reruns start in the background
as soon as the suite is collected (``tests/conftest.py``), :data:`LANES` at a
time, while this run goes on with its own tests; the tests here are moved to
the end of the run, and each waits for its rerun and reports it.

If prepare never ran, these tests skip and say so (in CI, where ``CI=true``,
they fail instead); if it ran and an interpreter's venv could not be made, or
is missing or broken, that interpreter's tests fail and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from . import pythons

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RERUN = "SESSIONKIT_RERUN"  # set in a rerun's environment: it does not rerun again
SHELVE_TESTS = [
    "tests/test_shelve.py",
    "tests/test_contract.py",
    "tests/test_processes.py",
    "tests/test_deployments.py",
    "tests/test_shelve_faults.py",
]
SELECT = "shelve or not (memory or msgpack or redis)"
# SqliteDb's own tests need dbm.sqlite3 (Python 3.13+), which this project's Python may lack
SQLITE_TESTS = ["tests/test_sqlitedb.py"]
LANES = 2  # reruns at a time, beside this run
TIMEOUT = 1500  # seconds one rerun may take (a whole suite takes 3 to 6 minutes here)
STRESS = "0.25"
DEBIAN = os.path.exists("/etc/debian_version")


@dataclass(frozen=True)
class Rerun:
    """One rerun: the whole suite (``dbm`` None) or the shelve tests on ``dbm``."""

    interp: pythons.Interpreter
    dbm: str | None

    @property
    def name(self) -> str:
        return f"{self.interp.tag}-{'suite' if self.dbm is None else self.dbm}"


def reruns() -> list[Rerun]:
    """Every rerun this machine calls for, the whole suites first (they take longest)."""
    suites, shelves = [], []
    for interp in pythons.others():
        suites.append(Rerun(interp, None))
        dbms = [d for d in interp.dbms if d != "dbm.dumb"]
        if interp.tag.startswith("system-") and DEBIAN:
            # the point of the system Python: missing ones are reported, not silently left out
            dbms += [name for name in pythons.SYSTEM_DBMS if name not in dbms]
        shelves += [Rerun(interp, dbm) for dbm in dbms]
    return suites + shelves


_checked: dict[str, str | None] = {}


def python_for(interp: pythons.Interpreter) -> tuple[str | None, str]:
    """The Python to rerun under (``interp``'s venv), or None and why not (``skip:`` if it is only not prepared)."""
    marker = pythons.load_marker()
    if marker is None:
        return None, f"skip:no venvs for the other Pythons: run `{pythons.PREPARE}` first"
    entry = marker["interpreters"].get(interp.real)
    if entry is None:
        return None, f"{interp.exe} was not there when `{pythons.PREPARE}` ran: run it again"
    if entry["status"] == "pending":
        return None, f"`{pythons.PREPARE}` stopped before it got to {interp.exe}: run it again"
    if entry["status"] == "failed":
        return None, f"`{pythons.PREPARE}` could not make a venv for {interp.exe}:\n{entry['error']}"
    # "runner": prepare ran under this interpreter (the tests now run under
    # another), which then got '.[test]' itself, so it reruns as it is
    python = interp.exe if entry["status"] == "runner" else str(interp.venv_python)
    if python not in _checked:
        _checked[python] = pythons.check_python(python, interp.real)
    problem = _checked[python]
    if problem is not None:
        how = f"{interp.exe} -m pip install -e '.[test]'" if entry["status"] == "runner" else pythons.PREPARE
        return None, f"{python} cannot rerun the tests: {problem}\nrun `{how}`"
    return python, ""


@dataclass
class Outcome:
    """What became of one rerun."""

    done: threading.Event = field(default_factory=threading.Event)
    returncode: int | None = None
    output: str = ""
    seconds: float = 0.0
    problem: str = ""  # why it did not run


class Runner:
    """Runs the reruns in the background, :data:`LANES` at a time."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.started = False
        self.procs: set[subprocess.Popen[str]] = set()
        self.mutex = threading.Lock()

    def start(self) -> None:
        """Start every rerun (once per run of the suite)."""
        with self.mutex:
            if self.started:
                return
            self.started = True
            queue = reruns()
            for rerun in queue:
                self.outcomes[rerun.name] = Outcome()
        pending = iter(queue)
        take = threading.Lock()

        def lane() -> None:
            while True:
                with take:
                    rerun = next(pending, None)
                if rerun is None:
                    return
                self._run(rerun, self.outcomes[rerun.name])

        for _ in range(LANES):
            threading.Thread(target=lane, name="sessionkit-rerun", daemon=True).start()

    def _run(self, rerun: Rerun, outcome: Outcome) -> None:
        try:
            if rerun.dbm is not None and rerun.dbm not in rerun.interp.dbms:
                outcome.problem = f"{rerun.interp.exe} has no {rerun.dbm}: apt-get install python3-gdbm"
                return
            python, problem = python_for(rerun.interp)
            if python is None:
                outcome.problem = problem
                return
            basetemp = tempfile.mkdtemp(prefix=f"sessionkit-rerun-{rerun.name}-")
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
            env.pop("SESSIONKIT_TEST_DBM", None)
            env[RERUN] = "1"
            env["COLUMNS"] = "250"  # -ra's summary lines, whole enough to say why
            cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", basetemp]
            if rerun.dbm is None:
                env["SESSIONKIT_STRESS"] = STRESS
                cmd += ["--ignore", "tests/test_other_pythons.py"]
                if not rerun.interp.tag.startswith("system-"):
                    cmd += ["-m", "not slow"]
            else:
                env["SESSIONKIT_TEST_DBM"] = rerun.dbm
                cmd += [*SHELVE_TESTS, *(SQLITE_TESTS if rerun.dbm == "dbm.sqlite3" else []), "-k", SELECT,
                        "-m", "not slow"]  # the kill -9 stress runs with the whole suites
            start = time.monotonic()
            # its own session, so that a hung rerun's worker processes go down with it
            proc = subprocess.Popen(
                cmd, cwd=pythons.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )
            with self.mutex:
                self.procs.add(proc)
            try:
                out, _ = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                out += f"\n(killed after {TIMEOUT} s)"
            finally:
                with self.mutex:
                    self.procs.discard(proc)
            outcome.seconds = time.monotonic() - start
            outcome.returncode = proc.returncode
            outcome.output = out
            if proc.returncode == 0:
                shutil.rmtree(basetemp, ignore_errors=True)
        except Exception as exc:  # reported by the test that waits for it
            outcome.problem = f"the rerun could not be run: {type(exc).__name__}: {exc}"
        finally:
            outcome.done.set()

    def stop(self) -> None:
        """Kill what still runs (the suite was interrupted)."""
        with self.mutex:
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass


RUNNER = Runner()


def _ids() -> list[Any]:
    return [pytest.param(rerun, id=rerun.name) for rerun in reruns()]


@pytest.mark.skipif(bool(os.environ.get(RERUN)), reason="a rerun does not rerun again")
@pytest.mark.parametrize("rerun", _ids())
def test_the_suite_under_another_python(rerun: Rerun) -> None:
    RUNNER.start()  # already started at collection, unless only some tests were selected
    outcome = RUNNER.outcomes[rerun.name]
    if not outcome.done.wait(TIMEOUT + 120):
        pytest.fail(f"{rerun.name}: the rerun did not finish", pytrace=False)
    problem = outcome.problem
    if problem.startswith("skip:"):  # never prepared
        if IN_CI:
            pytest.fail(f"{problem[5:]} (.ci/run should have)", pytrace=False)
        pytest.skip(problem[5:])
    if problem and "has no dbm" in problem and not IN_CI:
        pytest.skip(problem)
    if problem:
        pytest.fail(problem, pytrace=False)
    what = "the whole suite" if rerun.dbm is None else f"the shelve tests with {rerun.dbm}"
    lines = outcome.output.strip().splitlines()
    failures = [line for line in lines if re.match(r"(FAILED|ERROR) ", line)]
    summary = f"{what} under {rerun.interp.exe} ({rerun.interp.version}), {outcome.seconds:.0f} s"
    assert outcome.returncode == 0, "\n".join(
        [f"{summary}: exit {outcome.returncode}", *failures, "--- last lines:", *lines[-25:]]
    )
    assert lines and re.search(r"\d+ passed", lines[-1]) and not re.search(r"\d+ (failed|errors?)\b", lines[-1]), (
        f"{summary}:\n{lines[-1:]}"
    )
