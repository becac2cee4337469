"""Background merges made by a helper process, off the GIL of the process that serves requests.

A merge of a shard (see ``_shard.Shard.merge``) is Python work: tens of
milliseconds for a few megabytes of log.  Made by a thread of the serving
process, it shares that process's GIL, and every request that runs meanwhile
waits for the GIL at each of its system calls: on a machine with a core to
spare, that is most of a request's tail latency.  So the process's merge
thread (``_shard.Merger``) hands each merge to a helper: a child process,
started when the first merge is due, that opens the same store and merges the
shard there, while the merge thread waits for its answer without the GIL.

The protocol between the two is private to this module: one line of JSON
each way per merge, over the helper's stdin and stdout.

* helper → parent, once started: ``{"ready": pid, "module": path}``;
* parent → helper: ``{"dir": directory, "ident": [dev, ino], "shard": n,
  "durable": bool, "skew": seconds, "slack": bytes}``;
* helper → parent: ``{"merged": bool}`` or ``{"error": message}``.

The helper keeps a store open while merges of it come, and closes it after
``IDLE`` seconds without one.  It ends when its stdin reaches end of file,
that is when the parent has exited (or closed it), or when it finds its
parent changed.  A forked child does not share its parent's helper: it
closes its copies of the pipes and starts its own when it needs one.

Where no helper can be had (no Python executable to start: an embedded
interpreter; a helper that does not answer, or that died), the merge thread
merges itself, as it does when ``SESSIONKIT_MERGES=thread``, and tries a
helper again ``RETRY_AFTER`` seconds later.  A helper's death costs nothing
but that: merges are safe to kill at any point.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import StorageError

log = logging.getLogger("sessionkit")

ENV = "SESSIONKIT_MERGES"  # "auto" (the default: a helper where one can be started), "process", "thread"
START_TIMEOUT = 30.0  # seconds a new helper has to say it is ready
REPLY_TIMEOUT = 600.0  # seconds a merge may take in the helper before it is given up for stuck
RETRY_AFTER = 60.0  # seconds after a helper failed before another is started
IDLE = 5.0  # seconds without a merge of a store after which the helper closes it


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
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value == "thread":
        return "thread"
    if value not in ("auto", "process"):
        _warn_once("sessionkit: %s=%r is not one of auto, process, thread; taken as auto", ENV, value)
    if os.name != "posix" or not _python_executable():
        if value == "process":
            _warn_once("sessionkit: %s=process, but there is no Python executable to start; merging in a thread", ENV)
        return "thread"
    return "process"


def _python_executable() -> str | None:
    """The interpreter to start the helper with, if this process runs one
    that can be started (not an embedded one: ``sys.executable`` may then be
    the host program, which must never be run with our arguments)."""
    exe = sys.executable
    if not exe or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        return None
    name = os.path.basename(exe).lower()
    return exe if name.startswith(("python", "pypy")) else None


class HelperUnavailable(Exception):
    """No helper answered: the caller merges in its own thread."""


class Helper:
    """The parent's side: the helper process, started on first use.

    Used by the merge thread only (one merge at a time), so it needs no mutex
    of its own; the fork hook of ``_shard.Merger`` calls :meth:`forget`."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._retry_at = 0.0
        self.merges = 0  # merges the helper made (for tests and benchmarks)
        self.pid: int | None = None  # the helper's, while it runs

    def usable(self) -> bool:
        """Whether the next merge should go to a helper (``SESSIONKIT_MERGES``, and no recent failure)."""
        return (self._proc is not None or time.monotonic() >= self._retry_at) and wanted() == "process"

    def merge(
        self, directory: str, ident: tuple[int, int], shard: int, durable: bool, skew: float, slack: int
    ) -> bool:
        """Have the helper merge shard ``shard`` of the store in ``directory``
        (``skew``: the store's clock minus the real one; ``slack``: this
        process's ``_shard.SLACK``, which the helper adopts); returns whether
        it merged.  Raises :class:`HelperUnavailable` if no helper answered
        (it is stopped, and not tried again for ``RETRY_AFTER`` seconds), and
        :class:`~sessionkit.StorageError` for a merge that failed there."""
        request = {
            "dir": directory, "ident": list(ident), "shard": shard, "durable": durable, "skew": skew, "slack": slack,
        }
        try:
            if self._proc is None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            os.write(self._proc.stdin.fileno(), json.dumps(request).encode() + b"\n")
            reply = self._read_line(REPLY_TIMEOUT)
        except (OSError, ValueError, HelperUnavailable) as exc:
            self.stop()
            self._retry_at = time.monotonic() + RETRY_AFTER
            log.warning("sessionkit: the merge helper failed (%s); merging in a thread for %.0f s", exc, RETRY_AFTER)
            raise HelperUnavailable(str(exc)) from None
        if "error" in reply:
            raise StorageError(str(reply["error"]), path=directory)
        merged = bool(reply.get("merged"))
        self.merges += merged
        return merged

    def _start(self) -> None:
        exe = _python_executable()
        if exe is None:
            raise HelperUnavailable("no Python executable to start")
        code = "from sessionkit.storage._merge_helper import main; main()"
        env = dict(os.environ)
        env[ENV] = "thread"  # the helper merges in its own main thread; it starts no helper of its own
        # The same modules as ours: our sys.path first (an application may have changed it).
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._buffer = b""
        self._proc = subprocess.Popen(
            [exe, "-c", code, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True, env=env, cwd="/",
        )
        ready = self._read_line(START_TIMEOUT)
        here = os.path.abspath(__file__)
        if ready.get("module") != here:
            raise HelperUnavailable(f"the helper imported {ready.get('module')!r}, not {here!r}")
        self.pid = int(ready["ready"])

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise HelperUnavailable(f"no answer in {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise HelperUnavailable("it exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError(f"unexpected answer {line!r}")
        return reply

    def stop(self) -> None:
        """Stop the helper (it is between merges, or stuck in one): closing its stdin ends it."""
        proc, self._proc, self.pid = self._proc, None, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's pipes (the helper is the parent's)."""
        proc, self._proc, self.pid = self._proc, None, None
        self._buffer = b""
        self._retry_at = 0.0
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            try:
                os.close(pipe.fileno())  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
        proc.returncode = 0  # not our child: never waited for here


def _open(stores: dict[str, Any], request: dict[str, Any]) -> Any:
    """The helper's storage on the request's store, opened if need be, never created."""
    from .msgpack_file import FORMAT_FILE, MsgpackFileStorage

    directory = request["dir"]
    storage = stores.get(directory)
    if storage is not None:
        try:
            st = os.stat(directory)
            if [st.st_dev, st.st_ino] == request["ident"]:
                return storage
        except OSError:
            pass
        stores.pop(directory).close()
    if not os.path.exists(os.path.join(directory, FORMAT_FILE)):
        raise StorageError(f"{directory} holds no store any more", path=directory)
    storage = MsgpackFileStorage(directory)
    st = os.stat(directory)
    if [st.st_dev, st.st_ino] != request["ident"]:
        storage.close()
        raise StorageError(f"{directory} is another store now", path=directory)
    stores[directory] = storage
    return storage


def _serve(request: dict[str, Any], stores: dict[str, Any], used: dict[str, float]) -> dict[str, Any]:
    from . import _shard

    try:
        _shard.SLACK = int(request["slack"])  # when a merge is due: the parent's rule
        storage = _open(stores, request)
        used[request["dir"]] = time.monotonic()
        shard = storage._state.shards[request["shard"]]
        if request["durable"]:
            shard.durable = True
        return {"merged": shard.merge(time.time() + request["skew"], paced=False, keep=True)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, whose write goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    """The helper process (``python -c ... <parent pid>``): merge what the parent asks, until it is gone."""
    from ._shard import MERGER

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the parent, whose exit ends us
    parent = int(sys.argv[1])
    stores: dict[str, Any] = {}
    used: dict[str, float] = {}
    os.write(1, json.dumps({"ready": os.getpid(), "module": os.path.abspath(__file__)}).encode() + b"\n")
    buffer = b""
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
            chunk = os.read(0, 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                reply = _serve(json.loads(line), stores, used)
                os.write(1, json.dumps(reply).encode() + b"\n")
    finally:
        for storage in stores.values():
            storage.close()
