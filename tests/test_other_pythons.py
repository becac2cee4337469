"""The shelve tests again under every other CPython 3.9-3.13 on the machine, once per dbm.

This project's Python may have only dbm.dumb, and only one version.  The
shelve part of the suite reruns under each interpreter that
``tests/pythons.py`` finds (pyenv's, and Debian's ``python3``, which gets
dbm.gnu and dbm.ndbm from ``python3-gdbm``), in the venv that
``python tests/pythons.py prepare`` made for it (``.ci/run`` does that before
the tests), once per dbm module that interpreter has.

If prepare never ran, these tests skip and say so (in CI, where ``CI=true``,
they fail instead); if it ran and an interpreter's venv could not be made, or
is missing or broken, that interpreter's tests fail and say why.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from . import pythons

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
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
TIMEOUT = 600  # one rerun takes 20 s to 90 s (dbm.ndbm)
DEBIAN = os.path.exists("/etc/debian_version")


def _params() -> list[Any]:
    params = []
    for interp in pythons.others():
        dbms = list(interp.dbms)
        if interp.tag.startswith("system-") and DEBIAN:
            # the point of the system Python: missing ones are reported, not silently left out
            dbms += [name for name in pythons.SYSTEM_DBMS if name not in dbms]
        params += [pytest.param(interp, dbm, id=f"{interp.tag}-{dbm}") for dbm in dbms]
    return params


_checked: dict[str, str | None] = {}


def _python_for(interp: pythons.Interpreter) -> str:
    """The Python to rerun under (``interp``'s venv), or a skip / failure that says what to do."""
    marker = pythons.load_marker()
    if marker is None:
        message = f"no venvs for the other Pythons: run `{pythons.PREPARE}` first"
        if IN_CI:
            pytest.fail(f"{message} (.ci/run should have)", pytrace=False)
        pytest.skip(message)
    entry = marker["interpreters"].get(interp.real)
    if entry is None:
        pytest.fail(f"{interp.exe} was not there when `{pythons.PREPARE}` ran: run it again", pytrace=False)
    if entry["status"] == "pending":
        pytest.fail(f"`{pythons.PREPARE}` stopped before it got to {interp.exe}: run it again", pytrace=False)
    if entry["status"] == "failed":
        pytest.fail(
            f"`{pythons.PREPARE}` could not make a venv for {interp.exe}:\n{entry['error']}", pytrace=False
        )
    # "runner": prepare ran under this interpreter (the tests now run under
    # another), which then got '.[test]' itself, so it reruns as it is
    python = interp.exe if entry["status"] == "runner" else str(interp.venv_python)
    if python not in _checked:
        _checked[python] = pythons.check_python(python, interp.real)
    problem = _checked[python]
    if problem is not None:
        how = f"{interp.exe} -m pip install -e '.[test]'" if entry["status"] == "runner" else pythons.PREPARE
        pytest.fail(f"{python} cannot rerun the tests: {problem}\nrun `{how}`", pytrace=False)
    return python


@pytest.mark.parametrize(("interp", "dbm"), _params())
def test_shelve_suite_under_another_python(
    interp: pythons.Interpreter, dbm: str, tmp_path: pathlib.Path
) -> None:
    if dbm not in interp.dbms:
        message = f"{interp.exe} has no {dbm}: apt-get install python3-gdbm"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    python = _python_for(interp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["SESSIONKIT_TEST_DBM"] = dbm
    env["COLUMNS"] = "250"  # -ra's summary lines, whole enough to say why
    cmd = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *SHELVE_TESTS,
        *(SQLITE_TESTS if dbm == "dbm.sqlite3" else []),
        "-k",
        SELECT,
        # the kill -9 stress runs once per dbm: dbm.dumb's in the main run
        *(["-m", "not slow"] if dbm == "dbm.dumb" else []),
        "--basetemp",
        str(tmp_path / "t"),
    ]
    start = time.monotonic()
    # its own session, so that a hung rerun's worker processes go down with it
    proc = subprocess.Popen(
        cmd,
        cwd=pythons.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n(killed after {TIMEOUT} s)"
    seconds = time.monotonic() - start
    lines = out.strip().splitlines()
    failures = [line for line in lines if re.match(r"(FAILED|ERROR) ", line)]
    summary = f"{interp.exe} ({interp.version}) with {dbm}, {seconds:.0f} s"
    assert proc.returncode == 0, "\n".join(
        [f"{summary}: exit {proc.returncode}", *failures, "--- last lines:", *lines[-25:]]
    )
    assert re.search(r"\d+ passed", lines[-1]) and "failed" not in lines[-1], f"{summary}:\n{lines[-1]}"
