"""Background merges made by a helper process, off the GIL of the process that serves requests.

A merge of a shard (see ``_shard.Shard.merge``) is Python work: milliseconds
for a shard of a few megabytes.  Made by a thread of the serving process, it
shares that process's GIL, and a request that runs meanwhile waits for the
GIL at each of its system calls, then for the kernel to wake it: on a
machine with a core to spare, that is most of a request's tail latency.  So
a writer that finds a merge due asks a helper instead: a child process,
started with the first request, that opens the same store and merges the
shard there.  The writer, once out of the shard's section, only sends the
request; answers are collected by later requests (and by
``_shard.Merger.wait``), so no thread of the serving process waits for the
helper or wakes when it answers.  The writer moves to the merged files at
its next call on that shard, as it does after any other process's merge.

The protocol between the two is private to this module: one JSON message
each way per request, over a ``SOCK_SEQPACKET`` socket pair that is the
helper's stdin and stdout (a message is sent whole or not at all, and a
peer that died is an error, never a ``SIGPIPE`` that would end an
application that restored its default action).

The helper is started as ``python -c <code> <parent pid> <parent's sys.path,
as JSON> <parent's code fingerprint>``.

* helper → parent, once started: ``{"ready": pid, "module": path, "code":
  fingerprint}``; a helper whose fingerprint is not the parent's (the
  package's files changed since the parent imported them) then ends, and
  the parent gives it up;
* parent → helper: ``{"dir": directory, "ident": [dev, ino], "shard": n,
  "durable": bool, "skew": seconds, "slack": bytes}``;
* helper → parent: ``{"merged": bool}`` or ``{"error": message}``;
* parent → helper: ``{"dir": ..., "ident": ..., "shard": n, "durable": bool,
  "verify": [dev, ino]}``: check the shard's index against its counters if
  it is still that file (a large one, mapped unchecked; see
  ``_shard.Shard._use``), and index the log anew if it fails;
* helper → parent: ``{"why": reason or ""}`` or ``{"error": message}``.

The helper keeps a store open while merges of it come, and closes it after
``IDLE`` seconds without one; a shard's log and index it closes after each
request, so a log that another process's merge replaces meanwhile is freed
at once.  It opens only a store that exists, and one made again at the
same path is another store to it.  It ends when its end
of the socket closes, that is when the parent has exited (or stopped it),
or when it finds its parent changed.  A forked child does not share its
parent's helper: it closes its copy of the socket and starts its own when
it needs one.

Where no helper can be had (no Python executable to start: an embedded
interpreter; a helper that does not answer, or that died), the process's
merge thread merges, as it does when ``SESSIONKIT_MERGES=thread``, and a
helper is tried again ``RETRY_AFTER`` seconds later.  A helper's death costs
nothing but that: merges are safe to kill at any point, and the requests it
had not answered go to the thread.
"""

from __future__ import annotations

import collections
import json
import logging
import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from ..errors import StorageError

log = logging.getLogger("sessionkit")

ENV = "SESSIONKIT_MERGES"  # "auto" (the default: a helper where one can be started), "process", "thread"
START_TIMEOUT = 30.0  # seconds a new helper has to say it is ready
REPLY_TIMEOUT = 30.0  # seconds a request may wait for its answer before the helper is given up for stuck
RETRY_AFTER = 60.0  # seconds after a helper failed before another is started
IDLE = 5.0  # seconds without a merge of a store after which the helper closes it
_MESSAGE = 1 << 16  # the longest message either side reads
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _code_fingerprint() -> str:
    """Which sessionkit code this process runs: the size and time of every
    module file of the package, as they were when this module was imported.
    A helper started after a deploy replaced the files runs other code, and
    is not used (its protocol or its file formats may differ)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    marks = []
    for folder, _, names in sorted(os.walk(package)):
        for name in sorted(names):
            if name.endswith((".py", ".pyc")) and "__pycache__" not in folder:
                try:
                    st = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                marks.append(f"{os.path.relpath(os.path.join(folder, name), package)}:{st.st_size}:{st.st_mtime_ns}")
    where = package
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # imported from an archive: the archive's size and time
    if os.path.isfile(where):
        st = os.stat(where)
        marks.append(f"{where}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(marks).encode()).hexdigest()[:32]


_FINGERPRINT = _code_fingerprint()


_warned: set[str] = set()


def _warn_once(message: str, *args: Any) -> None:
    text = message % args
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


def wanted() -> str:
    """``"process"`` or ``"thread"``: where this process's background merges
    go, by ``SESSIONKIT_MERGES``: ``thread``; ``process`` or ``auto`` (the
    default): a helper process where one can be started (a POSIX system, and
    ``sys.executable`` a Python interpreter), else a thread.  Any other value
    is warned about once and taken as ``auto``."""
    asked = (os.environ.get(ENV, ""), sys.executable)
    if asked == _wanted[0]:
        return _wanted[1]  # (asked at every merge request: the answer to the same question is kept)
    found = _wanted_for(asked[0])
    _wanted[:] = [asked, found]
    return found


# The last (SESSIONKIT_MERGES, sys.executable) looked at, and what it meant.
_wanted: list[Any] = [None, ""]


def _wanted_for(given: str) -> str:
    value = given.strip().lower() or "auto"
    if value == "thread":
        return "thread"
    if value not in ("auto", "process"):
        _warn_once("sessionkit: %s=%r is not one of auto, process, thread; taken as auto", ENV, value)
    if os.name != "posix" or not _python_executable():
        if value == "process":
            _warn_once("sessionkit: %s=process, but there is no Python executable to start; merging in a thread", ENV)
        return "thread"
    return "process"


_checked: dict[str, str | None] = {}


_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*[a-z]?(\.exe)?", re.IGNORECASE)  # python3.11, pypy3, python3.13t


def _python_executable() -> str | None:
    """The interpreter to start the helper with, if this process runs one
    that can be started (not an embedded or frozen one: ``sys.executable``
    may then be the host program, which must never be run with our
    arguments)."""
    exe = sys.executable
    if exe in _checked:
        return _checked[exe]
    found = None
    if exe and not getattr(sys, "frozen", False) and os.path.isfile(exe) and os.access(exe, os.X_OK):
        found = exe if _PYTHON_NAME.fullmatch(os.path.basename(exe)) else None
    _checked[exe] = found
    return found


class Helper:
    """The parent's side: the helper process, started with the first request.

    Requests are sent without waiting and answered in order; the caller
    collects answers with :meth:`poll`, which never blocks.  So a request
    costs the thread that makes it (a writer, after its section) one
    ``send`` and nothing else: no thread of this process waits
    for the helper, and none takes the GIL when it answers.

    Not thread-safe: ``_shard.Merger`` calls it under its mutex, and its
    fork hook calls :meth:`forget`."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._started = 0.0
        self._asked: collections.deque[tuple[Any, float]] = collections.deque()  # (token, when sent), oldest first
        self._retry_at = 0.0
        self._answered = 0.0  # when the last answer came
        self._reaping: list[subprocess.Popen[bytes]] = []  # helpers given up, killed, not yet waited for
        self.merges = 0  # merges the helper made (for tests and benchmarks)
        self.pid: int | None = None  # the helper's, while it runs

    def usable(self) -> bool:
        """Whether requests go to a helper (``SESSIONKIT_MERGES``, and no recent failure)."""
        return (self._proc is not None or time.monotonic() >= self._retry_at) and wanted() == "process"

    def asked(self) -> list[Any]:
        """The tokens of the requests not answered yet, oldest first."""
        return [token for token, _ in self._asked]

    def is_asked(self, token: Any) -> bool:
        """Whether a request with ``token`` is not answered yet."""
        for asked, _ in self._asked:
            if asked == token:
                return True
        return False

    def send(self, token: Any, request: dict[str, Any] | bytes) -> bool:
        """Write ``request`` (or its JSON, encoded) for the helper (started
        if need be); ``token`` comes back from :meth:`poll` with the answer.
        False if it was not sent: no helper to be had, or its socket full."""
        message = request if isinstance(request, bytes) else json.dumps(request).encode()
        try:
            if self._sock is None:
                self._start()
            assert self._sock is not None
            self._sock.send(message, _NOSIGNAL)
        except BlockingIOError:
            return False
        except Exception as exc:  # noqa: BLE001 - OSError, SubprocessError, a sys.path Popen refuses...
            self._fail(f"cannot ask it: {exc}")
            return False
        self._asked.append((token, time.monotonic()))
        return True

    def poll(self) -> tuple[list[tuple[Any, dict[str, Any]]], list[Any]]:
        """``(answered, failed)``: the requests answered since the last call,
        each as ``(token, answer)``, and those that never will be (the
        helper failed: it is stopped, and not started again for
        ``RETRY_AFTER`` seconds)."""
        answered: list[tuple[Any, dict[str, Any]]] = []
        self._reap()
        sock = self._sock
        if sock is None:
            return answered, []
        try:
            while True:
                try:
                    line = sock.recv(_MESSAGE)
                except BlockingIOError:
                    break
                if not line:
                    raise HelperUnavailable("it exited")
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise HelperUnavailable(f"unexpected answer {line[:200]!r}")
                if not self._ready:
                    here = os.path.abspath(__file__)
                    if reply.get("module") != here:
                        raise HelperUnavailable(f"it imported {reply.get('module')!r}, not {here!r}")
                    if reply.get("code") != _FINGERPRINT:
                        raise HelperUnavailable("its sessionkit files changed since this process imported them")
                    self._ready = True
                    self.pid = int(reply["ready"])
                    continue
                if not self._asked:
                    raise HelperUnavailable(f"an answer to no request: {line[:200]!r}")
                token = self._asked.popleft()[0]
                self._answered = time.monotonic()  # (answers come in order: the next one's wait starts now)
                self.merges += bool(reply.get("merged"))
                answered.append((token, reply))
            now = time.monotonic()
            if not self._ready and now - self._started > START_TIMEOUT:
                raise HelperUnavailable(f"not ready in {START_TIMEOUT:.0f} s")
            if self._asked and now - max(self._asked[0][1], self._answered) > REPLY_TIMEOUT:
                raise HelperUnavailable(f"no answer in {REPLY_TIMEOUT:.0f} s")
        except (OSError, ValueError, HelperUnavailable) as exc:
            return answered, self._fail(str(exc))
        return answered, []

    def give_up(self, why: str) -> None:
        """Give the helper up (see :meth:`_fail`), dropping what it was asked."""
        if self._proc is not None:
            self._fail(why)

    def _fail(self, why: str) -> list[Any]:
        """Give the helper up (killed, not waited for: the caller may be a
        writer); returns the tokens it will never answer."""
        failed = self.asked()
        proc = self._proc
        self._drop()
        if proc is not None:
            try:
                proc.kill()
            except OSError:
                pass
            self._reaping.append(proc)
        self._retry_at = time.monotonic() + RETRY_AFTER
        log.warning("sessionkit: the merge helper failed (%s); merging in a thread for %.0f s", why, RETRY_AFTER)
        return failed

    def _start(self) -> None:
        exe = _python_executable()
        if exe is None:
            raise HelperUnavailable("no Python executable to start")
        # The same modules as ours, found in the same order: our sys.path (an
        # application may have changed it; "" is our working directory, and
        # the helper's is "/"), then the folder this sessionkit came from.
        code = (
            "import json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
            "from sessionkit.storage._merge_helper import main; main()"
        )
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [os.path.abspath(p) for p in sys.path if isinstance(p, str) and "\0" not in p] + [package]
        env = dict(os.environ)
        env[ENV] = "thread"  # the helper merges in its own main thread; it starts no helper of its own
        self._started = time.monotonic()  # (nothing is asked, nor ready: see _drop)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [exe, "-c", code, str(os.getpid()), json.dumps(paths), _FINGERPRINT],
                stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.DEVNULL,
                close_fds=True, env=env, cwd="/",
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        self._sock = mine
        if "multiprocessing" in sys.modules:
            # A multiprocessing child ends with os._exit, which runs no atexit
            # hook but does run multiprocessing's finalizers: stop the helper
            # there too, so that this process reaps it rather than init.
            from multiprocessing import util

            util.Finalize(None, self.stop, exitpriority=0)

    def _drop(self) -> None:
        self._proc = self.pid = None
        sock, self._sock = self._sock, None
        self._asked.clear()
        self._ready = False
        if sock is not None:
            sock.close()  # the helper's end of the socket closes: it exits (after a merge under way)

    def _reap(self) -> None:
        """Wait for the helpers given up that have ended (no zombie is left)."""
        if self._reaping:
            self._reaping = [proc for proc in self._reaping if proc.poll() is None]

    def stop(self, wait: float = 0.5) -> None:
        """Stop the helper: its socket closes, and it exits once a merge
        under way is done; waits up to ``wait`` seconds for that (so that
        the parent, not init, reaps it), never kills it."""
        proc = self._proc
        self._drop()
        for ended in [*self._reaping, *([proc] if proc is not None else [])]:
            try:
                ended.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self._reaping = []

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's pipes (the helper is the parent's)."""
        proc = self._proc
        self._drop()  # this process's copy of the socket only: the parent's helper goes on
        self._retry_at = 0.0
        for theirs in [*self._reaping, *([proc] if proc is not None else [])]:
            theirs.returncode = 0  # the parent's children: never waited for here
        self._reaping = []


class HelperUnavailable(Exception):
    """The helper failed (internal to :meth:`Helper.poll`)."""


def _open(stores: dict[str, Any], request: dict[str, Any]) -> Any:
    """The helper's storage on the request's store (the directory's device
    and inode are ``request["ident"]``), opened if need be, never created."""
    from .msgpack_file import FORMAT_FILE, _ExistingStore

    directory = request["dir"]
    storage = stores.get(directory)
    if storage is not None:
        if list(storage._state.ident[1:3]) == request["ident"]:
            return storage
        stores.pop(directory).close()  # that store is gone: the path names another now
    if not os.path.exists(os.path.join(directory, FORMAT_FILE)):  # (before any file is opened, or made)
        raise StorageError(f"{directory} holds no store any more", path=directory)
    storage = _ExistingStore(directory)
    if list(storage._state.ident[1:3]) != request["ident"]:
        storage.close()
        raise StorageError(f"{directory} is another store now", path=directory)
    stores[directory] = storage
    return storage


def _serve(request: dict[str, Any], stores: dict[str, Any], used: dict[str, float]) -> dict[str, Any]:
    """The answer to one request (an error, as a message, rather than an exception)."""
    try:
        try:
            return _serve_once(request, stores, used)
        except StorageError:
            cached = stores.pop(request["dir"], None)
            if cached is None:
                raise
            cached.close()  # a store whose files were replaced under the same folder, say: opened anew, once
            return _serve_once(request, stores, used)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, whose write goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _serve_once(request: dict[str, Any], stores: dict[str, Any], used: dict[str, float]) -> dict[str, Any]:
    from . import _shard

    storage = _open(stores, request)
    used[request["dir"]] = time.monotonic()
    shard = storage._state.shards[request["shard"]]
    if request["durable"]:
        shard.durable = True
    try:
        if "verify" in request:
            return {"why": shard.verify(tuple(request["verify"]), pace=False)}
        _shard.SLACK = int(request["slack"])  # when a merge is due: the parent's rule
        return {"merged": shard.merge(time.time() + request["skew"], paced=False, keep=True)}
    finally:
        # Not kept open until the next request: a merge by another process
        # meanwhile frees the log it replaces only once no process has it open.
        shard.let_go()


def main() -> None:
    """The helper process (``python -c ... <parent pid> <sys.path> <code
    fingerprint>``): merge what the parent asks, until it is gone."""
    from ._shard import MERGER

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the parent, whose exit ends us
    parent = int(sys.argv[1])
    stores: dict[str, Any] = {}
    used: dict[str, float] = {}
    ready = {"ready": os.getpid(), "module": os.path.abspath(__file__), "code": _FINGERPRINT}
    os.write(1, json.dumps(ready).encode())
    if sys.argv[3] != _FINGERPRINT:
        # Other code than the parent's: it serves nothing, and waits for the
        # parent to give it up when it reads that (or to exit).  Ended now,
        # with a request unread, it would reset the connection, and the
        # parent could fail to read why.
        while os.read(0, _MESSAGE):
            pass
        return
    try:
        while True:
            wait = MERGER.close_due()  # replaced files kept open a moment (see _shard.Shard._retain)
            now = time.monotonic()
            for directory, last in list(used.items()):
                if now - last > IDLE:
                    del used[directory]
                    storage = stores.pop(directory, None)
                    if storage is not None:
                        storage.close()
            if not select.select([0], [], [], min(wait, 1.0))[0]:
                if os.getppid() != parent:
                    return
                continue
            message = os.read(0, _MESSAGE)  # one request (a SOCK_SEQPACKET socket)
            if not message:
                return
            os.write(1, json.dumps(_serve(json.loads(message), stores, used)).encode())
    finally:
        for storage in stores.values():
            storage.close()
