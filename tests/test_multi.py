"""MultiSessions: parts, ordering, all-or-nothing on error, validation."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sessionkit import MemoryStorage, MultiSessions, SessionError, Sessions

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
        assert list(m) == ["cart", "prefs"]
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


def test_failed_write_stops_later_parts_and_releases_all() -> None:
    good_before, good_after = MemoryStorage(), MemoryStorage()
    multi = MultiSessions(
        a=Sessions(good_before, initial=dict),
        b=Sessions(MemoryStorage(), initial=dict),
        c=Sessions(good_after, initial=dict),
    )
    from sessionkit import SerializationError

    with pytest.raises(SerializationError):
        with multi.open(1) as m:
            m.a["x"] = 1
            m.b["x"] = object()
            m.c["x"] = 1
    assert good_before.read("1") == {"x": 1}
    assert good_after.read("1") is None
    with multi.open(1, timeout=0.01):
        pass


def test_parts_lock_in_sorted_order_so_two_threads_never_deadlock() -> None:
    first, second = MemoryStorage(), MemoryStorage()
    # declared in opposite orders: both still lock "a" before "z"
    m1 = MultiSessions(z=Sessions(second, initial=dict), a=Sessions(first, initial=dict))
    m2 = MultiSessions(a=Sessions(first, initial=dict), z=Sessions(second, initial=dict))
    barrier = threading.Barrier(2)

    def work(multi: MultiSessions) -> None:
        barrier.wait()
        for _ in range(300):
            with multi.open("k", timeout=5) as m:
                m.a["n"] = m.a.get("n", 0) + 1
                m.z["n"] = m.z.get("n", 0) + 1

    threads = [threading.Thread(target=work, args=(m,)) for m in (m1, m2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert first.read("k") == {"n": 600} and second.read("k") == {"n": 600}


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
