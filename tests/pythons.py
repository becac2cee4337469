"""The other CPythons that tests/test_other_pythons.py reruns the shelve tests under.

Every CPython from 3.9 to 3.13 that pyenv keeps under ``$(pyenv root)/versions``
and the system's ``/usr/bin/python3`` (Debian's, with ``python3-gdbm``), less the
one running the tests.  Nothing is downloaded: only interpreters already on the
machine count.  Each gets a venv under ``.venvs/`` with ``-e '.[test]'``::

    python tests/pythons.py prepare    # what .ci/run does before the tests
    python tests/pythons.py list       # what was found, and what prepare made of it

``prepare`` writes ``.venvs/prepared.json``, naming every interpreter it found
and how its venv went, so that the tests can tell "never prepared" (they skip)
from "preparation failed" or "venv broken" (they fail).  It runs on the standard
library alone, before anything is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
MARKER = VENVS / "prepared.json"
PREPARE = "python tests/pythons.py prepare"
SUPPORTED = ((3, 9), (3, 13))  # the versions CI runs; setup.cfg says the same
SYSTEM_PYTHON = "/usr/bin/python3"
DBMS = ("dbm.dumb", "dbm.gnu", "dbm.ndbm", "dbm.sqlite3")
# The system Python is there for these (Debian's python3-gdbm package).
SYSTEM_DBMS = ("dbm.gnu", "dbm.ndbm")
RUNNER = os.path.realpath(sys.executable)

# Runs under any interpreter found, Python 2 included, so: no f-strings.
_PROBE = """\
import sys, platform
names = []
if sys.version_info >= (3,):
    import importlib
    for n in %r:
        try:
            importlib.import_module(n)
            names.append(n)
        except ImportError:
            pass
print(platform.python_implementation() + " " + platform.python_version() + " " + ",".join(names))
""" % (DBMS,)


@dataclass(frozen=True)
class Interpreter:
    exe: str  # as found
    real: str  # its realpath: the interpreter's identity
    version: str  # "3.12.1"
    tag: str  # names its venv: "pyenv-3.12.1", "system-3.11.2"
    dbms: tuple[str, ...]  # the dbm modules it has

    @property
    def minor(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def venv(self) -> Path:
        return VENVS / self.tag

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"


def pyenv_root() -> Path:
    try:
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def candidates() -> list[tuple[str, str]]:
    """(origin, executable) for every Python that may count."""
    found = [("pyenv", str(exe)) for exe in sorted((pyenv_root() / "versions").glob("*/bin/python"))]
    found.append(("system", SYSTEM_PYTHON))
    return found


def probe(exe: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(implementation, version, dbms) of ``exe``, or None if it does not run."""
    try:
        done = subprocess.run([exe, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) not in (2, 3):
        return None
    return parts[0], parts[1], tuple(parts[2].split(",")) if len(parts) == 3 else ()


def discover() -> list[Interpreter]:
    """Every CPython 3.9-3.13 on this machine, once each, oldest first (the runner included)."""
    seen: dict[str, Interpreter] = {}
    for origin, exe in candidates():
        if not os.path.exists(exe):
            continue
        real = os.path.realpath(exe)
        if real in seen:
            continue
        info = probe(exe)
        if info is None:
            continue
        implementation, version, dbms = info
        minor = tuple(int(n) for n in version.split(".")[:2])
        if implementation != "CPython" or not SUPPORTED[0] <= minor <= SUPPORTED[1]:
            continue
        name = Path(exe).parent.parent.name if origin == "pyenv" else version
        seen[real] = Interpreter(exe, real, version, f"{origin}-{name}", dbms)
    return sorted(seen.values(), key=lambda i: (i.minor, i.tag))


def others() -> list[Interpreter]:
    """The interpreters the tests rerun under: all but the one running them."""
    return [i for i in discover() if i.real != RUNNER]


def load_marker() -> dict[str, Any] | None:
    try:
        return json.loads(MARKER.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _write_marker(marker: dict[str, Any]) -> None:
    tmp = MARKER.with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, MARKER)


_CHECK = """\
import os, sys
import filelock, msgpack, pytest, sessionkit
where = os.path.realpath(sessionkit.__file__)
root = os.path.realpath(sys.argv[1])
if not where.startswith(root + os.sep):
    sys.exit("sessionkit imports from %s, not from %s" % (where, root))
"""


def check_python(py: str, real: str) -> str | None:
    """Why ``py`` (which should be ``real``) cannot rerun this checkout's tests, or None if it can."""
    if not os.path.exists(py):
        return f"{py} does not exist"
    if os.path.realpath(py) != real:
        return f"{py} is {os.path.realpath(py)}, not {real}"
    try:
        # from ROOT, as the reruns run
        done = subprocess.run(
            [py, "-c", _CHECK, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{py} does not run: {exc}"
    if done.returncode != 0:
        return f"{py} cannot import what the tests need:\n{done.stderr.strip()[-1500:]}"
    return None


def check_venv(interp: Interpreter) -> str | None:
    """Why ``interp``'s venv cannot rerun this checkout's tests, or None if it can."""
    return check_python(str(interp.venv_python), interp.real)


def _runs(py: Path) -> bool:
    try:
        return subprocess.run([str(py), "-c", "pass"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run(cmd: list[str], log: Any, timeout: float) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}")


def prepare_one(interp: Interpreter) -> dict[str, Any]:
    """Make (or bring up to date) ``interp``'s venv; what went wrong, if anything."""
    start = time.monotonic()
    log_path = VENVS / f"{interp.tag}.log"
    entry: dict[str, Any] = {**asdict(interp), "venv": str(interp.venv), "log": str(log_path)}
    with open(log_path, "w") as log:
        try:
            py = interp.venv_python
            if not py.exists() or os.path.realpath(py) != interp.real or not _runs(py):
                # missing, broken, or made by another interpreter: start afresh
                _run([interp.exe, "-m", "venv", "--clear", str(interp.venv)], log, timeout=600)
            _run([str(interp.venv_python), "-m", "pip", "install", "-e", ".[test]"], log, timeout=1200)
            problem = check_venv(interp)
            if problem is not None:
                raise RuntimeError(problem)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to report
            log.flush()
            tail = "\n".join(log_path.read_text().strip().splitlines()[-12:])
            entry.update(status="failed", error=f"{exc}\n--- last lines of {log_path}:\n{tail}")
        else:
            entry.update(status="ok")
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def prepare() -> int:
    VENVS.mkdir(exist_ok=True)
    (VENVS / ".gitignore").write_text("*\n")  # ignored even where the repo's .gitignore is not
    found = discover()
    marker: dict[str, Any] = {"runner": RUNNER, "finished": False, "interpreters": {}}
    for interp in found:
        status = "runner" if interp.real == RUNNER else "pending"
        marker["interpreters"][interp.real] = {**asdict(interp), "status": status}
    _write_marker(marker)  # before any work: a prepare that dies half-way shows as such
    failed = 0
    for interp in found:
        if interp.real == RUNNER:
            print(
                f"{interp.tag}: {interp.exe} runs this, so it needs no venv (the tests use it as it is)",
                flush=True,
            )
            continue
        print(f"{interp.tag}: {interp.exe} -> {interp.venv.relative_to(ROOT)} ...", end=" ", flush=True)
        entry = prepare_one(interp)
        marker["interpreters"][interp.real] = entry
        _write_marker(marker)
        if entry["status"] == "ok":
            print(f"ok ({entry['seconds']} s; dbms: {', '.join(interp.dbms)})", flush=True)
        else:
            failed += 1
            print(f"FAILED ({entry['seconds']} s)\n{entry['error']}", flush=True)
    # venvs of interpreters that are gone
    tags = {interp.tag for interp in found}
    for stale in VENVS.iterdir():
        if stale.is_dir() and stale.name not in tags:
            shutil.rmtree(stale, ignore_errors=True)
    marker["finished"] = True
    _write_marker(marker)
    if failed:
        print(f"WARNING: {failed} venv(s) could not be prepared; their tests will fail", file=sys.stderr)
    return 1 if failed else 0


def show() -> int:
    marker = load_marker() or {"interpreters": {}}
    for interp in discover():
        entry = marker["interpreters"].get(interp.real, {})
        status = entry.get("status", "not prepared") + (" (runs this)" if interp.real == RUNNER else "")
        print(f"{interp.tag:20} {interp.exe:40} {', '.join(interp.dbms):30} {status}")
    return 0


if __name__ == "__main__":
    commands = {"prepare": prepare, "list": show}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(commands)}}}")
    sys.exit(commands[sys.argv[1]]())
