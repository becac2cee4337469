"""RedisStorage: sessions in a Redis server or Redis Cluster, with fenced writes.

How a locked read-modify-write runs (two round trips when nobody waits):

1. **lock and read** (:data:`_ACQUIRE`, one script): the lock key is set to
   a random token with an expiry unless another token holds it; the value
   comes back in the same reply.  A busy lock answers with its time to live
   and counts the caller as a waiter.
2. **write and release** (:data:`_COMMIT`, one script): only if the lock
   still holds this token, the value is written (or deleted) and the lock is
   released; otherwise nothing is written and :class:`LockLost` is raised.
   A block that changed nothing releases with the same script.

A waiter does not poll: it blocks on the session's wake-up list (``BLPOP``)
and the releasing script pushes to it when the waiter count says someone
waits.  The lock's expiry is the safety net: a holder that died frees the
key after ``lock_expiry`` seconds; a live holder's locks are renewed by a
keep-alive thread every third of that, so a slow block keeps its lock.

A releasing commit also pushes its token on the session's short list of
commit receipts (the last four, kept a minute), so a commit that redis-py
retries after a lost reply recognises that it already landed instead of
reporting a lost lock.

Threads of one process queue for a key in the process (a ``KeyLocks``
table) before they ask Redis, so only one of them at a time waits on the
server, a hand-over between them costs no wake-up, and a lock that was lost
cannot be taken over by another thread of the same process.  Each hold is
recorded per (server, key, thread); a session left in another thread than
the one that entered it (a pool, ``asyncio.to_thread``) finds the key's one
hold.  Each server has its own keep-alive thread, so a server that hangs
delays only the renewals of its own locks.  A lock whose release failed
(the server was unreachable) is freed by the next lock of that key in this
process instead of blocking it until it expires.

The helper keys (lock, wake-up list, waiter count, receipts) hash to the data key's
cluster slot; ``_redis_keys`` says how.  redis-py is imported when the first
``RedisStorage`` is made, not by ``import sessionkit``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator

from .. import _codec, _fork
from .._codec import find_unstorable
from .._locks import KeyLocks, LockContext
from ..errors import (
    CorruptSessionError,
    LockLost,
    LockTimeout,
    SerializationError,
    SessionError,
    SessionKeyError,
    StorageError,
)
from ._redis_keys import helper_keys, is_helper
from .base import EncodedStorage, check_key, ttl_seconds

__all__ = ["RedisStorage"]


# KEYS: data, lock, wake, wait.  ARGV: token, expiry ms, "1" if the caller
# waited before (its place in the waiter count is given back).
# -> {1, value or nil} (locked) or {0, the lock's pttl, the holder's token}
# (busy: counted as a waiter)
_ACQUIRE = """
if ARGV[3] == '1' then
  if redis.call('decr', KEYS[4]) <= 0 then redis.call('del', KEYS[4]) end
end
local held = redis.call('get', KEYS[2])
if held == false or held == ARGV[1] then
  local value = redis.call('get', KEYS[1])  -- first: a key of the wrong type fails before the lock is set
  redis.call('set', KEYS[2], ARGV[1], 'px', ARGV[2])
  return {1, value}
end
redis.call('incr', KEYS[4])
redis.call('pexpire', KEYS[4], 2 * tonumber(ARGV[2]))
return {0, redis.call('pttl', KEYS[2]), held}
"""

# KEYS: data, lock, wake, wait, receipts.  ARGV: token, op ("set", "del" or
# "-"), value, ttl ms ("0": none), "1" to release, expiry ms.
# -> 1 done, 2 done by an earlier try of this same call, 0 the lock is not ours
_COMMIT = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then
  if redis.call('lpos', KEYS[5], ARGV[1]) then return 2 end
  return 0
end
local waiting, woken = 0, 0
if ARGV[5] == '1' then  -- read everything first: an error below would leave the write half done
  waiting = tonumber(redis.call('get', KEYS[4])) or 0
  woken = redis.call('llen', KEYS[3])
end
if ARGV[2] == 'set' then
  if ARGV[4] == '0' then
    redis.call('set', KEYS[1], ARGV[3])
  else
    redis.call('set', KEYS[1], ARGV[3], 'px', ARGV[4])
  end
elseif ARGV[2] == 'del' then
  redis.call('del', KEYS[1])
end
if ARGV[5] == '1' then
  redis.call('del', KEYS[2])
  redis.call('lpush', KEYS[5], ARGV[1])
  redis.call('ltrim', KEYS[5], 0, 3)
  redis.call('pexpire', KEYS[5], 60000)
  if woken < waiting then  -- never more wake-ups queued than waiters counted
    redis.call('rpush', KEYS[3], '1')
    redis.call('pexpire', KEYS[3], ARGV[6])
  end
else
  redis.call('pexpire', KEYS[2], ARGV[6])
end
return 1
"""

# KEYS: lock.  ARGV: token, expiry ms.  -> 1 renewed, 0 not ours any more
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: wait.  A waiter that gives up takes itself out of the count.
_GIVE_UP = """
if redis.call('decr', KEYS[1]) <= 0 then redis.call('del', KEYS[1]) end
return 1
"""

_TOKEN_BYTES = 16
_LONGEST_EXPIRY = 1e6  # seconds; Redis takes expiries in milliseconds


class _Hold:
    """One thread's lock on one session: its token and what came with it."""

    __slots__ = ("storage", "data_key", "keys", "token", "pid", "value", "fresh", "fused", "renewed", "slot")

    def __init__(self, storage: RedisStorage, data_key: bytes, keys: list[bytes], token: str, fused: bool) -> None:
        self.slot: tuple[Any, bytes, int] = (storage._server, data_key, threading.get_ident())
        self.storage = storage
        self.data_key = data_key
        self.keys = keys
        self.token = token
        self.pid = os.getpid()
        self.value: Any = None
        self.fresh = False  # value holds what the lock script read, not yet handed out
        self.fused = fused  # taken by Sessions: its commit releases the lock
        self.renewed = time.monotonic()


# Every lock this process holds through any RedisStorage, by (server, data
# key, thread): a thread that asks again for a key it holds is refused, and
# the keep-alive threads renew them.  After a fork the child sees the
# parent's holds (their pid differs) and may neither write nor release them.
_holds: dict[tuple[Any, bytes, int], _Hold] = {}
_keeper_mutex = threading.Lock()
_fork.register_mutex(_keeper_mutex)
# A token starts with this process's random id and the thread's ident, so a
# thread that finds its own token on a busy lock (the same server reached by
# another address) is told it would deadlock instead of waiting for ever.
_process = [os.urandom(6).hex()]


_thread = threading.local()
# This process's threads queue for a key here before they ask Redis for it
# (keyed by (server, data key)); see RedisStorage._take.
_local = KeyLocks()
# Locks whose release failed (the server was unreachable), by (server, data
# key): the next lock of that key in this process frees it instead of
# waiting for its expiry.
_orphans: dict[tuple[Any, bytes], str] = {}


def _committed() -> set[tuple[Any, bytes]]:
    """The (server, data key) pairs whose session commit released the lock in
    this thread, until the session's ``_release`` call that follows."""
    try:
        return _thread.committed  # type: ignore[no-any-return]
    except AttributeError:
        _thread.committed = set()
        return _thread.committed  # type: ignore[no-any-return]


def _token_prefix() -> str:
    return f"{_process[0]}:{threading.get_ident()}:"


def _after_fork_in_child() -> None:
    """The child keeps only the forking thread's holds (refused as the parent's); a new process id."""
    me = threading.get_ident()
    for slot in [slot for slot in list(_holds) if slot[2] != me]:
        _holds.pop(slot, None)
    _process[0] = os.urandom(6).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Keeper:
    """The keep-alive thread of one server: renews its locks every third of their expiry.

    It never sleeps longer than a third of the shortest ``lock_expiry`` of a
    storage on its server, so a lock taken while it sleeps is renewed within
    two thirds of its expiry.
    """

    def __init__(self, server: tuple[Any, ...]) -> None:
        self.server = server
        self.pid = os.getpid()
        self.period = 1.0
        self.nudge = threading.Event()
        self.thread = threading.Thread(target=self.run, name="sessionkit-redis-keepalive", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            pause = self.period
            try:
                pause = self.renew_due(pause)
            except Exception:  # noqa: BLE001 - a keep-alive must outlive any one failure
                pass
            if self.nudge.wait(max(pause, 0.005)):
                self.nudge.clear()

    def renew_due(self, pause: float) -> float:
        """Renew the holds that are due; returns how long to sleep."""
        now = time.monotonic()
        for slot, hold in list(_holds.items()):
            if slot[0] != self.server or hold.pid != self.pid:
                continue
            period = hold.storage.lock_expiry / 3
            due = hold.renewed + period
            if due <= now:
                hold.renewed = now
                hold.storage._renew(hold)
                now = time.monotonic()
                due = now + period
            pause = min(pause, due - now)
        return pause


_keepers: dict[tuple[Any, ...], _Keeper] = {}


def _keep_alive(server: tuple[Any, ...], expiry: float) -> None:
    """Make sure this process renews the locks it holds on ``server``."""
    keeper = _keepers.get(server)
    if keeper is None or keeper.pid != os.getpid() or not keeper.thread.is_alive():
        with _keeper_mutex:
            keeper = _keepers.get(server)
            if keeper is None or keeper.pid != os.getpid() or not keeper.thread.is_alive():
                keeper = _keepers[server] = _Keeper(server)
    if expiry / 3 < keeper.period:
        keeper.period = expiry / 3
        keeper.nudge.set()


class _Script:
    """A Lua script run by ``EVALSHA`` (loaded on first use, and again after a
    server restart forgot it): redis-py's ``Script`` with less work per call."""

    __slots__ = ("client", "source", "sha", "no_script")

    def __init__(self, client: Any, source: str) -> None:
        from redis.exceptions import NoScriptError

        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.no_script = NoScriptError

    def __call__(self, keys: list[bytes], args: list[Any]) -> Any:
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except self.no_script:
            self.client.script_load(self.source)
            return self.client.evalsha(self.sha, len(keys), *keys, *args)


class _Locks(LockContext):
    """``RedisStorage.lock()``: the context manager over the storage's acquire/release."""

    __slots__ = ("storage",)

    def __init__(self, storage: RedisStorage) -> None:
        self.storage = storage

    def acquire(self, key: str, timeout: float | None = None) -> None:
        self.storage._take(key, timeout, fused=False)

    def release(self, key: str) -> None:
        self.storage._release(key)


class RedisStorage(EncodedStorage):
    """Sessions in Redis or a Redis Cluster, shared by every process on every machine.

    ::

        storage = RedisStorage(url="redis://localhost:6379/0", prefix="bot:")
        sessions = Sessions(storage, initial=dict)

    ``client``: a ready ``redis.Redis`` or ``redis.cluster.RedisCluster``
    (made with ``decode_responses=False``, the default); or ``url``: a
    ``redis://`` / ``rediss://`` / ``unix://`` URL, with ``cluster=True`` for a
    cluster.  ``prefix``: prepended to every key; the data key *is*
    ``prefix + key``, so other tools see natural keys.  ``ttl``: seconds (or a
    ``timedelta``) after the last write, enforced by Redis itself (set with
    the write, in one step).  ``codec``: ``"msgpack"`` (the values
    ``MsgpackFileStorage`` accepts) or ``"json"`` (JSON text: what grammY's
    Redis adapter reads and writes; dict keys must be ``str``).
    ``lock_expiry``: seconds a lock outlives a holder that died; a live
    holder's locks are renewed in the background, so a slow block keeps its
    lock however long it runs.

    Lock scope: cluster.  ``lock(key)`` excludes every process on every
    machine that uses the same keys.  Writes are fenced: a session whose lock
    was lost while its block ran (expired, deleted, a failover) is not
    written, and ``LockLost`` is raised.  A locked read-modify-write costs
    two round trips; a waiter is woken by the releasing call, not by
    polling.  Connection errors, timeouts and a restarted server become
    ``StorageError`` (the cause chained); each write is one atomic step, so
    nothing is half-written.

    Keys listed by ``keys()`` come from ``SCAN`` (on every primary of a
    cluster), never ``KEYS``.  Besides the data keys, each locked session
    leaves short-lived helper keys of the form ``{tag}\\0sk-lock\\0<key>``;
    listings skip them.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        url: str | None = None,
        cluster: bool = False,
        prefix: str = "",
        ttl: float | timedelta | None = None,
        codec: str = "msgpack",
        lock_expiry: float = 10.0,
    ) -> None:
        """Connect (lazily) to Redis; the parameters are described in the class docstring."""
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("RedisStorage needs redis-py: pip install 'sessionkit[redis]'") from exc
        if (client is None) == (url is None):
            raise ValueError("give RedisStorage either a client or a url=")
        if url is not None:
            if not isinstance(url, str):
                raise TypeError(f"url must be a str, not {type(url).__name__}")
            from redis.cluster import RedisCluster

            client = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if codec not in ("msgpack", "json"):
            raise ValueError(f"codec must be 'msgpack' or 'json', not {codec!r}")
        if (
            isinstance(lock_expiry, bool)
            or not isinstance(lock_expiry, (int, float))
            or not 0.05 <= lock_expiry <= _LONGEST_EXPIRY
        ):
            raise ValueError(f"lock_expiry must be from 0.05 to {_LONGEST_EXPIRY:.0f} seconds, got {lock_expiry!r}")
        self.client = client
        self.prefix = prefix
        self.ttl = ttl_seconds(ttl)
        self.codec = codec
        self.lock_expiry = float(lock_expiry)
        self._expiry_ms = str(max(int(self.lock_expiry * 1000), 50))
        self._ttl_ms = "0" if self.ttl is None else str(max(int(math.ceil(self.ttl * 1000)), 1))
        from redis.exceptions import RedisClusterException

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException)
        self._timeout_error = redis.TimeoutError
        kwargs = _connection_kwargs(client)
        if kwargs.get("decode_responses"):
            raise ValueError("RedisStorage needs a client made with decode_responses=False (the default)")
        # a blocking wait must end before the client's own socket timeout
        socket_timeout = kwargs.get("socket_timeout")
        self._longest_wait = 5.0 if not socket_timeout else max(min(5.0, socket_timeout * 0.8), 0.01)
        self._server = _server_identity(client, kwargs)
        self._acquire_script = _Script(client, _ACQUIRE)
        self._commit_script = _Script(client, _COMMIT)
        self._renew_script = _Script(client, _RENEW)
        self._give_up_script = _Script(client, _GIVE_UP)
        self._locks = _Locks(self)
        if codec == "json":
            self._raw_dumps = _json_dumps
            self._raw_loads = _json_loads
        else:
            self._raw_dumps = _codec.dumps
            self._raw_loads = _codec.loads
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStorage({self.client!r}, prefix={self.prefix!r}, ttl={self.ttl}, codec={self.codec!r})"

    # -- keys and errors -----------------------------------------------------

    def _name(self, key: str) -> bytes:
        name = self.prefix + key
        if "\x00sk-" in name and is_helper(name):
            raise SessionKeyError(
                f"session key {key!r} is reserved: with prefix {self.prefix!r} it names a lock key of sessionkit's",
                key=key,
            )
        return name.encode("utf-8", "surrogatepass")

    def _failed(self, exc: BaseException, doing: str, key: str | None) -> StorageError:
        return StorageError(f"cannot {doing} session {key!r} in Redis: {type(exc).__name__}: {exc}", key=key)

    def _call(self, doing: str, key: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StorageError("this RedisStorage is closed", key=key)
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise self._failed(exc, doing, key) from exc

    # -- locking, and the private fast path used by Sessions (see sessionkit._fastpath) --

    def _acquire(self, key: str, timeout: float | None = None) -> None:
        self._take(key, timeout, fused=True)

    def _take(self, key: str, timeout: float | None, fused: bool) -> None:
        key = check_key(key)
        name = self._name(key)
        # Threads of this process queue for the key here first, so only one of
        # them at a time asks Redis, and a hand-over between them costs no
        # wake-up round trip (re-entry by the same thread is refused here too).
        start = time.monotonic()
        try:
            _local.acquire((self._server, name), timeout)  # type: ignore[arg-type]
        except LockTimeout:
            raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key) from None
        except SessionError:
            raise self._reentry(key) from None
        try:
            left = None if timeout is None else max(timeout - (time.monotonic() - start), 0.0)
            self._take_server(key, name, left, fused)
        except BaseException:
            _local.release((self._server, name))  # type: ignore[arg-type]
            raise

    def _take_server(self, key: str, name: bytes, timeout: float | None, fused: bool) -> None:
        # (re-entry by this thread was refused by the process's queue, _local, already)
        slot = (self._server, name, threading.get_ident())
        keys = [name, *(k.encode("utf-8", "surrogatepass") for k in helper_keys(name.decode("utf-8", "surrogatepass")))]
        prefix = _token_prefix()
        token = prefix + os.urandom(_TOKEN_BYTES).hex()
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = "0"
        while True:
            reply = self._call("lock", key, self._acquire_script, keys=keys[:4], args=[token, self._expiry_ms, waited])
            payload = reply[1] if len(reply) > 1 else None  # Redis cuts a Lua array at its first nil
            if reply[0] == 1:
                break
            waited = "1"
            holder = reply[2] if len(reply) > 2 and isinstance(reply[2], bytes) else b""
            if holder.startswith(prefix.encode()):
                mine = [h for h in list(_holds.values()) if h.slot[2] == slot[2] and h.pid == os.getpid()]
                if holder in {h.token.encode() for h in mine}:
                    self._give_up(keys, key)
                    raise self._reentry(key)  # this thread's own lock, taken through another address
                if self._drop_orphan(slot[:2], holder, keys, key):
                    waited = "1"
                    continue  # a lock this process lost track of (its release failed): freed, try again
            wait = self.lock_expiry if payload is None or payload < 0 else payload / 1000 + 0.002
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._give_up(keys, key)
                    raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key)
                wait = min(wait, left)
            wait = max(min(wait, self._longest_wait), 0.001)
            try:
                self.client.blpop([keys[2]], timeout=wait)
            except self._timeout_error:
                pass  # the socket timed out first: look again
            except self._errors as exc:
                self._give_up(keys, key)
                raise self._failed(exc, "lock", key) from exc
            except BaseException:
                self._give_up(keys, key)
                raise
        hold = _Hold(self, name, keys, token, fused)
        hold.value = payload
        hold.fresh = True
        try:
            _holds[slot] = hold
            _keep_alive(self._server, self.lock_expiry)
        except BaseException:
            _holds.pop(slot, None)
            try:
                self._commit(hold, key, "-", b"", release=True, check=False)
            except SessionError:
                pass  # the lock expires on its own, never renewed
            raise

    def _drop_orphan(self, where: tuple[Any, bytes], holder: bytes, keys: list[bytes], key: str) -> bool:
        """Release ``holder`` if it is a lock this process took and could not release."""
        if _orphans.get(where) != holder.decode():
            return False
        _orphans.pop(where, None)
        orphan = _Hold(self, where[1], keys, holder.decode(), False)
        self._commit(orphan, key, "-", b"", release=True, check=False)
        return True

    def _reentry(self, key: str) -> SessionError:
        return SessionError(
            f"session {key!r} is already open in this thread; opening it again would deadlock", key=key
        )

    def _give_up(self, keys: list[bytes], key: str) -> None:
        try:
            self._give_up_script(keys=[keys[3]], args=[])
        except self._errors:
            pass  # the count expires on its own

    def _find(self, name: bytes, session: bool = False) -> _Hold | None:
        """The hold of ``name`` this thread is using: its own, else (for a
        session) the one hold of it in this process.

        A session may be entered in one thread and left in another (a pool,
        ``asyncio.to_thread``); then the one hold of the key is the
        session's.  With two (a lost lock taken over in this process) the
        caller cannot be told apart: none is used.
        """
        hold = _holds.get((self._server, name, threading.get_ident()))
        if hold is not None or not session:
            return hold
        found = [h for h in list(_holds.values()) if h.data_key == name and h.slot[0] == self._server and h.fused]
        return found[0] if len(found) == 1 else None

    def _mine(self, name: bytes, key: str, session: bool = False) -> _Hold | None:
        """The hold to write ``name`` under, if this process holds it (see :meth:`_find`)."""
        hold = self._find(name, session)
        if hold is not None and hold.pid != os.getpid():
            raise StorageError(
                f"session {key!r} is held by the parent of this forked process; the child may not write it",
                key=key,
            )
        return hold

    def _release(self, key: str) -> None:
        name = self._name(check_key(key))
        committed = _committed()
        if (self._server, name) in committed:
            committed.discard((self._server, name))
            return  # released by the session's commit
        hold = self._find(name, session=True)
        if hold is None:
            return
        _holds.pop(hold.slot, None)  # first: a failure below leaves the lock to expire, never renewed
        try:
            if hold.pid != os.getpid():
                return  # the parent's: it releases it itself
            try:
                self._commit(hold, key, "-", b"", release=True, check=False)
            except StorageError:
                _orphans[(self._server, name)] = hold.token  # the next lock of this key frees it
                raise
        finally:
            _local.release((self._server, name))  # type: ignore[arg-type]

    def _renew(self, hold: _Hold) -> None:
        try:
            self._renew_script(keys=[hold.keys[1]], args=[hold.token, self._expiry_ms])
        except self._errors:
            pass  # tried again a third of the expiry later; the commit checks the token anyway

    def _commit(self, hold: _Hold, key: str, op: str, data: bytes, release: bool, check: bool = True) -> None:
        """Write (or delete) under the hold, fenced by its token; release it too if asked."""
        hold.fresh = False
        hold.value = None
        done = self._call(
            "write" if op != "-" else "unlock",
            key,
            self._commit_script,
            keys=hold.keys,
            args=[hold.token, op, data, self._ttl_ms, "1" if release else "0", self._expiry_ms],
        )
        if not done and check:
            raise LockLost(
                f"the lock of session {key!r} was lost while its block ran (it expired, or another "
                "client deleted or took it); nothing was written",
                key=key,
            )

    def _raw_read(self, key: str) -> bytes | None:
        name = self._name(key)
        hold = self._find(name, session=True)
        if hold is not None and hold.fresh and hold.pid == os.getpid():
            hold.fresh = False  # read by the lock script a moment ago, the lock held since
            value = hold.value
            hold.value = None
            return value  # type: ignore[no-any-return]
        return self._call("read", key, self.client.get, name)  # type: ignore[no-any-return]

    def _raw_write(self, key: str, raw: bytes) -> None:
        """The write-back of a session (``Sessions`` only): write and release in one step."""
        self._write(key, raw, "set", session=True)

    def _raw_delete(self, key: str) -> None:
        """The delete of a session (``Sessions`` only): delete and release in one step."""
        self._write(check_key(key), b"", "del", session=True)

    def _write(self, key: str, raw: bytes, op: str, session: bool = False) -> None:
        name = self._name(key)
        hold = self._mine(name, key, session)
        if hold is None:
            if op == "del":
                self._call("delete", key, self.client.delete, name)
            elif self.ttl is None:
                self._call("write", key, self.client.set, name, raw)
            else:
                self._call("write", key, self.client.set, name, raw, px=int(self._ttl_ms))
            return
        release = session and hold.fused
        if release:  # the session's block ends with this write; its _release() then does nothing
            _holds.pop(hold.slot, None)
            _committed().add((self._server, name))
        try:
            self._commit(hold, key, op, raw, release=release)
        except StorageError:
            if release:  # the lock may still be there: the next lock of this key frees it
                _orphans[(self._server, name)] = hold.token
            raise
        finally:
            if release:
                _local.release((self._server, name))  # type: ignore[arg-type]

    # -- the StorageAdapter contract -----------------------------------------

    def write(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (fenced by this thread's lock on it, when it holds one)."""
        key = check_key(key)
        if value is None:
            raise ValueError("None is never stored; use delete() to remove a session")
        self._write(key, self._raw_dumps(value, key), "set")

    def delete(self, key: str) -> None:
        """Delete ``key`` (fenced by this thread's lock on it, when it holds one)."""
        self._write(check_key(key), b"", "del")

    def has(self, key: str) -> bool:
        """Whether Redis holds a value for ``key``."""
        key = check_key(key)
        return bool(self._call("read", key, self.client.exists, self._name(key)))

    def _scan(self) -> Iterator[bytes]:
        pattern = _glob_escape(self.prefix.encode("utf-8", "surrogatepass")) + b"*"
        try:
            for name in self.client.scan_iter(match=pattern, count=1000):
                yield name
        except self._errors as exc:
            raise self._failed(exc, "list", None) from exc

    def _live_names(self) -> list[bytes]:
        names = []
        seen = set()
        for name in self._scan():
            if name in seen:
                continue  # SCAN may return a key twice
            seen.add(name)
            text = name.decode("utf-8", "surrogatepass")
            if is_helper(text) or not text.startswith(self.prefix):
                continue
            names.append(name)
        return names

    def keys(self) -> Iterator[str]:
        """Every session key under the prefix (from ``SCAN``; helper keys skipped)."""
        cut = len(self.prefix)
        return iter([name.decode("utf-8", "surrogatepass")[cut:] for name in self._live_names()])

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` for every session under the prefix."""
        cut = len(self.prefix)
        found = []
        for name in self._live_names():
            key = name.decode("utf-8", "surrogatepass")[cut:]
            raw = self._call("read", key, self.client.get, name)
            if raw is not None:  # expired or deleted since the scan
                found.append((key, self._raw_loads(raw, key)))
        return iter(found)

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]:
        """Hold ``key``'s lock across the cluster; ``LockTimeout`` after ``timeout`` seconds."""
        return self._locks.lock(check_key(key), timeout)

    def close(self) -> None:
        """Stop using the client (a client given by the caller is left open)."""
        self._closed = True


def _connection_kwargs(client: Any) -> dict[str, Any]:
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return dict(getattr(pool, "connection_kwargs", {}))
    nodes = client.get_nodes() if hasattr(client, "get_nodes") else []
    for node in nodes:
        conn = getattr(node, "redis_connection", None)
        if conn is not None:
            return dict(conn.connection_pool.connection_kwargs)
    return {}


def _server_identity(client: Any, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Who the server is, so storages over one server share this process's holds."""
    if hasattr(client, "get_nodes"):
        return ("cluster", tuple(sorted(node.name for node in client.get_nodes())))
    return ("redis", kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db", 0))


def _glob_escape(text: bytes) -> bytes:
    out = bytearray()
    for byte in text:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


# -- the JSON codec --------------------------------------------------------------

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _json_leaf(value: Any) -> str | None:
    """Why JSON cannot hold ``value`` itself (not its items) unchanged, or None."""
    if value is None or isinstance(value, (str, bool, int, list, tuple)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"is {value!r}, which JSON cannot hold"
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), _NO_KEY)
        return None if bad is _NO_KEY else f"has the key {bad!r}, which JSON would turn into a str"
    kind = type(value)
    return f"is a {kind.__module__ + '.' if kind.__module__ != 'builtins' else ''}{kind.__qualname__}"


_NO_KEY = object()


def _check_json(value: Any, key: str | None) -> None:
    """Refuse what JSON would silently change (non-str dict keys) or cannot hold."""
    where = find_unstorable(value, _json_leaf)
    if where is not None:
        raise SerializationError(
            f"cannot store session {key!r} as JSON: {where} (sessions hold None, bool, int, "
            "float, str, and lists and dicts of these)",
            key=key,
        )


def _json_dumps(value: Any, key: str | None = None) -> bytes:
    _check_json(value, key)
    try:
        return _json_encoder.encode(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"cannot store session {key!r} as JSON: a str holds a lone surrogate, which is not UTF-8", key=key
        ) from exc
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"cannot store session {key!r} as JSON: {exc}", key=key) from exc


def _json_loads(data: bytes, key: str | None = None) -> Any:
    try:
        return json.loads(data.decode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptSessionError(f"stored JSON of session {key!r} cannot be decoded: {exc}", key=key) from exc
