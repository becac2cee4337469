"""Per-key locking: exclusion, timeouts, re-entry, bounded lock tables, and races."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import pytest

from sessionkit import LockTimeout, MemoryStorage, SessionError, Sessions
from sessionkit._locks import KeyLocks, shared_key_locks

from .helpers import NoLock, RecordingStorage, SlowStorage


def in_threads(work: Callable[[int], None], threads: int) -> None:
    """Run ``work(n)`` in ``threads`` threads started together; re-raise what any of them raised."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait()
            work(n)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors


def hammer(sessions: Sessions, keys: list[str], threads: int, per_thread: int) -> None:
    """``threads`` threads each increment ``per_thread`` times, round-robin over ``keys``."""

    def work(n: int) -> None:
        for i in range(per_thread):
            with sessions.open(keys[(n + i) % len(keys)]) as s:
                s["n"] = s.get("n", 0) + 1

    in_threads(work, threads)


def total(sessions: Sessions, keys: list[str]) -> int:
    count = 0
    for key in keys:
        with sessions.open(key) as s:
            count += s.get("n", 0)
    return count


# -- races ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [MemoryStorage, RecordingStorage], ids=["own-lock", "shared-lock"])
def test_slow_storage_race_loses_no_update(make: Callable[[], Any]) -> None:
    sessions = Sessions(SlowStorage(make(), delay=0.0005), initial=dict)
    hammer(sessions, ["k"], threads=8, per_thread=25)
    assert total(sessions, ["k"]) == 200


def test_slow_storage_race_loses_updates_without_a_lock() -> None:
    """The race test above is real: with a lock that locks nothing it fails."""
    storage = SlowStorage(MemoryStorage(), delay=0.0005, with_lock=False)
    storage.lock = NoLock()  # type: ignore[attr-defined]
    sessions = Sessions(storage, initial=dict)
    hammer(sessions, ["k"], threads=8, per_thread=25)
    assert total(sessions, ["k"]) < 200


def test_memory_race_with_fast_thread_switching(fast_switching: None, backend: str) -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)
    hammer(sessions, ["a", "b"], threads=8, per_thread=500)
    assert total(sessions, ["a", "b"]) == 4000


class _HoldsNothing(dict):  # type: ignore[type-arg]
    """A held-keys table that never records a holder: no lock at all."""

    def get(self, key: Any, default: Any = None) -> Any:
        return None

    def setdefault(self, key: Any, value: Any = None) -> Any:
        return value

    def __delitem__(self, key: Any) -> None:
        pass


def test_memory_race_fails_without_the_lock(fast_switching: None) -> None:
    storage = MemoryStorage()
    fast = storage._fast
    storage._fast = (_HoldsNothing(),) + fast[1:]  # type: ignore[assignment]
    sessions = Sessions(storage, initial=dict)
    hammer(sessions, ["a"], threads=8, per_thread=2000)
    assert total(sessions, ["a"]) < 16000


# -- exclusion and timeouts -----------------------------------------------------------


def test_lock_timeout_is_a_timeout_error_with_the_key() -> None:
    sessions = Sessions(MemoryStorage(), lock_timeout=0.05)
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with sessions.open("k"):
            held.set()
            done.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    start = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        with sessions.open("k"):
            pass
    assert time.monotonic() - start >= 0.04
    assert isinstance(info.value, TimeoutError) and info.value.key == "k"
    with pytest.raises(LockTimeout):
        with sessions.open("k", timeout=0):
            pass
    done.set()
    t.join()
    with sessions.open("k", timeout=0.5):
        pass


def test_a_held_key_never_delays_another_key() -> None:
    sessions = Sessions(MemoryStorage())
    with sessions.open("a"):
        seen = []
        t = threading.Thread(target=lambda: seen.append(sessions.open("b", timeout=0.5).__enter__()))
        t.start()
        t.join()
        assert seen and seen[0].key == "b"
        seen[0].__exit__(None, None, None)


def test_sessions_over_one_plain_storage_share_the_lock() -> None:
    storage = RecordingStorage()
    one, two = Sessions(storage), Sessions(storage, initial=dict)
    outcome: list[Any] = []

    def other_thread() -> None:
        try:
            with two.open("k", timeout=0.01):
                outcome.append("entered")
        except LockTimeout as exc:
            outcome.append(exc)

    with one.open("k"):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert isinstance(outcome[0], LockTimeout)
    assert shared_key_locks(storage) is shared_key_locks(storage)


def test_reopening_a_key_held_by_this_thread_is_an_error_not_a_deadlock() -> None:
    for storage in (MemoryStorage(), RecordingStorage()):
        sessions = Sessions(storage)
        with sessions.open("k"):
            with pytest.raises(SessionError, match="already open in this thread"):
                sessions.open("k").__enter__()
            with sessions.open("other"):
                pass


def test_lazy_reopen_in_same_thread_is_an_error_at_first_touch() -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)
    with sessions.open("k"):
        with sessions.open("k", lazy=True) as inner:
            with pytest.raises(SessionError, match="already open"):
                inner["x"] = 1


def test_lock_table_does_not_grow_with_keys_seen() -> None:
    storage = MemoryStorage()
    sessions = Sessions(storage, initial=dict)
    for i in range(2000):
        with sessions.open(f"user-{i}") as s:
            s["n"] = 1
    assert len(storage._locks) == 0
    plain = RecordingStorage()
    plain_sessions = Sessions(plain)
    for i in range(2000):
        with plain_sessions.open(i):
            pass
    assert len(shared_key_locks(plain)) == 0


def test_lock_table_entry_is_dropped_after_timeouts() -> None:
    locks = KeyLocks()
    locks.acquire("k")
    t = threading.Thread(target=lambda: pytest.raises(LockTimeout, locks.acquire, "k", 0.01))
    t.start()
    t.join()
    locks.release("k")
    assert len(locks) == 0


def test_storage_lock_context_manager() -> None:
    storage = MemoryStorage()
    with storage.lock("k"):
        assert storage._locks.held_by_me("k")
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(pytest.raises(LockTimeout, storage.lock("k", 0.01).__enter__)))
        t.start()
        t.join()
        assert result
    assert not storage._locks.held_by_me("k")


def test_a_storage_own_lock_is_used() -> None:
    class Locked(RecordingStorage):
        def __init__(self) -> None:
            super().__init__()
            self.locked: list[str] = []

        def lock(self, key: str, timeout: float | None = None) -> Any:
            self.locked.append(key)
            return shared_key_locks(self).lock(key, timeout)

    storage = Locked()
    with Sessions(storage).open(5):
        pass
    assert storage.locked == ["5"]


def test_a_waiter_whose_wake_up_was_lost_looks_again() -> None:
    """A releasing thread interrupted between unlocking and notifying (an
    exception raised asynchronously) must not leave a waiter asleep for ever."""
    locks = KeyLocks()
    locks.acquire("k")
    got = threading.Event()

    def wait() -> None:
        locks.acquire("k")  # no timeout
        got.set()
        locks.release("k")

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not locks._waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert locks._waiting, "the waiter never started waiting"
    del locks._held["k"]  # released, but the notify is lost
    assert got.wait(3), "the waiter slept through a free key"
    t.join(5)


# -- fairness -------------------------------------------------------------------------


def contend(sessions: Sessions, threads: int, seconds: float) -> tuple[list[int], float]:
    """``threads`` threads re-enter one key in a tight loop: entries per thread, longest wait (s)."""
    entries = [0] * threads
    longest = [0.0] * threads

    def work(n: int) -> None:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            asked = time.monotonic()
            with sessions.open("hot") as s:
                longest[n] = max(longest[n], time.monotonic() - asked)
                s["n"] = s.get("n", 0) + 1
            entries[n] += 1

    in_threads(work, threads)
    with sessions.open("hot") as s:
        assert s["n"] == sum(entries)
    return entries, max(longest)


def test_no_thread_starves_on_a_hot_key(storage: Any) -> None:
    """Eight threads re-entering one key back to back all get in, and none waits long.

    Without the hand-off to a long waiter, the thread that releases takes the
    key again before a woken waiter runs: on the disk backends one thread got
    every entry for the whole run and the seven others none.
    """
    entries, longest = contend(Sessions(storage, initial=dict), threads=8, seconds=2.0)
    mean = sum(entries) / len(entries)
    assert min(entries) >= 0.2 * mean, f"a thread starved: entries per thread {entries}"
    # (a loaded machine can stop a thread for a while: the bound is for starving, not for speed)
    assert longest < 1.5, f"a thread waited {longest:.3f} s (entries per thread {entries})"


def test_a_release_hands_the_key_to_a_long_waiter() -> None:
    """Once the head of the queue has waited HANDOFF_AFTER, the key is its own at the release."""
    locks = KeyLocks()
    locks.acquire("k")
    got = threading.Event()
    t = threading.Thread(target=lambda: (locks.acquire("k"), got.set(), locks.release("k")), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # queued, for well past HANDOFF_AFTER
        queue = locks._waiting.get("k")
        if queue and time.monotonic() - queue[0].since > 0.01:
            break
        time.sleep(0.001)
    locks.release("k")
    # The releasing thread asks again at once: the key is already the waiter's.
    try:
        locks.acquire("k", 0)
    except LockTimeout:
        pass
    else:
        locks.release("k")
        pytest.fail("the releasing thread took the key back from a waiter that had waited long")
    assert got.wait(5)
    t.join(5)
    assert len(locks) == 0


def test_waiters_enter_in_the_order_they_came() -> None:
    locks = KeyLocks()
    locks.acquire("k")
    order: list[int] = []

    def wait(n: int) -> None:
        locks.acquire("k")
        order.append(n)
        locks.release("k")

    pool = []
    for n in range(5):
        t = threading.Thread(target=wait, args=(n,), daemon=True)
        t.start()
        pool.append(t)
        deadline = time.monotonic() + 5
        while (len(locks._waiting.get("k", ())) < n + 1) and time.monotonic() < deadline:
            time.sleep(0.001)
    time.sleep(0.01)
    locks.release("k")
    for t in pool:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert len(locks) == 0


def test_a_waiter_handed_the_key_as_it_times_out_passes_it_on() -> None:
    """A timeout raised while the key is being handed over must not leave it held by nobody."""
    locks = KeyLocks()
    locks.acquire("k")
    outcomes: list[str] = []

    def wait(timeout: float | None) -> None:
        try:
            locks.acquire("k", timeout)
        except LockTimeout:
            outcomes.append("timeout")
            return
        outcomes.append("entered")
        locks.release("k")

    first = threading.Thread(target=wait, args=(0.05,))
    second = threading.Thread(target=wait, args=(None,))
    first.start()
    time.sleep(0.01)
    second.start()
    time.sleep(0.08)  # the first has timed out, or is timing out
    locks.release("k")
    first.join(5)
    second.join(5)
    assert "entered" in outcomes and len(outcomes) == 2
    assert len(locks) == 0


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "another-waiter"])
def test_a_waiter_interrupted_as_it_is_handed_the_key_lets_it_go(others: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal handler that raises (a bot's SIGTERM handler raising SystemExit) in a thread just
    handed the key: that exception comes out, the key goes to the next waiter (or is free), and
    no entry is left behind."""
    import signal

    from sessionkit import _locks

    # A waiter that missed its wake-up would look again only after 30 s: the bound below tells
    # a woken waiter from one that slept through the free key, on however loaded a machine.
    monkeypatch.setattr(_locks, "_RECHECK", 30.0)
    locks = KeyLocks()
    entered: list[float] = []

    main = threading.get_ident()

    def main_queued() -> bool:
        queue = locks._waiting.get("k")
        return bool(queue) and queue[0].ident == main

    def other() -> None:
        deadline = time.monotonic() + 10
        while not main_queued() and time.monotonic() < deadline:  # queued after the main thread
            time.sleep(0.001)
        locks.acquire("k", 60)
        entered.append(time.monotonic())
        locks.release("k")

    held = threading.Event()

    def holder() -> None:
        locks.acquire("k")
        held.set()
        # Wait until the main thread is queued and has waited longer than HANDOFF_AFTER (a
        # fixed sleep let a loaded machine deliver the signal before the main thread queued).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            queue = locks._waiting.get("k")
            if main_queued() and len(queue) == 1 + others and time.monotonic() - queue[0].since > 0.01:
                break
            time.sleep(0.001)
        with locks._mutex:  # the release's own critical section, with the signal landing in it
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            del locks._held["k"]
            locks._wake("k", locks._waiting["k"])  # what release() does: the main thread is handed the key

    def interrupt(*_: Any) -> None:
        raise _Interrupt()

    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threads = [threading.Thread(target=holder, daemon=True)]
        threads[0].start()
        assert held.wait(5)
        for _ in range(others):
            t = threading.Thread(target=other, daemon=True)
            threads.append(t)
            t.start()  # it queues once the main thread has: the main thread is the head
        with pytest.raises(_Interrupt):
            locks.acquire("k")
        interrupted = time.monotonic()
        for t in threads:
            t.join(10)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert len(entered) == others
    assert all(at - interrupted < 10 for at in entered), "the next waiter slept through the free key"
    assert len(locks) == 0, (locks._held, locks._waiting)


def _interrupt_after_call(code: Any, offset: int) -> tuple[Any, list[bool]]:
    """A trace function raising ``KeyboardInterrupt`` when ``code`` first
    reaches the instruction at ``offset``, one that follows a call: where
    Python raises the exception of a signal handler that ran as the call
    returned (it checks for them as calls return, and at loops)."""
    fired: list[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode" and frame.f_lasti == offset and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        return local

    return calls, fired


@pytest.mark.parametrize("contended", [False, True], ids=["free", "waited for"])
def test_an_interrupt_anywhere_in_taking_a_disk_sessions_key_leaves_it_free(tmp_path: Any, contended: bool) -> None:
    """A ``KeyboardInterrupt`` lands as each call returns, in turn, in the
    code that takes a msgpack session's key (free, or held a moment by
    another thread, so that this one queues for it): afterwards the key is
    free for another thread, this thread opens it again (no "already open"),
    no waiter is left queued (a release would hand the key to it, and every
    thread would wait for ever), the lock table's mutex is free (a sleeping
    waiter lets it go and takes it back), and its byte of the lock file is
    free for other processes."""
    import dis
    import fcntl
    import struct
    import sys

    from sessionkit import MsgpackFileStorage
    from sessionkit.storage._lockfile import key_slot
    from sessionkit.storage._state import ProcessKeyLocks

    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    sessions = Sessions(storage, initial=dict)
    keys = storage._keylocks
    probe = os.open(tmp_path / "store" / "sessionkit.lock", os.O_RDWR)
    slot = key_slot("k")
    codes = [ProcessKeyLocks.acquire.__code__, KeyLocks.acquire.__code__, KeyLocks._wait.__code__,
             KeyLocks._sleep.__code__, MsgpackFileStorage._lock_read.__code__]
    hit = 0
    try:
        for code in codes:
            instructions = list(dis.get_instructions(code))
            for call, after in zip(instructions, instructions[1:]):
                if not call.opname.startswith("CALL"):
                    continue
                holder = None
                if contended:
                    entered = threading.Event()

                    def hold() -> None:
                        with sessions.open("k"):
                            entered.set()
                            time.sleep(0.01)

                    holder = threading.Thread(target=hold)
                    holder.start()
                    entered.wait(5)
                tracer, fired = _interrupt_after_call(code, after.offset)
                sys.settrace(tracer)
                try:
                    with sessions.open("k") as s:
                        s["n"] = s.get("n", 0) + 1
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                if holder is not None:
                    holder.join(5)
                hit += bool(fired)
                where = f"{code.co_name}, at byte {after.offset}"
                assert not keys.threads._waiting, where
                mutex = keys.threads._mutex  # free (and no RuntimeError for a mutex let go twice):
                assert not mutex._is_owned() and mutex.acquire(blocking=False), where  # not held here nor elsewhere
                mutex.release()
                # before this process takes the key again (which would clear a byte it left locked)
                fcntl.fcntl(probe, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, slot, 1, 0))  # F_OFD_SETLK
                fcntl.fcntl(probe, 37, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, slot, 1, 0))
                other: list[str] = []

                def take() -> None:
                    with Sessions(storage, initial=dict, lock_timeout=2).open("k"):
                        other.append("taken")

                taker = threading.Thread(target=take)
                taker.start()
                taker.join(10)
                assert other == ["taken"], where
                with sessions.open("k", timeout=2):  # not "already open in this thread"
                    pass
    finally:
        os.close(probe)
        storage.close()
    assert hit >= (12 if contended else 5), hit  # the interrupts did land inside


def test_a_signal_as_a_waiter_takes_the_mutex_back_leaves_the_mutex_to_its_holder() -> None:
    """A signal handler raises while a waiting thread (the main thread) is
    blocked taking the lock table's mutex back, which another thread holds: a
    blocking acquire cut short that way has not taken it.  The exception comes
    out as itself, once the waiter has taken the mutex back; the thread that
    held the mutex meanwhile lets it go without error (it used to be let go
    for it, under its feet, or it got ``RuntimeError``); the mutex ends free."""
    import signal

    locks = KeyLocks()
    holder_in, holder_out, taken, hog_done = (threading.Event() for _ in range(4))
    errors: list[BaseException] = []

    def holder() -> None:
        locks.acquire("k")
        holder_in.set()
        holder_out.wait(10)
        locks.release("k")

    def hog() -> None:  # inside the table's critical section while the waiter wakes up
        time.sleep(0.05)  # the waiter sleeps, the mutex let go
        locks._mutex.acquire()
        taken.set()
        time.sleep(0.6)  # the waiter's sleep (0.3 s) ends: it blocks taking the mutex back
        try:
            locks._mutex.release()
        except RuntimeError as exc:
            errors.append(exc)
        hog_done.set()

    def kick() -> None:
        taken.wait(10)
        time.sleep(0.4)
        os.kill(os.getpid(), signal.SIGUSR1)

    def interrupt(*_: Any) -> None:
        raise _Interrupt()

    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert holder_in.wait(5)
        for target in (hog, kick):
            threading.Thread(target=target, daemon=True).start()
        with pytest.raises(_Interrupt):
            locks.acquire("k", timeout=0.3)
        assert hog_done.wait(5)
    finally:
        signal.signal(signal.SIGUSR1, old)
        holder_out.set()
    assert errors == []
    assert not locks._mutex._is_owned() and locks._mutex.acquire(blocking=False)  # free
    locks._mutex.release()
    assert not locks._waiting
