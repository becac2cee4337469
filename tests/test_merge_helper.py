"""Background merges made by a helper process (``sessionkit.storage._merge_helper``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sessionkit import MsgpackFileStorage
from sessionkit.storage import _merge_helper, _shard
from sessionkit.storage._shard import MERGER

from .helpers import deleted_files_open

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@pytest.fixture(autouse=True)
def helper_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONKIT_MERGES", "process")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _merge(storage: MsgpackFileStorage, key: str = "k") -> None:
    """Overwrite ``key`` (10 KB) until its shard's dead bytes pass the merge
    bound (not the bound at which the writer merges itself); wait for the merge."""
    shard = storage._locate(key)[0]
    with shard.mutex, shard:
        ident = shard.log_ident
    for i in range(_shard.SLACK // 10_000 + 20):
        storage.write(key, {"pad": "x" * 10_000, "i": i})
    assert MERGER.wait()
    with shard.mutex, shard:
        assert shard.log_ident != ident, "no merge replaced the log"


def _run(script: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, env={**os.environ, **env},
    )


def test_merges_are_made_by_a_helper_process(tmp_path: Path) -> None:
    """The merge thread hands the merge to a child process running
    ``_merge_helper``; the data comes through whole, and this process moves
    to the new files at its next call."""
    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    before = MERGER.helper.merges
    _merge(storage)
    assert MERGER.helper.merges > before
    pid = MERGER.helper.pid
    assert pid is not None and pid != os.getpid() and _alive(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"sessionkit.storage._merge_helper" in f.read()
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # our child
    assert storage.read("k")["i"] == _shard.SLACK // 10_000 + 19
    assert [p.name for p in (tmp_path / "store").iterdir() if ".merge" in p.name] == []
    storage.close()


def test_the_helper_ends_with_the_process_it_merges_for(tmp_path: Path) -> None:
    """Killed with -9, a process leaves no helper behind: the helper finds
    its stdin at end of file (or its parent gone) and exits."""
    script = """
        import sys, time
        from sessionkit import MsgpackFileStorage
        from sessionkit.storage._shard import MERGER, SLACK
        storage = MsgpackFileStorage(sys.argv[1], shards=1)
        for i in range(SLACK // 10_000 + 20):
            storage.write("k", {"pad": "x" * 10_000})
        assert MERGER.wait() and MERGER.helper.merges
        print(MERGER.helper.pid, flush=True)
        time.sleep(600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "store")],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        helper = int(proc.stdout.readline())  # type: ignore[union-attr]
        assert _alive(helper)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert _gone_within(helper, 10), "the helper outlived its process"


def test_a_forked_child_merges_with_a_helper_of_its_own(tmp_path: Path) -> None:
    """A store built before fork(): the child never talks to its parent's
    helper (their requests would mix), starts its own, and that one ends with
    the child; the parent's goes on serving the parent."""
    storage = MsgpackFileStorage(tmp_path / "store", shards=2)
    _merge(storage, "a")
    parents = MERGER.helper.pid
    assert parents is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read)
            assert MERGER.helper.pid is None
            _merge(storage, "b")
            os.write(write, f"{MERGER.helper.pid}\n".encode())
            code = 0 if MERGER.helper.pid not in (None, parents) else 2
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        childs = int(f.read().strip() or 0)
    assert os.waitpid(pid, 0)[1] == 0
    assert childs and childs != parents
    assert _gone_within(childs, 10), "the child's helper outlived the child"
    assert MERGER.helper.pid == parents and _alive(parents)
    merges = MERGER.helper.merges
    _merge(storage, "a")
    assert MERGER.helper.merges > merges and MERGER.helper.pid == parents
    assert storage.read("a")["i"] == storage.read("b")["i"] == _shard.SLACK // 10_000 + 19
    storage.close()


def test_a_helper_that_died_is_replaced_and_the_thread_merges_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    _merge(storage)
    first = MERGER.helper.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _gone_within(first, 10)
    monkeypatch.setattr(_merge_helper, "RETRY_AFTER", 3600.0)
    merges = MERGER.helper.merges
    with caplog.at_level(logging.WARNING, logger="sessionkit"):
        _merge(storage)  # made by the merge thread
    assert MERGER.helper.merges == merges and MERGER.helper.pid is None
    assert "the merge helper failed" in caplog.text
    MERGER.helper._retry_at = 0.0  # the retry time comes (for good: later tests use helpers too)
    _merge(storage)
    assert MERGER.helper.merges == merges + 1
    assert MERGER.helper.pid not in (None, first)
    assert storage.read("k")["i"] == _shard.SLACK // 10_000 + 19
    storage.close()


@pytest.mark.parametrize("executable", ["no-python", "exits", "mute"])
def test_without_a_helper_to_be_had_the_merge_thread_merges(tmp_path: Path, executable: str) -> None:
    """``sys.executable`` not a Python (an embedded interpreter's host
    program, which must never be run), one that exits at once, or one that
    never answers: the merge thread merges, and the writes never notice."""
    fake = tmp_path / "bin" / ("uwsgi" if executable == "no-python" else "python3")
    fake.parent.mkdir()
    fake.write_text({"no-python": "#!/bin/sh\ntouch \"$0.ran\"\n", "exits": "#!/bin/sh\nexit 1\n",
                     "mute": "#!/bin/sh\nexec sleep 30\n"}[executable])
    fake.chmod(0o755)
    script = """
        import logging, sys
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from sessionkit import MsgpackFileStorage
        from sessionkit.storage import _merge_helper
        from sessionkit.storage._shard import MERGER, SLACK
        _merge_helper.START_TIMEOUT = 1.0
        sys.executable = sys.argv[2]
        storage = MsgpackFileStorage(sys.argv[1], shards=1)
        shard = storage._shards[0]
        with shard.mutex, shard:
            ident = shard.log_ident
        for i in range(SLACK // 10_000 + 20):
            storage.write("k", {"pad": "x" * 10_000, "i": i})
        assert MERGER.wait()
        with shard.mutex, shard:
            assert shard.log_ident != ident, "no merge replaced the log"
        assert MERGER.helper.merges == 0 and MERGER.helper.pid is None
        assert storage.read("k")["i"] == SLACK // 10_000 + 19
        print("ok")
    """
    done = _run(script, str(tmp_path / "store"), str(fake))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert not Path(str(fake) + ".ran").exists()
    if executable == "no-python":
        assert "merge helper" not in done.stderr
    else:
        assert "the merge helper failed" in done.stderr


def test_sessionkit_merges_picks_where_merges_go(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SESSIONKIT_MERGES", "thread")
    assert _merge_helper.wanted() == "thread"
    for value in ("", "auto", "process", " Process "):
        monkeypatch.setenv("SESSIONKIT_MERGES", value)
        assert _merge_helper.wanted() == "process"
    monkeypatch.setenv("SESSIONKIT_MERGES", "threads")
    with caplog.at_level(logging.WARNING, logger="sessionkit"):
        assert _merge_helper.wanted() == "process"
        assert _merge_helper.wanted() == "process"
    assert caplog.text.count("'threads' is not one of auto, process, thread") == 1


def test_a_dead_helper_never_ends_an_application_that_restored_sigpipe(tmp_path: Path) -> None:
    """Command-line tools often restore SIGPIPE's default action, which ends
    the process on a write to a pipe nobody reads: asking a helper that died
    must be an error the merge thread handles, not the end of the process."""
    script = """
        import os, signal, sys, time
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from sessionkit import MsgpackFileStorage
        from sessionkit.storage._shard import MERGER, SLACK
        storage = MsgpackFileStorage(sys.argv[1], shards=1)
        def merge():
            for i in range(SLACK // 10_000 + 20):
                storage.write("k", {"pad": "x" * 10_000, "i": i})
            assert MERGER.wait()
        merge()
        helper = MERGER.helper.pid
        assert helper
        os.kill(helper, signal.SIGKILL)
        def running():
            with open(f"/proc/{helper}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        while running():  # dead, not yet waited for
            time.sleep(0.01)
        # A writer that asks before anything noticed the death (no answer read since):
        assert MERGER.helper.send("token", {"dir": sys.argv[1]}) is False
        merge()
        assert storage.read("k")["i"] == SLACK // 10_000 + 19
        print("ok")
    """
    done = _run(script, str(tmp_path / "store"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-3000:])


def test_a_store_made_again_at_the_same_path_is_merged_by_the_helper(tmp_path: Path) -> None:
    """The helper keeps a store open between requests: a store deleted and
    made again at that path is another store, and the helper merges that one."""
    import shutil

    path = tmp_path / "store"
    first = MsgpackFileStorage(path, shards=1)
    _merge(first)
    first.close()
    shutil.rmtree(path)
    again = MsgpackFileStorage(path, shards=1)
    merges = MERGER.helper.merges
    _merge(again)
    assert MERGER.helper.merges > merges
    assert again.read("k")["i"] == _shard.SLACK // 10_000 + 19
    again.close()


def test_a_sys_path_of_any_kind_starts_the_helper(tmp_path: Path) -> None:
    """Applications put ``pathlib.Path`` objects and relative folders in
    ``sys.path``; the helper is started with what of it can be passed on."""
    script = """
        import pathlib, sys
        sys.path.append(pathlib.Path("/opt/app/lib"))
        sys.path.insert(0, "relative/folder")
        from sessionkit import MsgpackFileStorage
        from sessionkit.storage._shard import MERGER, SLACK
        storage = MsgpackFileStorage(sys.argv[1], shards=1)
        for i in range(SLACK // 10_000 + 20):
            storage.write("k", {"pad": "x" * 10_000, "i": i})
        assert MERGER.wait() and MERGER.helper.merges > 0
        print("ok")
    """
    done = _run(script, str(tmp_path / "store"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_helper_running_other_code_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a deploy replaced sessionkit's files, a process that still runs
    the old code does not hand merges to a helper that would run the new."""
    MERGER.helper.stop()
    MERGER.helper._retry_at = 0.0
    monkeypatch.setattr(_merge_helper, "_FINGERPRINT", "the code this process imported before the deploy")
    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    try:
        with caplog.at_level(logging.WARNING, logger="sessionkit"):
            merges = MERGER.helper.merges
            _merge(storage)  # by the merge thread
        assert MERGER.helper.merges == merges and MERGER.helper.pid is None
        assert "its sessionkit files changed since this process imported them" in caplog.text
    finally:
        storage.close()
        MERGER.helper._retry_at = 0.0


def test_the_helper_keeps_no_log_open_that_another_process_merged_away(tmp_path: Path) -> None:
    """Between requests the helper holds none of a shard's files, so a merge
    by another process (here this one's own) frees the log it replaces at
    once, not when the helper next comes to that shard (or closes an idle store)."""
    directory = str(tmp_path / "store")
    storage = MsgpackFileStorage(directory, shards=1)
    _merge(storage)
    pid = MERGER.helper.pid
    assert pid is not None
    deadline = time.monotonic() + _shard.RETIRE_AFTER + 10
    while deleted_files_open(directory, pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # what the helper's own merge replaced, kept open a moment (Shard._retain)
    assert deleted_files_open(directory, pid) == []
    shard = storage._locate("k")[0]
    for i in range(20):
        storage.write("k", {"i": i})
    assert shard.merge(time.time(), force=True)  # this process replaces the files the helper merged to
    storage.read("k")
    assert deleted_files_open(directory, pid) == []
    assert deleted_files_open(directory, os.getpid()) == []
    _merge(storage)  # and the helper goes on merging the shard
    assert storage.read("k")["i"] == _shard.SLACK // 10_000 + 19
    storage.close()


def test_a_stalled_helper_on_a_nearly_full_disk_loses_no_write(tmp_path: Path) -> None:
    """A helper that gets no CPU (stopped here, starved on a busy machine)
    leaves the merges to the writers once the disk runs short of room for
    them: overwrites that fill a 4 MB disk several times over all succeed,
    and the merges free the space the old logs held."""
    from .helpers import tmpfs

    with tmpfs(tmp_path / "small", "4m") as mount:
        directory = str(mount / "store")
        storage = MsgpackFileStorage(directory, shards=1)
        _merge(storage)  # the helper has served this store: it knows the shard
        pid = MERGER.helper.pid
        assert pid is not None
        pad = "x" * 10_000
        for i in range(100):  # about 1 MB live
            storage.write(f"k{i}", {"pad": pad, "i": 0})
        os.kill(pid, signal.SIGSTOP)
        failed = []
        try:
            for i in range(1, 1_201):  # 12 MB of overwrites
                try:
                    storage.write(f"k{i % 100}", {"pad": pad, "i": i})
                except Exception as exc:  # noqa: BLE001 - counted, then shown
                    failed.append((i, repr(exc)))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert failed == [], f"{len(failed)} of 1,200 writes failed, the first: {failed[:1]}"
        assert storage.read("k7")["i"] == 1_107
        assert deleted_files_open(directory, os.getpid()) == []
        storage.close()

