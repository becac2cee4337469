"""MultiSessions: parts, deadlock-free locking, all-or-nothing on error, validation."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sessionkit import (
    CorruptSessionError,
    LockTimeout,
    MemoryStorage,
    MultiSessions,
    SerializationError,
    SessionError,
    Sessions,
    StorageError,
)

from .helpers import RecordingStorage


def test_parts_are_reached_by_attribute_and_item() -> None:
    multi = MultiSessions(
        prefs=Sessions(MemoryStorage(), initial=dict, prefix="p:"),
        cart=Sessions(MemoryStorage(), initial=list),
    )
    with multi.open(7) as m:
        m.prefs["lang"] = "en"
        m["cart"].data.append(17)
        assert m.prefs is m["prefs"]
        assert m.prefs.key == "p:7" and m.cart.key == "7"
        assert list(m) == ["prefs", "cart"]  # the order they were given
        with pytest.raises(AttributeError):
            m.nothing
    with multi.open(7) as m:
        assert m.prefs.data == {"lang": "en"} and m.cart.data == [17]


def test_error_in_block_writes_no_part() -> None:
    one, two = RecordingStorage({"1": 1}), RecordingStorage()
    multi = MultiSessions(a=Sessions(one), b=Sessions(two, initial=dict))
    with pytest.raises(RuntimeError):
        with multi.open(1) as m:
            m.a.data = 2
            m.b["x"] = 1
            raise RuntimeError
    assert one.count("write") == two.count("write") == 0
    with multi.open(1, timeout=0.01):  # both released
        pass


def test_delete_deletes_every_part() -> None:
    one, two = MemoryStorage(), MemoryStorage()
    one.write("1", 1)
    two.write("1", 2)
    with MultiSessions(a=Sessions(one), b=Sessions(two)).open(1) as m:
        m.delete()
    assert one.read("1") is None and two.read("1") is None


def test_a_value_that_cannot_be_stored_writes_no_part() -> None:
    before, after = MemoryStorage(), MemoryStorage()
    multi = MultiSessions(
        a=Sessions(before, initial=dict),
        b=Sessions(MemoryStorage(), initial=dict),
        c=Sessions(after, initial=dict),
    )
    with pytest.raises(SerializationError):
        with multi.open(1) as m:
            m.a["x"] = 1
            m.b["x"] = object()
            m.c["x"] = 1
    assert before.read("1") is None and after.read("1") is None
    with multi.open(1, timeout=0.01):  # every part was released
        pass


class _FullDisk(RecordingStorage):
    """A backend whose writes fail, as a full disk's do."""

    def write(self, key: str, value: Any) -> None:
        raise StorageError("no space left on device", key=key)


def test_failed_write_stops_later_parts_and_releases_all() -> None:
    before, after = MemoryStorage(), MemoryStorage()
    multi = MultiSessions(
        a=Sessions(before, initial=dict),
        b=Sessions(_FullDisk()),
        c=Sessions(after, initial=dict),
    )
    with pytest.raises(StorageError):
        with multi.open(1) as m:
            m.a["x"] = 1
            m.b.data = {"x": 1}
            m.c["x"] = 1
    assert before.read("1") == {"x": 1}
    assert after.read("1") is None
    with multi.open(1, timeout=0.01):
        pass


def _run_in_threads(works: list[Any], limit: float) -> list[threading.Thread]:
    """Start daemon threads (a deadlock must fail the test, not hang it); the hung ones."""
    threads = [threading.Thread(target=w, daemon=True) for w in works]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    return [t for t in threads if t.is_alive()]


@pytest.mark.parametrize("kind", ["memory", "lockless-storage"])
def test_opposite_orders_over_the_same_storages_never_deadlock(kind: str, fast_switching: None) -> None:
    make = MemoryStorage if kind == "memory" else RecordingStorage
    first, second = make(), make()
    # the same names mapped to the storages the other way round: locking by
    # name would take first->second in one and second->first in the other
    m1 = MultiSessions(a=Sessions(first, initial=dict), b=Sessions(second, initial=dict))
    m2 = MultiSessions(a=Sessions(second, initial=dict), b=Sessions(first, initial=dict))
    barrier = threading.Barrier(2)
    per_thread = 3000

    def work(multi: MultiSessions) -> None:
        barrier.wait()
        for _ in range(per_thread):
            with multi.open("k") as m:  # no timeout: a deadlock would hang
                m.a["n"] = m.a.get("n", 0) + 1
                m.b["n"] = m.b.get("n", 0) + 1

    hung = _run_in_threads([lambda: work(m1), lambda: work(m2)], 60)
    assert not hung, "two MultiSessions deadlocked"
    assert first.read("k") == {"n": 2 * per_thread} and second.read("k") == {"n": 2 * per_thread}


def test_a_multi_session_and_a_plain_session_on_shared_keys_never_deadlock() -> None:
    first, second = MemoryStorage(), MemoryStorage()
    multi = MultiSessions(a=Sessions(first, initial=dict), b=Sessions(second, initial=dict))
    plain = Sessions(second, initial=dict)
    per_thread = 1000

    def both() -> None:
        for _ in range(per_thread):
            with multi.open("k") as m:
                m.a["n"] = m.a.get("n", 0) + 1
                m.b["n"] = m.b.get("n", 0) + 1

    def one() -> None:
        for _ in range(per_thread):
            with plain.open("k") as s:
                s["n"] = s.get("n", 0) + 1

    assert not _run_in_threads([both, one], 60)
    assert second.read("k") == {"n": 2 * per_thread} and first.read("k") == {"n": per_thread}


def test_the_whole_lock_wait_is_bounded_by_the_timeout() -> None:
    storage = MemoryStorage()
    multi = MultiSessions(a=Sessions(MemoryStorage()), b=Sessions(storage))
    result: list[BaseException] = []

    def try_it() -> None:
        try:
            with multi.open("k", timeout=0.2):
                pass
        except BaseException as exc:
            result.append(exc)

    with Sessions(storage).open("k"):  # "b" is busy for the whole test
        assert not _run_in_threads([try_it], 10)
    assert len(result) == 1 and isinstance(result[0], LockTimeout)


def test_a_part_that_cannot_be_read_releases_every_part() -> None:
    good, bad = MemoryStorage(), MemoryStorage()
    bad._data["k"] = b"\xc1"  # not msgpack
    multi = MultiSessions(a=Sessions(good, initial=dict), b=Sessions(bad, initial=dict))
    with pytest.raises(CorruptSessionError):
        with multi.open("k"):
            pass
    with Sessions(good).open("k", timeout=0.01), Sessions(bad, lazy=True).open("k", timeout=0.01):
        pass
    assert not good._locks._held and not bad._locks._held


def test_a_part_that_cannot_lock_releases_the_parts_already_locked() -> None:
    first, second = MemoryStorage(), MemoryStorage()
    multi = MultiSessions(a=Sessions(first), b=Sessions(second))
    held = threading.Event()
    release = threading.Event()

    def hold_b() -> None:
        with Sessions(second).open("k"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold_b)
    t.start()
    held.wait(5)
    with pytest.raises(SessionError):
        with multi.open("k", timeout=0.02):
            pass
    with Sessions(first).open("k", timeout=0.01):  # "a" was released
        pass
    release.set()
    t.join()


@pytest.mark.parametrize("name", ["_private", "delete", "not-an-identifier", "1x"])
def test_bad_part_names(name: str) -> None:
    with pytest.raises(ValueError, match="part name"):
        MultiSessions(**{name: Sessions()})


def test_bad_parts() -> None:
    with pytest.raises(ValueError):
        MultiSessions()
    with pytest.raises(TypeError):
        MultiSessions(a=MemoryStorage())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lazy"):
        MultiSessions(a=Sessions(lazy=True))


def test_each_part_resolves_its_own_key() -> None:
    users, chats = RecordingStorage(), RecordingStorage()
    multi = MultiSessions(
        user=Sessions(users, get_key=lambda u: u["from"], initial=dict),
        chat=Sessions(chats, get_key=lambda u: u["chat"], initial=dict, prefix="c"),
    )
    update: dict[str, Any] = {"from": 1, "chat": -100}
    with multi.open(update) as m:
        m.user["seen"] = True
        m.chat["seen"] = True
    assert users.args("write") == [("1", {"seen": True})]
    assert chats.args("write") == [("c-100", {"seen": True})]


def test_two_parts_that_are_one_session_are_a_clear_error(tmp_path: Any) -> None:
    from sessionkit import MsgpackFileStorage

    storage = MemoryStorage()
    with pytest.raises(ValueError, match="same session"):
        with MultiSessions(a=Sessions(storage), b=Sessions(storage)).open("k"):
            pass
    first, second = MsgpackFileStorage(tmp_path / "s"), MsgpackFileStorage(tmp_path / "s")
    try:
        with pytest.raises(ValueError, match="same session"):
            with MultiSessions(a=Sessions(first), b=Sessions(second)).open("k"):
                pass
        with MultiSessions(a=Sessions(first, prefix="a:"), b=Sessions(second, prefix="b:")).open("k") as m:
            m.a.data, m.b.data = 1, 2  # different prefixes: two sessions
        assert (first.read("a:k"), first.read("b:k")) == (1, 2)
    finally:
        first.close()
        second.close()
