"""The ``sessionkit`` admin command, run for real (a subprocess) and in-process (``main(argv)``)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from typing import Any

import pytest

from sessionkit import MsgpackFileStorage, RedisStorage, ShelveStorage
from sessionkit.cli import EXIT_DAMAGED, EXIT_OK, EXIT_PROBLEM, EXIT_STORE, EXIT_USAGE, main
from sessionkit.storage import _records

ROOT = pathlib.Path(__file__).resolve().parent.parent

SESSIONS = {
    "chat:1": {"count": 1, "langs": ["en", "de"]},
    "chat:2": {"count": 2, "blob": b"\x00\xff"},
    "chat:10": {"count": 10, "flag": True},
    "user:7": [1, 2.5, None, "x"],
    "": "the empty key",
}


def run(*args: str, cwd: Any = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m sessionkit ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "sessionkit", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


def call(capsys: Any, *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def fill(storage: Any, sessions: dict[str, Any] = SESSIONS) -> None:
    """Write ``sessions`` into ``storage``, then close it."""
    for key, value in sessions.items():
        storage.write(key, value)
    storage.close()


@pytest.fixture
def mp(tmp_path: pathlib.Path) -> str:
    """A msgpack store holding SESSIONS; its store name."""
    fill(MsgpackFileStorage(tmp_path / "mp"))
    return f"msgpack:{tmp_path / 'mp'}"


@pytest.fixture
def shelf(tmp_path: pathlib.Path) -> str:
    """A shelf holding SESSIONS; its store name."""
    fill(ShelveStorage(tmp_path / "sh" / "prefs.db"))
    return f"shelve:{tmp_path / 'sh' / 'prefs.db'}"


def contents(name: str) -> dict[str, Any]:
    """Every session of the msgpack or shelve store ``name``, read with the library."""
    kind, _, path = name.partition(":")
    storage = MsgpackFileStorage(path) if kind == "msgpack" else ShelveStorage(path)
    try:
        return dict(storage.items())
    finally:
        storage.close()


def one_line_error(err: str) -> str:
    """The one error line in ``err`` (asserting there is exactly one, and no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sessionkit"), err
    assert "Traceback" not in err
    return lines[0]


# -- every subcommand, on msgpack and shelve ------------------------------------------------


@pytest.fixture(params=["msgpack", "shelve"])
def store(request: Any) -> str:
    """Each disk store in turn, holding SESSIONS."""
    return str(request.getfixturevalue("mp" if request.param == "msgpack" else "shelf"))


def test_ls_lists_sorted_keys_and_filters_by_pattern(store: str, capsys: Any) -> None:
    """``ls`` prints the keys sorted; a pattern filters them; ``--json`` prints a list."""
    code, out, _ = call(capsys, "ls", store)
    assert code == EXIT_OK
    assert out.splitlines() == sorted(SESSIONS)
    code, out, _ = call(capsys, "ls", store, "chat:1*")
    assert out.splitlines() == ["chat:1", "chat:10"]
    code, out, _ = call(capsys, "ls", store, "nothing*", "--json")
    assert code == EXIT_OK and json.loads(out) == []


def test_show_pretty_and_json(store: str, capsys: Any) -> None:
    """``show`` pretty-prints a value, or prints it as JSON (bytes as base64)."""
    code, out, _ = call(capsys, "show", store, "chat:1")
    assert code == EXIT_OK
    assert out.strip() == "{'count': 1, 'langs': ['en', 'de']}"
    code, out, _ = call(capsys, "show", store, "chat:2", "--json")
    assert json.loads(out) == {"count": 2, "blob": {"$base64": "AP8="}}
    code, out, _ = call(capsys, "show", store, "")
    assert out.strip() == "'the empty key'"


def test_show_and_rm_of_a_missing_key_exit_1(store: str, capsys: Any) -> None:
    """A missing key is exit 1 with one line, or nothing at all with ``rm --force``."""
    code, out, err = call(capsys, "show", store, "chat:404")
    assert code == EXIT_PROBLEM and out == ""
    assert "no session 'chat:404'" in one_line_error(err)
    code, _, err = call(capsys, "rm", store, "chat:404")
    assert code == EXIT_PROBLEM and "no session" in one_line_error(err)
    code, _, err = call(capsys, "rm", store, "chat:404", "--force")
    assert code == EXIT_OK and err == ""


def test_rm_deletes_one_session(store: str, capsys: Any) -> None:
    """``rm`` deletes that session and no other."""
    code, out, _ = call(capsys, "rm", store, "chat:2")
    assert code == EXIT_OK and "removed session 'chat:2'" in out
    assert set(contents(store)) == set(SESSIONS) - {"chat:2"}


def test_rm_waits_for_a_session_another_process_has_open(mp: str, tmp_path: pathlib.Path) -> None:
    """``rm`` waits for the session's lock and gives up after ``--timeout`` (exit 3)."""
    storage = MsgpackFileStorage(tmp_path / "mp")
    try:
        with storage.lock("chat:1"):  # a handler in this process has the session open
            done = run("rm", mp, "chat:1", "--timeout", "0.3")
        assert done.returncode == EXIT_STORE
        assert "could not lock session 'chat:1'" in one_line_error(done.stderr)
        assert storage.read("chat:1") == SESSIONS["chat:1"]
    finally:
        storage.close()


def test_stats(store: str, capsys: Any) -> None:
    """``stats`` counts the sessions and the bytes."""
    code, out, _ = call(capsys, "stats", store, "--json")
    assert code == EXIT_OK
    stats = json.loads(out)
    assert stats["sessions"] == len(SESSIONS)
    assert stats["expired"] == 0 and stats["damaged"] == 0
    assert stats["bytes"] > 0
    code, out, _ = call(capsys, "stats", store)
    assert "sessions:" in out and "bytes:" in out


@pytest.mark.parametrize("kind", ["msgpack", "shelve"])
def test_purge_expired_and_stats_count_expired(kind: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """``stats`` counts expired sessions; ``purge-expired`` removes them."""
    clock = [1_000.0]
    if kind == "msgpack":
        storage: Any = MsgpackFileStorage(tmp_path / "s", ttl=10, clock=lambda: clock[0])
        name = f"msgpack:{tmp_path / 's'}"
    else:
        storage = ShelveStorage(tmp_path / "s.db", ttl=10, clock=lambda: clock[0])
        name = f"shelve:{tmp_path / 's.db'}"
    storage.write("old", 1)  # expired long ago by the real clock
    storage.close()
    fill(MsgpackFileStorage(tmp_path / "s") if kind == "msgpack" else ShelveStorage(tmp_path / "s.db"),
         {"new": 2})
    code, out, _ = call(capsys, "stats", name, "--json")
    assert json.loads(out)["expired"] == 1 and json.loads(out)["sessions"] == 1
    code, out, _ = call(capsys, "purge-expired", name)
    assert code == EXIT_OK and "purged 1 expired session" in out
    code, out, _ = call(capsys, "stats", name, "--json")
    assert json.loads(out)["expired"] == 0
    assert contents(name) == {"new": 2}


def test_check_a_healthy_store(store: str, capsys: Any) -> None:
    """``check`` on an undamaged store exits 0."""
    code, out, _ = call(capsys, "check", store)
    assert code == EXIT_OK
    assert f"checked {len(SESSIONS)} sessions" in out and "no damage" in out
    if store.startswith("shelve:"):
        assert call(capsys, "check", store, "--load")[0] == EXIT_OK  # every value unpickled too


def test_demo_runs_the_demo(capsys: Any) -> None:
    """``demo`` runs sessionkit.demo with its own arguments."""
    code, out, _ = call(capsys, "demo", "--threads", "2", "--updates", "20", "--chats", "2")
    assert code == EXIT_OK and "no update was lost" in out


# -- the real command ----------------------------------------------------------------------


def test_subprocess_end_to_end_on_a_bare_msgpack_directory(tmp_path: pathlib.Path) -> None:
    """The installed command takes the bare path of an existing msgpack store."""
    fill(MsgpackFileStorage(tmp_path / "sessions"))
    done = run("ls", "sessions", "chat:*", cwd=tmp_path)  # a bare path: an existing msgpack store
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.splitlines() == ["chat:1", "chat:10", "chat:2"]
    done = run("show", "msgpack:sessions", "chat:10", "--json", cwd=tmp_path)
    assert json.loads(done.stdout) == {"count": 10, "flag": True}


def test_help_of_every_command_documents_the_exit_codes() -> None:
    """``--help`` lists every command and the exit codes; every command has help."""
    done = run("--help")
    assert done.returncode == EXIT_OK
    for command in ("ls", "show", "rm", "stats", "purge-expired", "copy", "check", "demo"):
        assert command in done.stdout
    assert "exit codes:" in done.stdout and "3  store error" in done.stdout
    for command in ("ls", "show", "rm", "stats", "purge-expired", "copy", "check"):
        code = main([command, "--help"])
        assert code == EXIT_OK


def test_copy_help_reads_well(capsys: Any) -> None:
    """``copy --help`` says it resumes and how to turn off the bar."""
    assert main(["copy", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "usage: sessionkit copy [-h]" in out
    assert "resumes" in out and "--no-progress" in out and "exit codes:" in out


# -- errors: one line, the right exit code, nothing created ------------------------------------


def test_errors_are_one_line_with_documented_codes(tmp_path: pathlib.Path) -> None:
    """Each error is one line on stderr with its documented exit code, and creates nothing."""
    (tmp_path / "plain").mkdir()
    cases = [
        (("ls", "msgpack:missing"), EXIT_STORE, "no msgpack store"),
        (("ls", "shelve:missing.db"), EXIT_STORE, "no shelf"),
        (("ls", "plain"), EXIT_USAGE, "without a FORMAT file"),
        (("ls", "msgpack:plain"), EXIT_STORE, "not a msgpack store"),
        (("ls", "memory:"), EXIT_USAGE, "memory:"),
        (("ls", "ftp://x"), EXIT_USAGE, "unknown store kind"),
        (("ls", "redis://127.0.0.1:1/0?codec=xml"), EXIT_USAGE, "codec must be"),
        (("ls",), EXIT_USAGE, "required: STORE"),
        (("frobnicate",), EXIT_USAGE, "invalid choice"),
    ]
    for args, code, words in cases:
        done = run(*args, cwd=tmp_path)
        assert done.returncode == code, (args, done.stderr)
        assert words in one_line_error(done.stderr), (args, done.stderr)
        assert done.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["plain"]  # nothing was created
    assert os.listdir(tmp_path / "plain") == []


def test_no_command_creates_a_missing_store(tmp_path: pathlib.Path, capsys: Any) -> None:
    """No command creates a store that does not exist (copy's source included)."""
    for command in ("ls", "stats", "check", "purge-expired"):
        for name in (f"msgpack:{tmp_path / 'm'}", f"shelve:{tmp_path / 'sub' / 's.db'}", f"shelve:{tmp_path / 's.db'}"):
            code, _, err = call(capsys, command, name)
            assert code == EXIT_STORE, (command, name, err)
            one_line_error(err)
    code, _, err = call(capsys, "show", f"msgpack:{tmp_path / 'm'}", "k")
    assert code == EXIT_STORE
    code, _, err = call(capsys, "copy", f"msgpack:{tmp_path / 'm'}", f"shelve:{tmp_path / 's.db'}")
    assert code == EXIT_STORE and "no msgpack store" in err
    assert os.listdir(tmp_path) == []


def test_unreachable_redis_is_a_store_error(capsys: Any) -> None:
    """A Redis server that refuses the connection is exit 3 in one line."""
    pytest.importorskip("redis")
    code, _, err = call(capsys, "ls", "redis://127.0.0.1:1/0?prefix=bot:")
    assert code == EXIT_STORE and "cannot connect" in one_line_error(err)


def test_store_names_parse(tmp_path: pathlib.Path) -> None:
    """Store names: Redis options, cluster URLs, shelve's dbm, and the bad ones."""
    from sessionkit._stores import CliError, parse_store

    spec = parse_store("redis://:secret@127.0.0.1:6380/2?prefix=bot:a+b&codec=json&socket_timeout=5")
    assert (spec.kind, spec.prefix, spec.codec, spec.cluster) == ("redis", "bot:a+b", "json", False)
    assert spec.url == "redis://:secret@127.0.0.1:6380/2?socket_timeout=5"
    assert "secret" not in spec.name
    spec = parse_store("rediss+cluster://node1:7000?prefix=p:")
    assert (spec.url, spec.cluster, spec.prefix) == ("rediss://node1:7000", True, "p:")
    spec = parse_store(f"shelve:{tmp_path / 'p.db'}?dbm=dbm.dumb")
    assert (spec.kind, spec.path, spec.dbm) == ("shelve", str(tmp_path / "p.db"), "dbm.dumb")
    for bad in ("msgpack:", "shelve:", "shelve:x.db?mode=r", "redis+cluster://h:1/3", "redis://h:1?prefix=a&prefix=b"):
        with pytest.raises(CliError) as info:
            parse_store(bad)
        assert info.value.code == EXIT_USAGE


# -- damage ------------------------------------------------------------------------------------


def _records_of(path: pathlib.Path) -> list[Any]:
    """The records of a shard log, as the store parses them."""
    data = path.read_bytes()
    return _records.parse(data[len(_records.MAGIC):], len(_records.MAGIC))[0]


def test_check_finds_a_damaged_msgpack_record(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A flipped byte in a record's value: check names the key, file and byte; exit 1."""
    directory = tmp_path / "mp"
    storage = MsgpackFileStorage(directory, shards=1)
    for key, value in SESSIONS.items():
        storage.write(key, value)
    storage.close()
    log = directory / "shard-000.log"
    target = next(r for r in _records_of(log) if r.key == "chat:2")
    data = bytearray(log.read_bytes())
    data[target.offset + target.length - 1] ^= 0xFF  # a bit flip in the value: its body checksum fails
    log.write_bytes(bytes(data))

    done = run("check", f"msgpack:{directory}")
    assert done.returncode == EXIT_PROBLEM, done.stdout + done.stderr
    damaged = [line for line in done.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1
    assert "'chat:2'" in damaged[0] and "shard-000.log" in damaged[0] and f"byte {target.offset}" in damaged[0]
    assert "1 problem" in done.stdout

    done = run("show", f"msgpack:{directory}", "chat:2")  # the damaged value: one line, exit 4
    assert done.returncode == EXIT_DAMAGED and "damaged" in one_line_error(done.stderr)
    done = run("show", f"msgpack:{directory}", "chat:1")  # the others still read
    assert done.returncode == EXIT_OK

    assert main(["rm", f"msgpack:{directory}", "chat:2"]) == EXIT_OK  # deleting it recovers the store
    code, out, _ = call(capsys, "check", f"msgpack:{directory}")
    assert code == EXIT_OK
    assert "NOTE" in out and "older record of session 'chat:2'" in out  # never read, until compacted


def test_check_finds_a_damaged_record_header_and_truncation_is_a_crashed_tail(tmp_path: pathlib.Path,
                                                                              capsys: Any) -> None:
    """A torn tail is no damage; a damaged header in the middle of a log is."""
    directory = tmp_path / "mp"
    storage = MsgpackFileStorage(directory, shards=1)
    for key, value in SESSIONS.items():
        storage.write(key, value)
    storage.close()
    log = directory / "shard-000.log"
    good = log.read_bytes()
    log.write_bytes(good[:-3])  # a record cut short at the end: a crashed append, not damage
    code, out, _ = call(capsys, "check", f"msgpack:{directory}")
    assert code == EXIT_OK, out

    second = _records_of(log)[1]
    data = bytearray(good)
    data[second.offset + 2] ^= 0x01  # a damaged header in the middle: the shard cannot be read past it
    log.write_bytes(bytes(data))
    code, out, _ = call(capsys, "check", f"msgpack:{directory}")
    assert code == EXIT_PROBLEM
    assert f"shard-000.log is damaged at byte {second.offset}" in out
    code, _, err = call(capsys, "ls", f"msgpack:{directory}")
    assert code == EXIT_DAMAGED and "sessionkit check" in one_line_error(err)


def test_check_finds_a_damaged_shelf_value(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A changed byte in a framed shelf value fails its checksum: check names the key."""
    path = tmp_path / "prefs.db"
    fill(ShelveStorage(path), {"good": {"a": 1}, "bad": {"marker": "QQQQQQQQQQ"}})
    dat = tmp_path / "prefs.db.dat"  # dbm.dumb: the framed values
    data = bytearray(dat.read_bytes())
    data[data.index(b"QQQQQQQQQQ") + 3] = ord("R")
    dat.write_bytes(bytes(data))

    code, out, _ = call(capsys, "check", f"shelve:{path}")
    assert code == EXIT_PROBLEM
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "'bad'" in damaged[0] and "checksum" in damaged[0]
    code, _, err = call(capsys, "show", f"shelve:{path}", "bad")
    assert code == EXIT_DAMAGED and "checksum" in one_line_error(err)
    code, out, _ = call(capsys, "rm", f"shelve:{path}", "bad")
    assert code == EXIT_OK and "removed damaged session" in out
    assert call(capsys, "check", f"shelve:{path}")[0] == EXIT_OK


# -- copy ----------------------------------------------------------------------------------------


def test_copy_msgpack_to_shelve_and_back_then_rerun_is_a_no_op(mp: str, tmp_path: pathlib.Path,
                                                               capsys: Any) -> None:
    """msgpack -> shelve -> msgpack keeps every value; a rerun copies nothing."""
    shelf = f"shelve:{tmp_path / 'new' / 'prefs.db'}"
    back = f"msgpack:{tmp_path / 'back'}"
    code, out, _ = call(capsys, "copy", mp, shelf)
    assert code == EXIT_OK and f"copied {len(SESSIONS)}, already equal 0" in out
    assert contents(shelf) == SESSIONS
    code, out, _ = call(capsys, "copy", mp, shelf)
    assert code == EXIT_OK and f"copied 0, already equal {len(SESSIONS)}" in out

    code, out, _ = call(capsys, "copy", shelf, back)
    assert code == EXIT_OK and f"copied {len(SESSIONS)}" in out
    assert contents(back) == SESSIONS
    code, out, _ = call(capsys, "copy", shelf, back)
    assert f"copied 0, already equal {len(SESSIONS)}" in out

    # a changed value is copied again; True is not taken for the 1 it equals
    storage = MsgpackFileStorage(tmp_path / "mp")
    storage.write("chat:10", {"count": 10, "flag": 1})
    storage.close()
    code, out, _ = call(capsys, "copy", mp, back)
    assert f"copied 1, already equal {len(SESSIONS) - 1}" in out
    assert contents(back)["chat:10"] == {"count": 10, "flag": 1}


def test_an_interrupted_copy_resumes(mp: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """A copy that got only some sessions across is finished by the next run."""
    dst = f"shelve:{tmp_path / 'dst.db'}"
    code, out, _ = call(capsys, "copy", mp, dst, "chat:*")  # as if stopped after the chat: keys
    assert "copied 3, already equal 0" in out
    code, out, _ = call(capsys, "copy", mp, dst)
    assert code == EXIT_OK and f"copied {len(SESSIONS) - 3}, already equal 3" in out
    assert contents(dst) == SESSIONS


def test_a_killed_copy_resumes(tmp_path: pathlib.Path) -> None:
    """A copy killed with SIGKILL midway is finished by the next run, skipping what it copied."""
    many = {f"k{i:05d}": {"n": i, "text": "x" * 100} for i in range(3000)}
    fill(MsgpackFileStorage(tmp_path / "src"), many)
    src, dst = f"msgpack:{tmp_path / 'src'}", f"shelve:{tmp_path / 'dst.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sessionkit", "copy", src, dst, "--progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    seen = b""
    counts = [0]
    while counts[-1] < 2:  # the bar is redrawn every 0.1 s: kill the copy at its second drawing
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        counts = [int(n) for n in re.findall(rb"(\d+)/3000", seen)] or [0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    killed = proc.returncode == -signal.SIGKILL and counts[-1] < 3000

    done = run("copy", src, dst)
    assert done.returncode == EXIT_OK, done.stderr
    copied, equal = (int(n.rstrip(",")) for n in done.stdout.split()[1:5:3])
    assert copied + equal == 3000
    if killed:  # what the first run copied is skipped, the rest copied now
        assert equal >= counts[-1] > 0
    assert contents(dst) == many
    assert run("copy", src, dst).stdout.startswith("copied 0, already equal 3000")


def test_copy_reports_sessions_it_cannot_copy(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A value the destination cannot hold is reported and skipped: exit 1."""
    import datetime

    fill(ShelveStorage(tmp_path / "s.db"), {"plain": 1, "when": datetime.date(2024, 1, 2)})
    code, out, err = call(capsys, "copy", f"shelve:{tmp_path / 's.db'}", f"msgpack:{tmp_path / 'm'}")
    assert code == EXIT_PROBLEM
    assert "copied 1, already equal 0, not copied 1" in out
    assert "session 'when' was not copied" in one_line_error(err)


def test_copy_refuses_the_same_store_and_a_foreign_directory(mp: str, tmp_path: pathlib.Path,
                                                             capsys: Any) -> None:
    """copy refuses a store onto itself, and a non-empty directory that is not a store."""
    code, _, err = call(capsys, "copy", mp, str(tmp_path / "mp"))
    assert code == EXIT_USAGE and "same store" in one_line_error(err)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    code, _, err = call(capsys, "copy", mp, f"msgpack:{tmp_path / 'home'}")
    assert code == EXIT_STORE and "not empty" in one_line_error(err)
    assert os.listdir(tmp_path / "home") == ["notes.txt"]


def test_copy_draws_a_progress_bar_only_on_a_terminal(mp: str, tmp_path: pathlib.Path, monkeypatch: Any,
                                                      capsys: Any) -> None:
    """The progress bar is drawn on a terminal only, unless ``--no-progress``."""
    class Terminal(io.StringIO):
        """A stderr that says it is a terminal."""
        def isatty(self) -> bool:
            """Always a terminal."""
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["copy", mp, f"msgpack:{tmp_path / 'a'}"]) == EXIT_OK
    assert f"{len(SESSIONS)}/{len(SESSIONS)} 100%" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")
    terminal.seek(0)
    terminal.truncate()
    assert main(["copy", mp, f"msgpack:{tmp_path / 'b'}", "--no-progress"]) == EXIT_OK
    assert terminal.getvalue() == ""
    plain = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", plain)
    assert main(["copy", mp, f"msgpack:{tmp_path / 'c'}"]) == EXIT_OK
    assert plain.getvalue() == ""
    capsys.readouterr()


# -- Redis ----------------------------------------------------------------------------------------


def test_copy_msgpack_to_redis_then_ls_show_stats_check(mp: str, redis_server: Any, capsys: Any) -> None:
    """Copy into Redis, then every command on the Redis store."""
    redis = pytest.importorskip("redis")
    url = f"{redis_server.url}?prefix=cli-{os.getpid()}:"
    code, out, _ = call(capsys, "copy", mp, url)
    assert code == EXIT_OK and f"copied {len(SESSIONS)}" in out
    code, out, _ = call(capsys, "copy", mp, url)
    assert f"copied 0, already equal {len(SESSIONS)}" in out

    done = run("ls", url, "chat:*")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.splitlines() == ["chat:1", "chat:10", "chat:2"]
    done = run("show", url, "chat:1", "--json")
    assert json.loads(done.stdout) == SESSIONS["chat:1"]

    code, out, _ = call(capsys, "stats", url, "--json")
    assert json.loads(out)["sessions"] == len(SESSIONS)
    code, out, _ = call(capsys, "purge-expired", url)
    assert code == EXIT_OK and "Redis deletes expired keys itself" in out

    client = redis.Redis.from_url(redis_server.url)
    client.set(f"cli-{os.getpid()}:broken", b"\xc1")  # not msgpack
    client.close()
    code, out, _ = call(capsys, "check", url)
    assert code == EXIT_PROBLEM and "DAMAGED  session 'broken'" in out

    code, out, _ = call(capsys, "rm", url, "broken")
    assert code == EXIT_OK
    storage = RedisStorage(url=redis_server.url, prefix=f"cli-{os.getpid()}:")
    try:
        assert sorted(storage.keys()) == sorted(SESSIONS)
    finally:
        storage.close()
