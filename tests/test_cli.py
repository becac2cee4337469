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

from sessionkit import CorruptSessionError, MsgpackFileStorage, RedisStorage, ShelveStorage
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
        assert "could not lock session 'chat:1' within 0.3 s" in one_line_error(done.stderr)
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
        for name in (f"msgpack:{tmp_path / 'm'}", f"shelve:{tmp_path / 'sub' / 's.db'}",
                     f"shelve:{tmp_path / 's.db'}"):
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
    assert "'chat:2'" in damaged[0] and "shard-000.log" in damaged[0]
    assert f"byte {target.offset}" in damaged[0]
    assert "1 problem" in done.stdout

    done = run("show", f"msgpack:{directory}", "chat:2")  # the damaged value: one line, exit 4
    assert done.returncode == EXIT_DAMAGED and "damaged" in one_line_error(done.stderr)
    done = run("show", f"msgpack:{directory}", "chat:1")  # the others still read
    assert done.returncode == EXIT_OK

    assert main(["rm", f"msgpack:{directory}", "chat:2"]) == EXIT_OK  # deleting it recovers the store
    code, out, _ = call(capsys, "check", f"msgpack:{directory}")
    assert code == EXIT_OK
    assert "NOTE" in out and "older record of session 'chat:2'" in out  # never read, until compacted


def test_check_finds_a_damaged_record_header_in_the_middle_of_a_log(tmp_path: pathlib.Path,
                                                                     capsys: Any) -> None:
    """A damaged header in the middle of a log: the shard cannot be read past it."""
    directory = tmp_path / "mp"
    storage = MsgpackFileStorage(directory, shards=1)
    for key, value in SESSIONS.items():
        storage.write(key, value)
    storage.close()
    log = directory / "shard-000.log"
    good = log.read_bytes()
    second = _records_of(log)[1]
    data = bytearray(good)
    data[second.offset + 2] ^= 0x01  # a damaged header in the middle: the shard cannot be read past it
    log.write_bytes(bytes(data))
    code, out, _ = call(capsys, "check", f"msgpack:{directory}")
    assert code == EXIT_PROBLEM
    assert f"shard-000.log is damaged at byte {second.offset}" in out
    code, _, err = call(capsys, "ls", f"msgpack:{directory}")
    assert code == EXIT_DAMAGED and "sessionkit check" in one_line_error(err)


@pytest.mark.parametrize("damage", ["flip", "cut1", "cut10", "cut30"])
def test_check_reports_a_damaged_or_cut_short_last_record_and_reads_change_nothing(
        damage: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """The last record of a log cut short or failing its checksum is reported (naming its session), and
    ls/show/stats refuse or count it without truncating the log, as opening the store would."""
    directory = tmp_path / "mp"
    fill(MsgpackFileStorage(directory, shards=1), {**SESSIONS, "chat:last": {"text": "y" * 60}})
    log = directory / "shard-000.log"
    data = bytearray(log.read_bytes())
    assert _records_of(log)[-1].key == "chat:last"
    if damage == "flip":
        data[-5] ^= 0xFF  # near the end of the last record: its body checksum fails
    else:
        del data[-int(damage[3:]):]
    log.write_bytes(bytes(data))
    size = len(data)
    name = f"msgpack:{directory}"

    code, out, _ = call(capsys, "check", name)
    assert code == EXIT_PROBLEM, out
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1, out
    assert "'chat:last'" in damaged[0] and "shard-000.log" in damaged[0]
    assert "the shard's index says the log was whole up to byte" in damaged[0]  # damage, not a crash
    assert ("fails its checksum" if damage == "flip" else "is cut short (") in damaged[0]
    assert "1 problem" in out

    for args in (("ls",), ("show", "chat:1")):  # they would open the log: they refuse instead
        code, outp, err = call(capsys, args[0], name, *args[1:])
        assert code == EXIT_DAMAGED and outp == "", (args, err)
        assert f"sessionkit check {name}" in one_line_error(err) and "'chat:last'" in err
    code, outp, _ = call(capsys, "stats", name, "--json")
    assert code == EXIT_OK and json.loads(outp)["damaged"] == 1
    assert log.stat().st_size == size  # nothing was truncated

    # The store's index says the record was whole once: a process using the store reports the
    # session (a crash would have left the index marked, and the tail would be dropped instead)
    storage = MsgpackFileStorage(directory)
    try:
        with pytest.raises(CorruptSessionError):
            storage.read("chat:last")
        assert storage.read("chat:1") == SESSIONS["chat:1"]
    finally:
        storage.close()
    assert log.stat().st_size == size if damage == "flip" else log.stat().st_size < size  # a cut tail goes
    assert call(capsys, "rm", name, "chat:last")[0] == EXIT_OK  # how the owner goes on without it
    assert call(capsys, "check", name)[0] == EXIT_OK


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
    assert "cannot be decoded: FormatError" in out  # the decoder's error has no message: its name, then
    code, _, err = call(capsys, "show", url, "broken")
    assert code == EXIT_DAMAGED and "decoded: FormatError (run:" in one_line_error(err)

    code, out, _ = call(capsys, "rm", url, "broken")
    assert code == EXIT_OK
    storage = RedisStorage(url=redis_server.url, prefix=f"cli-{os.getpid()}:")
    try:
        assert sorted(storage.keys()) == sorted(SESSIONS)
    finally:
        storage.close()


# -- shelf names: only a shelf's own files count -------------------------------------------------


def test_a_shelve_name_counts_only_its_own_files_and_creates_nothing(tmp_path: pathlib.Path,
                                                                     capsys: Any) -> None:
    """``store`` is not the shelf ``store.shelf`` (its files start with ``store.``), and a shelf's file
    named as the shelf is refused: no new shelf, no stray lock file."""
    fill(ShelveStorage(tmp_path / "store.shelf", dbm="dbm.dumb"), {"a": 1})
    before = sorted(os.listdir(tmp_path))
    assert before == ["store.shelf.dat", "store.shelf.dir", "store.shelf.lock"]

    code, out, err = call(capsys, "ls", f"shelve:{tmp_path / 'store'}")
    assert code == EXIT_STORE and out == ""
    assert "no shelf" in one_line_error(err) and f"did you mean shelve:{tmp_path / 'store.shelf'}" in err
    for end in (".dat", ".dir", ".lock"):
        code, out, err = call(capsys, "ls", f"shelve:{tmp_path / ('store.shelf' + end)}")
        assert code == EXIT_STORE and out == ""
        assert f"shelve:{tmp_path / 'store.shelf'}" in one_line_error(err) and "nothing was changed" in err
    code, _, err = call(capsys, "copy", f"shelve:{tmp_path / 'store.shelf.dat'}", f"msgpack:{tmp_path / 'm'}")
    assert code == EXIT_STORE, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing created: no store.dat, no store.shelf.dat.lock

    code, out, _ = call(capsys, "ls", f"shelve:{tmp_path / 'store.shelf'}")
    assert code == EXIT_OK and out.splitlines() == ["a"]
    code, _, err = call(capsys, "ls", f"shelve:{tmp_path / 'store.shelf'}?dbm=dbm.bogus")
    assert code == EXIT_USAGE and "unknown dbm 'dbm.bogus'" in one_line_error(err)


def test_shelf_files_are_the_exact_names_of_each_dbm(tmp_path: pathlib.Path) -> None:
    """dbm.dumb's NAME.dat/.dir/.bak, ndbm's NAME.db, a gdbm or SQLite file named NAME (with SQLite's
    -wal/-shm/-journal); never NAME.other.dat or a NAME that is no dbm file."""
    import sqlite3

    from sessionkit._stores import shelf_files

    for name in ("d.dat", "d.dir", "d.bak", "d.x.dat", "d.dat.lock", "n.db", "plain", "plain-wal"):
        (tmp_path / name).write_bytes(b"x" * 20)
    (tmp_path / "g").write_bytes((0x13579ACF).to_bytes(4, "little") + bytes(60))  # a gdbm file's magic
    sqlite3.connect(tmp_path / "q").execute("create table t (x)").connection.close()
    (tmp_path / "q-wal").write_bytes(b"")
    assert shelf_files(str(tmp_path / "d")) == [str(tmp_path / n) for n in ("d.bak", "d.dat", "d.dir")]
    assert shelf_files(str(tmp_path / "n")) == [str(tmp_path / "n.db")]
    assert shelf_files(str(tmp_path / "g")) == [str(tmp_path / "g")]
    assert shelf_files(str(tmp_path / "q")) == [str(tmp_path / "q"), str(tmp_path / "q-wal")]
    for other in ("plain", "d.da", "d.dat", "x"):
        assert shelf_files(str(tmp_path / other)) == [], other


def test_check_reports_a_damaged_shelf_index_as_damage(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A damaged dbm.dumb index (.dir) is DAMAGED, exit 1, not a store error."""
    path = tmp_path / "prefs.db"
    fill(ShelveStorage(path, dbm="dbm.dumb"), {"a": 1, "b": 2})
    (tmp_path / "prefs.db.dir").write_text("garbage(\n")
    code, out, _ = call(capsys, "check", f"shelve:{path}")
    assert code == EXIT_PROBLEM, out
    assert out.startswith("DAMAGED") and "prefs.db.dir" in out


# -- options and output ------------------------------------------------------------------------


def test_timeout_must_be_a_finite_number_of_seconds(mp: str) -> None:
    """``--timeout`` rejects negative, NaN and infinite values (exit 2)."""
    for bad in ("-1", "nan", "inf", "soon"):
        code = main(["rm", mp, "chat:1", "--timeout", bad])
        assert code == EXIT_USAGE, bad
        assert main(["copy", mp, mp + "-copy", "--timeout", bad]) == EXIT_USAGE


def test_copy_reports_a_locked_session_with_the_timeout_as_given(mp: str, tmp_path: pathlib.Path) -> None:
    """A session another process holds is reported with ``--timeout`` as written."""
    storage = MsgpackFileStorage(tmp_path / "mp")
    try:
        with storage.lock("chat:1"):
            done = run("copy", mp, f"msgpack:{tmp_path / 'dst'}", "chat:1*", "--timeout", "0.25")
    finally:
        storage.close()
    assert done.returncode == EXIT_PROBLEM, done.stderr
    assert "session 'chat:1' was not copied: could not lock it within 0.25 s" in one_line_error(done.stderr)
    assert "copied 1, already equal 0, not copied 1" in done.stdout


def test_show_json_never_prints_nan_or_infinity(tmp_path: pathlib.Path, capsys: Any) -> None:
    """NaN and infinities are shown as strings (the output stays JSON), with a note on stderr."""
    fill(MsgpackFileStorage(tmp_path / "m"), {"odd": {"a": float("nan"), "b": [float("inf"), -float("inf")]}})
    code, out, err = call(capsys, "show", f"msgpack:{tmp_path / 'm'}", "odd", "--json")
    assert code == EXIT_OK
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) == {
        "a": "NaN", "b": ["Infinity", "-Infinity"]}
    assert "NaN" in one_line_error(err) and "JSON" in err


def test_ls_prints_one_line_per_key_whatever_the_key_holds(tmp_path: pathlib.Path, capsys: Any) -> None:
    """A key with a line break (or a tab, or a leading quote) is printed as a string literal."""
    keys = ["plain", "two\nlines", "tab\there", "'quoted'", "ünï cödé"]
    fill(MsgpackFileStorage(tmp_path / "m"), {k: 1 for k in keys})
    code, out, _ = call(capsys, "ls", f"msgpack:{tmp_path / 'm'}")
    assert code == EXIT_OK
    assert out.splitlines() == ["\"'quoted'\"", "plain", "'tab\\there'", "'two\\nlines'", "ünï cödé"]
    code, out, _ = call(capsys, "ls", f"msgpack:{tmp_path / 'm'}", "--json")
    assert json.loads(out) == sorted(keys)


def test_a_copy_that_copies_nothing_leaves_no_new_destination(tmp_path: pathlib.Path, capsys: Any) -> None:
    """When every session fails, the destination the copy created is removed again."""
    import datetime

    fill(ShelveStorage(tmp_path / "s.db"), {"when": datetime.date(2024, 1, 2)})  # msgpack cannot hold it
    code, out, err = call(capsys, "copy", f"shelve:{tmp_path / 's.db'}", f"msgpack:{tmp_path / 'new' / 'm'}")
    assert code == EXIT_PROBLEM and "not copied 1" in out and "was not created" in out
    assert "session 'when' was not copied" in one_line_error(err)
    fill(MsgpackFileStorage(tmp_path / "bad", shards=1), {"k": 1})  # its one record damaged
    log = tmp_path / "bad" / "shard-000.log"
    data = bytearray(log.read_bytes())
    data[-1] ^= 0xFF
    log.write_bytes(bytes(data) + _records.build(b"other", b"\x01"))  # so it is not the log's last record
    code, out, err = call(capsys, "copy", f"msgpack:{tmp_path / 'bad'}",
                          f"shelve:{tmp_path / 'new2' / 'x.db'}", "k")
    assert code == EXIT_PROBLEM and "not copied 1" in out and "was not created" in out, out + err
    assert sorted(os.listdir(tmp_path)) == ["bad", "s.db.dat", "s.db.dir", "s.db.lock"]
    (tmp_path / "empty").mkdir()  # an existing empty directory stays, emptied again
    code, _, _ = call(capsys, "copy", f"shelve:{tmp_path / 's.db'}", f"msgpack:{tmp_path / 'empty'}")
    assert code == EXIT_PROBLEM
    assert os.listdir(tmp_path / "empty") == []


def test_copy_no_clobber_keeps_the_destination_s_values(mp: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    """Without --no-clobber the source's value wins; with it, a session the destination holds is kept."""
    dst = f"msgpack:{tmp_path / 'dst'}"
    fill(MsgpackFileStorage(tmp_path / "dst"), {"chat:1": "newer", "mine": 0})
    code, out, _ = call(capsys, "copy", mp, dst, "--no-clobber")
    assert code == EXIT_OK and "kept" in out and f"copied {len(SESSIONS) - 1}" in out
    assert contents(dst) == {**SESSIONS, "chat:1": "newer", "mine": 0}
    code, out, _ = call(capsys, "copy", mp, dst)
    assert code == EXIT_OK and "copied 1," in out
    assert contents(dst) == {**SESSIONS, "mine": 0}
    assert main(["copy", "--help"]) == EXIT_OK
    assert "--no-clobber" in capsys.readouterr().out


def test_copy_knows_one_redis_server_by_its_run_id(redis_server: Any, capsys: Any) -> None:
    """Two URLs of one server, database and prefix are the same store (refused at once, not after
    every key's lock timed out); a database that is no number, or given as db=, is a usage error."""
    pytest.importorskip("redis")
    storage = RedisStorage(url=redis_server.url, prefix="same:")
    try:
        storage.write("k", 1)
    finally:
        storage.close()
    port = redis_server.port
    code, _, err = call(capsys, "copy", f"redis://127.0.0.1:{port}/0?prefix=same:",
                        f"redis://localhost:{port}/0?prefix=same:", "--timeout", "5")
    assert code == EXIT_USAGE and "same store" in one_line_error(err) and "run_id" in err
    code, out, _ = call(capsys, "copy", f"redis://127.0.0.1:{port}/0?prefix=same:",
                        f"redis://localhost:{port}/0?prefix=other:")
    assert code == EXIT_OK and "copied 1" in out
    for bad, words in ((f"redis://127.0.0.1:{port}/abc", "must be a number"),
                       (f"redis://127.0.0.1:{port}?db=1", "not as db=")):
        code, _, err = call(capsys, "ls", bad)
        assert code == EXIT_USAGE and words in one_line_error(err), err


def test_a_redis_key_of_another_type_is_damage_not_a_store_error(mp: str, redis_server: Any,
                                                                 tmp_path: pathlib.Path, capsys: Any) -> None:
    """A list under the prefix: check reports it (exit 1), stats counts it, copy skips it and goes on,
    show refuses it, rm deletes it."""
    redis = pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{redis_server.port}/7?prefix=g{os.getpid()}:"
    assert main(["copy", mp, url]) == EXIT_OK
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=7)
    try:
        client.lpush(f"g{os.getpid()}:list", "x")
        capsys.readouterr()
        code, out, _ = call(capsys, "check", url)
        assert code == EXIT_PROBLEM, out
        damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
        assert len(damaged) == 1 and "'list'" in damaged[0] and "WRONGTYPE" in damaged[0]
        code, out, _ = call(capsys, "stats", url, "--json")
        assert code == EXIT_OK and json.loads(out)["damaged"] == 1
        assert json.loads(out)["sessions"] == len(SESSIONS)
        code, out, err = call(capsys, "copy", url, f"msgpack:{tmp_path / 'back'}")
        assert code == EXIT_PROBLEM and f"copied {len(SESSIONS)}" in out and "not copied 1" in out
        assert "session 'list' was not copied" in one_line_error(err) and "WRONGTYPE" in err
        assert contents(f"msgpack:{tmp_path / 'back'}") == SESSIONS
        code, _, err = call(capsys, "show", url, "list")
        assert code == EXIT_DAMAGED and "WRONGTYPE" in one_line_error(err)
        code, out, _ = call(capsys, "rm", url, "list")
        assert code == EXIT_OK and "removed 'list'" in out
        assert client.keys(f"*g{os.getpid()}:list*") == []  # gone, and no lock key left behind
        assert call(capsys, "check", url)[0] == EXIT_OK
    finally:
        client.flushdb()
        client.close()
