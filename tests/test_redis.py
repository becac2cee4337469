"""RedisStorage on a real redis-server and a real 3-master Redis Cluster.

The contract suite runs on both through ``conftest.BACKENDS``; these are the
promises only a server backend makes: fenced writes, prompt hand-over, lock
expiry after a crash, two round trips, a server restarted mid-run, JSON.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest

from sessionkit import (
    LockLost,
    LockTimeout,
    RedisStorage,
    SerializationError,
    SessionError,
    Sessions,
    StorageError,
    enhance_storage,
)
from sessionkit.storage import redis_store
from sessionkit.storage._redis_keys import helper_keys, slot_of

from . import redis_servers, workers
from .conftest import redis_client

ROOT = Path(__file__).resolve().parent.parent
_counter = iter(range(10**9))


@pytest.fixture(params=["redis", "redis-cluster"])
def where(request: Any) -> Iterator[tuple[str, Any]]:
    """(kind, server) for a standalone server and for the cluster."""
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    yield request.param, request.getfixturevalue(fixture)


def client_for(kind: str, server: Any, **options: Any) -> Any:
    return server.client(**options) if kind == "redis-cluster" else redis_client(server, **options)


def fresh(kind: str, server: Any, **options: Any) -> RedisStorage:
    return RedisStorage(client_for(kind, server), prefix=f"r{next(_counter)}-{os.getpid()}:", **options)


@contextlib.contextmanager
def held_by_another_thread(storage: RedisStorage, key: str) -> Iterator[None]:
    """``key`` locked by another thread of this process while the block runs."""
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with storage.lock(key):
            held.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    try:
        yield
    finally:
        done.set()
        t.join()


def spec(kind: str, server: Any, prefix: str) -> str:
    return f"{kind}:{server.url}|{prefix}"


# -- exact under processes --------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
def test_processes_running_threads_lose_no_increment(where: tuple[str, Any], threads: int) -> None:
    kind, server = where
    prefix = f"p{next(_counter)}:"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    times = 100 // threads
    procs = [
        ctx.Process(target=workers.increment_threads, args=(spec(kind, server, prefix), "k", times, threads, start))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    storage = RedisStorage(client_for(kind, server), prefix=prefix)
    assert storage.read("k") == {"n": 4 * threads * times}


def test_the_counter_fails_without_the_lock(redis_server: Any) -> None:
    """The hammer above can fail: plain read-then-write from threads loses updates."""
    storage = fresh("redis", redis_server)
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(100):
            value = storage.read("k") or {"n": 0}
            storage.write("k", {"n": value["n"] + 1})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read("k")["n"] < 400


# -- fenced writes ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "taken"])
def test_a_block_whose_lock_was_lost_writes_nothing(where: tuple[str, Any], how: str) -> None:
    kind, server = where
    storage = fresh(kind, server)
    other = client_for(kind, server)
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["n"] = 1
    lock_key = helper_keys(storage.prefix + "k")[0]
    with pytest.raises(LockLost) as caught:
        with sessions.open("k") as s:
            s["n"] = 2
            if how == "deleted":
                assert other.delete(lock_key) == 1
            else:
                other.set(lock_key, "someone else", px=60_000)
                other.set(storage.prefix + "k", storage._raw_dumps({"n": 100}))  # their write
    assert caught.value.key == "k"
    assert storage.read("k") == ({"n": 1} if how == "deleted" else {"n": 100})
    if how == "taken":
        other.delete(lock_key)
    with sessions.open("k", timeout=5) as s:  # the key is usable again
        s["n"] += 1


def test_a_lost_lock_refuses_a_delete_and_a_direct_write_too(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    other = redis_client(redis_server)
    storage.write("k", 1)
    lock_key = helper_keys(storage.prefix + "k")[0]
    with pytest.raises(LockLost):
        with Sessions(storage).open("k") as s:
            other.delete(lock_key)
            s.delete()
    with pytest.raises(LockLost):
        with storage.lock("k"):
            other.delete(lock_key)
            storage.write("k", 2)
    assert storage.read("k") == 1


def test_a_handler_slower_than_the_lock_expiry_keeps_its_lock(where: tuple[str, Any]) -> None:
    kind, server = where
    storage = fresh(kind, server, lock_expiry=1.0)
    sessions = Sessions(storage, initial=dict)
    outcome: list[Any] = []

    def contender() -> None:
        try:
            # gives up after twice the expiry: a lock not kept alive would be taken by then
            with sessions.open("k", timeout=2.0) as s:
                s["n"] = -1
            outcome.append("entered")
        except LockTimeout:
            outcome.append("timeout")

    with sessions.open("k") as s:
        s["n"] = 1
        t = threading.Thread(target=contender)
        t.start()
        time.sleep(3.0)  # three times the expiry
        t.join()
    assert outcome == ["timeout"]
    assert storage.read("k") == {"n": 1}


def test_a_holder_killed_with_sigkill_blocks_others_only_until_the_expiry(where: tuple[str, Any]) -> None:
    kind, server = where
    prefix = f"kill{next(_counter)}:"
    code = (
        "import sys, time\n"
        "from tests.workers import open_store\n"
        "from sessionkit import Sessions\n"
        "s = Sessions(open_store(sys.argv[1]), initial=dict)\n"
        "with s.open('k') as h:\n"
        "    h['n'] = 1\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, spec(kind, server, prefix)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        time.sleep(3.0)  # longer than the expiry (2 s): the keep-alive kept it
        storage = RedisStorage(client_for(kind, server), prefix=prefix)
        with pytest.raises(LockTimeout):
            with storage.lock("k", timeout=0.2):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        with Sessions(storage, initial=dict).open("k", timeout=10) as s:
            waited = time.monotonic() - killed
            assert s.data == {}  # the dead holder's write never happened
            s["n"] = 5
        assert waited <= 2.0 + 1.5, waited  # the expiry, and room for a loaded machine
        assert storage.read("k") == {"n": 5}
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


# -- hand-over, round trips ------------------------------------------------------------


def test_a_waiter_is_woken_by_the_release_not_by_polling(where: tuple[str, Any]) -> None:
    kind, server = where
    storage = fresh(kind, server)
    woke: list[float] = []
    released: list[float] = []
    entered = threading.Event()

    def waiter() -> None:
        entered.set()
        with storage.lock("k"):
            woke.append(time.monotonic())

    gaps = []
    for _ in range(5):
        woke.clear()
        released.clear()
        entered.clear()
        with storage.lock("k"):
            t = threading.Thread(target=waiter)
            t.start()
            entered.wait()
            time.sleep(0.3)  # the waiter is blocked by now
            released.append(time.monotonic())
        t.join()
        gaps.append(woke[0] - released[0])
    # A woken waiter takes a round trip or two; one that missed the wake-up looks again only
    # when the lock would expire (up to 5 s).  The bound leaves room for a loaded machine.
    assert statistics.median(gaps) < 0.25, gaps


class CountingConnection:
    """A real redis-py connection that counts the replies it reads: one per round trip."""

    replies = 0

    @classmethod
    def make(cls) -> type:
        import redis

        class Counting(redis.Connection):
            def read_response(self, *args: Any, **kwargs: Any) -> Any:
                cls.replies += 1
                return super().read_response(*args, **kwargs)

        return Counting


def test_an_uncontended_read_modify_write_takes_two_round_trips(redis_server: Any) -> None:
    import redis

    pool = redis.ConnectionPool(connection_class=CountingConnection.make(), host="127.0.0.1", port=redis_server.port)
    storage = RedisStorage(redis.Redis(connection_pool=pool), prefix=f"rt{next(_counter)}:")
    sessions = Sessions(storage, initial=dict)
    with sessions.open("warm") as s:  # the scripts are loaded
        s["n"] = 0
    for changed in (True, False):
        before = CountingConnection.replies
        for _ in range(50):
            with sessions.open("k") as s:
                if changed or "n" not in s:
                    s["n"] = s.get("n", 0) + 1
        assert CountingConnection.replies - before == 100, changed
    assert storage.read("k") == {"n": 50}


# -- keys, helper keys, cluster slots ---------------------------------------------------


@pytest.mark.parametrize("key", ["a{b}c", "x}y", "{}", "", "{", "}{", "plain", "ключ{🔑}"])
def test_keys_with_braces_lock_and_commit_in_one_slot(where: tuple[str, Any], key: str) -> None:
    kind, server = where
    storage = fresh(kind, server)
    data_key = storage.prefix + key
    assert {slot_of(k) for k in helper_keys(data_key)} == {slot_of(data_key)}
    sessions = Sessions(storage, initial=dict)
    for _ in range(3):
        with sessions.open(key) as s:
            s["n"] = s.get("n", 0) + 1
    assert storage.read(key) == {"n": 3}
    assert client_for(kind, server).get(data_key) == storage._raw_dumps({"n": 3})  # the natural key
    with sessions.open(key) as s:
        s.delete()
    assert not storage.has(key)


def test_listings_skip_helper_keys_of_held_sessions(where: tuple[str, Any]) -> None:
    kind, server = where
    storage = fresh(kind, server)
    storage.write("a", 1)
    storage.write("b*[x]?", 2)  # glob characters in a key
    with held_by_another_thread(storage, "a"):
        names = [k.decode() for k in client_for(kind, server).scan_iter(match=storage.prefix + "*")]
        everything = [k.decode(errors="replace") for k in client_for(kind, server).scan_iter(match="*")]
        assert any("sk-lock" in n for n in everything)  # the held session's lock key is there
        assert sorted(storage.keys()) == ["a", "b*[x]?"]
        assert dict(storage.items()) == {"a": 1, "b*[x]?": 2}
        assert sorted(names) == sorted(storage.prefix + k for k in ("a", "b*[x]?"))
    other = RedisStorage(client_for(kind, server), prefix=storage.prefix[:-1])  # a prefix of the prefix
    assert sorted(other.keys()) == [":a", ":b*[x]?"]


def test_the_same_thread_cannot_open_a_held_key_again_through_another_storage(redis_server: Any) -> None:
    first = fresh("redis", redis_server)
    second = RedisStorage(redis_client(redis_server), prefix=first.prefix)
    with first.lock("k"):
        with pytest.raises(SessionError, match="already open in this thread"):
            with second.lock("k", timeout=1):
                pass
        with second.lock("other", timeout=1):  # another key is free
            pass


# -- ttl: Redis's own expiry ------------------------------------------------------------


def test_ttl_is_set_with_the_write_and_slides(where: tuple[str, Any]) -> None:
    kind, server = where
    storage = fresh(kind, server, ttl=timedelta(minutes=1))
    client = client_for(kind, server)
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["n"] = 1
    assert 59_000 <= client.pttl(storage.prefix + "k") <= 60_000
    client.pexpire(storage.prefix + "k", 30_000)
    with sessions.open("k") as s:
        s["n"] = 2
    assert client.pttl(storage.prefix + "k") > 59_000  # a write slides it
    storage.write("direct", 1)
    assert 59_000 <= client.pttl(storage.prefix + "direct") <= 60_000


def test_ttl_expires_for_real(redis_server: Any) -> None:
    storage = fresh("redis", redis_server, ttl=1.0)
    storage.write("k", 1)
    assert storage.read("k") == 1
    assert 0 < redis_client(redis_server).pttl(storage.prefix + "k") <= 1000
    deadline = time.monotonic() + 10
    while storage.read("k") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.read("k") is None and not storage.has("k") and list(storage.keys()) == []


# -- JSON, and a grammY bot's keys -------------------------------------------------------


def test_json_codec_round_trips_and_stores_json_text(where: tuple[str, Any]) -> None:
    kind, server = where
    storage = fresh(kind, server, codec="json")
    value = {"lang": "en", "n": 3, "x": 1.5, "ok": True, "none": None, "list": [1, "ü", [2]], "t": (1, 2)}
    with Sessions(storage, initial=dict).open("42") as s:
        s.update(value)
    raw = client_for(kind, server).get(storage.prefix + "42")
    assert json.loads(raw) == {**value, "t": [1, 2]}
    assert storage.read("42") == {**value, "t": [1, 2]}
    for bad in ({1: "int key"}, {"f": float("nan")}, {"b": b"bytes"}, {"s": {1, 2}}):
        with pytest.raises(SerializationError):
            storage.write("42", bad)
    assert storage.read("42") == {**value, "t": [1, 2]}


def test_json_with_enhance_storage_is_grammys_envelope(where: tuple[str, Any]) -> None:
    kind, server = where
    inner = fresh(kind, server, codec="json")
    enhanced = enhance_storage(inner, ttl=3600)
    with Sessions(enhanced, initial=dict).open("7") as s:
        s["step"] = "start"
    stored = json.loads(client_for(kind, server).get(inner.prefix + "7"))
    assert stored["__d"] == {"step": "start"} and isinstance(stored["e"], int)
    # what grammY's Redis adapter writes: JSON.stringify of its envelope under the chat id
    client_for(kind, server).set(inner.prefix + "8", json.dumps({"__d": {"count": 2}, "e": 4102444800000}))
    with Sessions(enhanced, initial=dict).open("8") as s:
        assert s.data == {"count": 2}


def test_corrupt_json_is_a_corrupt_session_error(redis_server: Any) -> None:
    from sessionkit import CorruptSessionError

    storage = fresh("redis", redis_server, codec="json")
    redis_client(redis_server).set(storage.prefix + "k", b"{not json")
    with pytest.raises(CorruptSessionError):
        storage.read("k")
    assert redis_client(redis_server).get(storage.prefix + "k") == b"{not json"  # left in place


# -- failures ------------------------------------------------------------------------


def test_an_unreachable_server_is_a_storage_error() -> None:
    import redis

    storage = RedisStorage(redis.Redis(port=redis_servers.free_port(), socket_connect_timeout=0.5))
    with pytest.raises(StorageError) as caught:
        storage.read("k")
    assert isinstance(caught.value.__cause__, redis.RedisError)
    with pytest.raises(StorageError):
        with Sessions(storage).open("k"):
            pass


def test_a_server_restarted_mid_run_loses_no_acknowledged_write(tmp_path: Path) -> None:
    redis_servers.need_binaries()
    server = redis_servers.RedisServer(tmp_path / "aof", persistent=True)
    counts = {"acked": 0, "failed": 0}
    running = threading.Event()
    running.set()
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # one retry at once (redis-py's own default backs off for seconds, hiding a short outage)
        client = redis_client(server, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))
        storage = RedisStorage(client, lock_expiry=1.0)
        sessions = Sessions(storage, initial=dict)

        def work() -> None:
            while running.is_set():
                try:
                    with sessions.open("k", timeout=5) as s:
                        s["n"] = s.get("n", 0) + 1
                    counts["acked"] += 1
                except StorageError:
                    counts["failed"] += 1
                    time.sleep(0.01)

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.5)
        server.stop()  # SIGTERM: every acknowledged write is in the append-only file
        time.sleep(0.8)
        down = dict(counts)
        server.start()
        time.sleep(1.5)
        running.clear()
        t.join(30)
        final = storage.read("k")["n"]
        assert down["failed"] > 0, "nothing failed while the server was down"
        assert counts["acked"] > down["acked"] > 0, "no increment before the stop, or none after the start"
        assert counts["acked"] <= final <= counts["acked"] + counts["failed"], (counts, final)
    finally:
        running.clear()
        server.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_cannot_write_a_session_its_parent_holds(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["n"] = 1
        pid = os.fork()
        if pid == 0:  # the child
            code = 5
            try:
                with sessions.open("other") as t:
                    t["n"] = 1
                s["n"] = 100
                s.__exit__(None, None, None)
            except StorageError:
                code = 0
            except BaseException:
                code = 7
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    assert storage.read("k") == {"n": 1} and storage.read("other") == {"n": 1}


def test_bad_arguments_are_clear() -> None:
    import redis

    with pytest.raises(ValueError, match="either"):
        RedisStorage()
    with pytest.raises(ValueError, match="codec"):
        RedisStorage(redis.Redis(), codec="pickle")
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStorage(redis.Redis(decode_responses=True))
    with pytest.raises(ValueError, match="lock_expiry"):
        RedisStorage(redis.Redis(), lock_expiry=0)


# -- found by attacking it ---------------------------------------------------------------


def test_a_lost_lock_is_not_taken_over_by_another_thread_of_this_process(redis_server: Any) -> None:
    """Threads of one process queue for a key in the process: while a block runs, even one whose
    Redis lock was lost, another thread cannot enter it; the block itself is refused on exit."""
    storage = fresh("redis", redis_server)
    sessions = Sessions(storage, initial=dict)
    outcome: list[str] = []

    def other_thread() -> None:
        try:
            with sessions.open("k", timeout=0.5) as s:
                s["by"] = "other"
            outcome.append("entered")
        except LockTimeout:
            outcome.append("timeout")

    with pytest.raises(LockLost):
        with sessions.open("k") as s:
            s["by"] = "first"
            redis_client(redis_server).delete(helper_keys(storage.prefix + "k")[0])  # the lock is lost
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
    assert outcome == ["timeout"]
    assert storage.read("k") is None
    other_thread()
    assert outcome[-1] == "entered" and storage.read("k") == {"by": "other"}


def test_a_commit_sent_again_after_a_lost_reply_is_recognised_as_landed(redis_server: Any) -> None:
    """redis-py resends a command whose reply was lost: the commit must not then report a lost lock."""
    storage = fresh("redis", redis_server)
    storage._acquire("k")
    hold = next(h for (server, name, _), h in list(redis_store._holds.items())
                if server == storage._server and name == storage._name("k"))
    args = [hold.token, "set", storage._raw_dumps({"n": 1}), "0", "1", storage._expiry_ms]
    redis_store._holds.pop((storage._server, storage._name("k"), threading.get_ident()))
    redis_store._local.release((storage._server, storage._name("k")))  # type: ignore[arg-type]
    assert storage._commit_script(keys=hold.keys, args=args) == 1  # landed; its reply "lost"
    with storage.lock("k", timeout=5):  # a waiter takes the lock at once
        assert storage._commit_script(keys=hold.keys, args=args) == 2  # the resent commit: already done
    assert storage.read("k") == {"n": 1}


def test_a_write_or_delete_inside_a_session_block_keeps_the_block_locked(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    sessions = Sessions(storage, initial=dict)
    outcome: list[str] = []

    def contender() -> None:
        try:
            with sessions.open("k", timeout=0.3):
                outcome.append("entered")
        except LockTimeout:
            outcome.append("timeout")

    with sessions.open("k") as s:
        storage.write("k", {"direct": 1})
        assert storage.read("k") == {"direct": 1}
        storage.delete("k")
        assert storage.read("k") is None
        t = threading.Thread(target=contender)
        t.start()
        t.join()
        s["n"] = 1
    assert outcome == ["timeout"]
    assert storage.read("k") == {"n": 1}


def test_reads_under_lock_see_the_writes_made_under_it(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    storage.write("k", {"v": 1})
    with storage.lock("k"):
        assert storage.read("k") == {"v": 1}
        storage.write("k", {"v": 2})
        assert storage.read("k") == {"v": 2}
        storage.delete("k")
        assert storage.read("k") is None
    with storage.lock("k"):
        storage.write("k", {"v": 3})
        assert storage.read("k") == {"v": 3}  # a write before the first read too


def test_a_session_key_that_names_a_lock_key_is_refused(redis_server: Any) -> None:
    from sessionkit import SessionKeyError

    storage = RedisStorage(redis_client(redis_server))
    lock_key = helper_keys("42")[0]
    with pytest.raises(SessionKeyError, match="reserved"):
        with Sessions(storage, initial=dict).open(lock_key) as s:
            s["n"] = 1
    with pytest.raises(SessionKeyError):
        storage.write(lock_key, 1)
    assert redis_client(redis_server).get(lock_key) is None


def test_a_hung_server_does_not_stop_the_renewals_on_another(redis_server: Any, tmp_path: Path) -> None:
    other = redis_servers.RedisServer(tmp_path / "other")
    try:
        hung = RedisStorage(redis_client(other, socket_timeout=30), prefix="h:", lock_expiry=0.3)
        healthy = fresh("redis", redis_server, lock_expiry=1.5)
        with hung.lock("k"):
            os.kill(other.proc.pid, signal.SIGSTOP)  # renewing this lock now blocks
            try:
                with Sessions(healthy, initial=dict).open("k") as s:
                    time.sleep(4.0)  # longer than the healthy server's expiry
                    s["n"] = 1
            finally:
                os.kill(other.proc.pid, signal.SIGCONT)
        assert healthy.read("k") == {"n": 1}
    finally:
        other.stop()


def test_json_refuses_a_lone_surrogate_and_an_infinite_expiry_is_refused(redis_server: Any) -> None:
    storage = fresh("redis", redis_server, codec="json")
    with pytest.raises(SerializationError, match="surrogate"):
        storage.write("k", {"s": "\ud800"})
    with pytest.raises(ValueError, match="lock_expiry"):
        RedisStorage(redis_client(redis_server), lock_expiry=float("inf"))


def test_a_session_entered_in_one_thread_and_left_in_another_commits_and_unlocks(redis_server: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    storage = fresh("redis", redis_server, lock_expiry=1.0)
    handle = Sessions(storage, initial=dict).open("k")
    with ThreadPoolExecutor(1) as enter_pool, ThreadPoolExecutor(1) as exit_pool:
        session = enter_pool.submit(handle.__enter__).result()
        session["n"] = 1
        exit_pool.submit(handle.__exit__, None, None, None).result()
    assert storage.read("k") == {"n": 1}
    assert not [h for h in list(redis_store._holds.values()) if h.storage is storage]
    with storage.lock("k", timeout=0.5):  # free at once, not after an expiry
        pass
    lost = Sessions(storage, initial=dict).open("k")
    with ThreadPoolExecutor(1) as enter_pool, ThreadPoolExecutor(1) as exit_pool:
        session = enter_pool.submit(lost.__enter__).result()
        session["n"] = 2
        redis_client(redis_server).delete(helper_keys(storage.prefix + "k")[0])
        with pytest.raises(LockLost):  # fenced from the other thread too
            exit_pool.submit(lost.__exit__, None, None, None).result()
    assert storage.read("k") == {"n": 1}


def test_keys_holding_markers_cannot_reach_another_sessions_helper_keys(redis_server: Any) -> None:
    from sessionkit import SessionKeyError

    storage = RedisStorage(redis_client(redis_server))
    victim = "x\x00sk-lock\x00y"
    for helper in helper_keys(victim):
        with pytest.raises(SessionKeyError):
            storage.write(helper, 1)
    with Sessions(storage, initial=dict).open(victim) as s:  # the victim itself is an ordinary key
        s["n"] = 1
    assert storage.read(victim) == {"n": 1} and victim in list(storage.keys())


def test_a_waiter_killed_while_waiting_does_not_pile_up_wake_ups(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    client = redis_client(redis_server)
    _, wake, wait, _ = helper_keys(storage.prefix + "k")
    client.set(wait, 1, px=60_000)  # what a waiter killed inside BLPOP leaves behind
    sessions = Sessions(storage, initial=dict)
    for _ in range(200):
        with sessions.open("k") as s:
            s["n"] = s.get("n", 0) + 1
    assert client.llen(wake) <= 1
    assert storage.read("k") == {"n": 200}


def test_the_same_server_by_two_addresses_refuses_a_nested_open(redis_server: Any) -> None:
    import redis

    first = fresh("redis", redis_server)
    second = RedisStorage(redis.Redis(host="localhost", port=redis_server.port), prefix=first.prefix)
    assert first._server != second._server
    with first.lock("k"):
        started = time.monotonic()
        with pytest.raises(SessionError, match="already open in this thread"):
            with second.lock("k"):
                pass
        assert time.monotonic() - started < 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_holds_of_the_parents_other_threads(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    with held_by_another_thread(storage, "k"):
        pid = os.fork()
        if pid == 0:
            code = 0
            for _ in range(5):  # new threads may get the parent's thread ids
                errors: list[BaseException] = []

                def write() -> None:
                    try:
                        storage.write("other", 1)
                        storage._raw_write("k", storage._raw_dumps(1))  # no hold of its own: a plain write
                    except BaseException as exc:  # noqa: BLE001
                        errors.append(exc)

                w = threading.Thread(target=write)
                w.start()
                w.join()
                code = code or (3 if errors else 0)
            code = code or (4 if any(h.storage is storage for h in list(redis_store._holds.values())) else 0)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0


def test_the_keep_alive_outlives_a_cluster_outage(tmp_path: Path) -> None:
    cluster = redis_servers.RedisCluster(tmp_path / "cluster")
    try:
        storage = RedisStorage(cluster.client(), prefix="ka:", lock_expiry=1.0)
        with pytest.raises(LockLost):
            with Sessions(storage, initial=dict).open("k") as s:
                s["n"] = 1
                for node in cluster.nodes:
                    node.stop()  # renewals fail, with the cluster client's own exceptions
                time.sleep(1.5)
                for node in cluster.nodes:
                    node.start()
                cluster.wait_ready()
        with Sessions(storage, initial=dict).open("k", timeout=5) as s:
            s["n"] = 2
            time.sleep(2.5)  # longer than the expiry: the keep-alive renews it again
        assert storage.read("k") == {"n": 2}
    finally:
        cluster.stop()


def test_a_key_of_the_wrong_type_fails_before_it_is_locked(redis_server: Any) -> None:
    storage = fresh("redis", redis_server)
    client = redis_client(redis_server)
    client.lpush(storage.prefix + "k", "not a session")
    with pytest.raises(StorageError, match="WRONGTYPE"):
        with Sessions(storage, initial=dict).open("k"):
            pass
    assert client.exists(helper_keys(storage.prefix + "k")[0]) == 0  # no lock left behind
