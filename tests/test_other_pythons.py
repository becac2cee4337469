"""The shelve tests again under another Python that has dbm.gnu / dbm.ndbm.

This project's Python may have only dbm.dumb.  Debian's own ``python3`` gets
dbm.gnu and dbm.ndbm from the ``python3-gdbm`` package (``.ci/run`` installs
it), so the shelve part of the suite reruns there, once per such dbm.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CANDIDATES = ["/usr/bin/python3"]


def _other_python() -> tuple[str, list[str]] | None:
    """A Python of the same minor version as this one, and its extra dbms."""
    for exe in CANDIDATES:
        if not os.path.exists(exe) or os.path.realpath(exe) == os.path.realpath(sys.executable):
            continue
        probe = (
            "import sys, importlib\n"
            "names = []\n"
            "for n in ('dbm.gnu', 'dbm.ndbm', 'dbm.sqlite3'):\n"
            "    try: importlib.import_module(n); names.append(n)\n"
            "    except ImportError: pass\n"
            "print(sys.version_info[:2] == tuple(map(int, sys.argv[1].split('.'))), ' '.join(names))\n"
        )
        done = subprocess.run(
            [exe, "-c", probe, f"{sys.version_info[0]}.{sys.version_info[1]}"], capture_output=True, text=True
        )
        if done.returncode == 0:
            same, _, names = done.stdout.strip().partition(" ")
            if same == "True" and names:
                return exe, names.split()
    return None


OTHER = _other_python()


@pytest.mark.skipif(OTHER is None, reason="no other Python with dbm.gnu or dbm.ndbm (apt-get install python3-gdbm)")
@pytest.mark.parametrize("dbm", OTHER[1] if OTHER else ["none"])
def test_shelve_suite_under_another_python(dbm: str, tmp_path: pathlib.Path) -> None:
    assert OTHER is not None
    exe = OTHER[0]
    # Same minor version, so this environment's packages (msgpack's compiled
    # part included) import there too.
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *site])
    env["SESSIONKIT_TEST_DBM"] = dbm
    done = subprocess.run(
        [exe, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_shelve.py", "tests/test_contract.py", "tests/test_processes.py", "tests/test_deployments.py",
         "-k", "shelve or not (memory or msgpack)",
         "--basetemp", str(tmp_path / "t")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    assert done.returncode == 0, f"{exe} with {dbm}:\n{tail}\n{done.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
