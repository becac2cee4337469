"""grammY's own session tests (test/convenience/session.test.ts), case by case.

A grammY middleware run becomes one ``with sessions.open(ctx) as s:`` block;
``ctx.session`` becomes ``s.data``.  Cases about promises are replaced by what
they mean for a blocking handler.
"""

from __future__ import annotations

from typing import Any

import pytest

from sessionkit import (
    MemoryStorage,
    MultiSessions,
    Sessions,
    SessionKeyError,
    enhance_storage,
)

from .helpers import FakeClock, RecordingStorage


def chat_key(ctx: dict[str, Any]) -> Any:
    return ctx.get("chat_id")


class Spy:
    """A zero-argument factory that counts its calls (grammY's spy(() => ({})))."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.make()


# -- describe("session") ------------------------------------------------------


def test_session_passes_through_updates() -> None:
    sessions = Sessions(get_key=chat_key)
    ran = []
    with sessions.open({"chat_id": 42}) as s:
        ran.append(s.key)
    assert ran == ["42"]


@pytest.mark.parametrize("lazy", [False, True])
def test_session_throws_when_reading_from_empty_session_key(lazy: bool) -> None:
    with pytest.raises(SessionKeyError):
        with Sessions(get_key=chat_key, lazy=lazy).open({}) as s:
            s.data
    with pytest.raises(SessionKeyError, match="get_key returned None"):
        with Sessions(get_key=lambda ctx: None, lazy=lazy).open({"chat_id": 42}) as s:
            s.data


@pytest.mark.parametrize("lazy", [False, True])
def test_session_throws_when_writing_to_empty_session_key(lazy: bool) -> None:
    with pytest.raises(SessionKeyError):
        with Sessions(get_key=lambda ctx: None, lazy=lazy).open({}) as s:
            s.data = 0


@pytest.mark.parametrize("lazy", [False, True])
def test_session_skips_write_upon_error(lazy: bool) -> None:
    storage = RecordingStorage({"42": 0})
    sessions = Sessions(storage, get_key=chat_key, lazy=lazy)
    with pytest.raises(RuntimeError, match="err"):
        with sessions.open({"chat_id": 42}) as s:
            s.data = s.data + 1 if lazy else 0
            raise RuntimeError("err")
    assert storage.args("read") == [("42",)]
    assert storage.count("write") == 0
    assert storage.count("delete") == 0


def _primitive_handler(s: Any) -> None:
    if s.data == 0:
        s.data = 1
    else:
        s.data = None


@pytest.mark.parametrize("lazy", [False, True])
def test_session_does_io_with_primitives(lazy: bool) -> None:
    storage = RecordingStorage({"42": 0})
    sessions = Sessions(storage, get_key=chat_key, lazy=lazy)
    returned = []
    for _ in range(2):
        with sessions.open({"chat_id": 42}) as s:
            returned.append(s.data)
            _primitive_handler(s)
    assert storage.args("read") == [("42",), ("42",)]
    assert returned == [0, 1]
    assert storage.args("write") == [("42", 1)]
    assert storage.args("delete") == [("42",)]


def test_session_works_with_custom_session_keys() -> None:
    storage = RecordingStorage({"xyz-1764": 0})
    sessions = Sessions(
        storage,
        prefix="xyz-",
        get_key=lambda ctx: str(ctx["chat_id"] ** 2) if ctx.get("chat_id") else None,
    )
    for _ in range(2):
        with sessions.open({"chat_id": 42}) as s:
            _primitive_handler(s)
    assert storage.args("read") == [("xyz-1764",), ("xyz-1764",)]
    assert storage.args("write") == [("xyz-1764", 1)]
    assert storage.args("delete") == [("xyz-1764",)]


def _object_handler(s: Any, seen: list[Any]) -> None:
    seen.append(dict(s.data))
    n = len(s.data)
    if n == 0:
        s["foo"] = 0
    elif n == 1:
        s["foo"] += 1
        s["bar"] = 0
    elif n == 2:
        s["bar"] += 1
        s["baz"] = 0
    elif n == 3:
        s.data = None


@pytest.mark.parametrize("lazy", [False, True])
def test_session_does_io_with_objects(lazy: bool) -> None:
    storage = RecordingStorage()
    initial = Spy(dict)
    sessions = Sessions(storage, get_key=chat_key, initial=initial, lazy=lazy)
    seen: list[Any] = []
    for _ in range(5):
        with sessions.open({"chat_id": 42}) as s:
            _object_handler(s, seen)
    assert seen == [{}, {"foo": 0}, {"foo": 1, "bar": 0}, {"foo": 1, "bar": 1, "baz": 0}, {}]
    assert storage.args("write") == [
        ("42", {"foo": 0}),
        ("42", {"foo": 1, "bar": 0}),
        ("42", {"foo": 1, "bar": 1, "baz": 0}),
        ("42", {"foo": 0}),
    ]
    assert storage.args("delete") == [("42",)]
    assert initial.calls == 2
    assert storage.count("read") == 5


# -- describe("multi session") ------------------------------------------------


def test_multi_passes_through_updates() -> None:
    multi = MultiSessions(prop=Sessions(get_key=chat_key))
    ran = []
    with multi.open({"chat_id": 42}) as m:
        ran.append(m.prop.key)
    assert ran == ["42"]


def test_multi_throws_when_reading_from_empty_session_key() -> None:
    with pytest.raises(SessionKeyError):
        with MultiSessions(prop=Sessions(get_key=chat_key)).open({}) as m:
            m.prop.data
    with pytest.raises(SessionKeyError):
        with MultiSessions(prop=Sessions(get_key=lambda c: None)).open({"chat_id": 42}) as m:
            m.prop.data


def test_multi_throws_when_writing_to_empty_session_key() -> None:
    with pytest.raises(SessionKeyError):
        with MultiSessions(prop=Sessions(get_key=lambda c: None)).open({}) as m:
            m.prop.data = 0


def test_multi_skips_write_upon_error() -> None:
    storage = RecordingStorage({"42": 0})
    multi = MultiSessions(prop=Sessions(storage, get_key=chat_key))
    with pytest.raises(RuntimeError):
        with multi.open({"chat_id": 42}) as m:
            m.prop.data = 0
            raise RuntimeError("err")
    assert storage.args("read") == [("42",)]
    assert storage.count("write") == 0
    assert storage.count("delete") == 0


def test_multi_does_io_with_objects() -> None:
    storage0, storage1 = RecordingStorage(), RecordingStorage()
    initial0, initial1 = Spy(dict), Spy(dict)
    multi = MultiSessions(
        prop0=Sessions(storage0, get_key=chat_key, initial=initial0),
        prop1=Sessions(storage1, get_key=chat_key, initial=initial1),
    )
    seen0: list[Any] = []
    for _ in range(5):
        with multi.open({"chat_id": 42}) as m:
            seen0.append(dict(m.prop0.data))
            n = len(m.prop0.data)
            if n == 0:
                m.prop0["foo"] = 0
                m.prop1["foo"] = 0
            elif n == 1:
                m.prop0["foo"] += 1
                m.prop0["bar"] = 0
                m.prop1["foo"] += 1
            elif n == 2:
                m.prop0["bar"] += 1
                m.prop0["baz"] = 0
                m.prop1["foo"] += 1
            else:
                m.delete()
    assert storage0.args("write") == [
        ("42", {"foo": 0}),
        ("42", {"foo": 1, "bar": 0}),
        ("42", {"foo": 1, "bar": 1, "baz": 0}),
        ("42", {"foo": 0}),
    ]
    assert storage1.args("write") == [
        ("42", {"foo": 0}),
        ("42", {"foo": 1}),
        ("42", {"foo": 2}),
        ("42", {"foo": 0}),
    ]
    for storage, initial in ((storage0, initial0), (storage1, initial1)):
        assert storage.args("delete") == [("42",)]
        assert initial.calls == 2
        assert storage.count("read") == 5


# -- describe("lazy session") -------------------------------------------------


def test_lazy_throws_when_used_with_multi_sessions() -> None:
    with pytest.raises(ValueError, match="lazy"):
        MultiSessions(prop=Sessions(lazy=True))


def test_lazy_passes_through_updates() -> None:
    storage = RecordingStorage()
    with Sessions(storage, lazy=True).open(42) as s:
        assert s.key == "42"
    assert storage.calls == []


def _lazy(storage: RecordingStorage) -> Sessions:
    return Sessions(storage, initial=lambda: 0, lazy=True)


def test_lazy_does_not_read_after_write() -> None:
    storage = RecordingStorage()
    with _lazy(storage).open(42) as s:
        s.data = 0
        assert s.data == 0
    assert storage.count("read") == 0
    assert storage.count("write") == 1


def test_lazy_does_not_write_if_nothing_was_read() -> None:
    storage = RecordingStorage()
    with _lazy(storage).open(42):
        pass
    assert storage.calls == []


def test_lazy_assignment_after_read_wins() -> None:
    # grammY: "should discard read if it completes after manual write"
    storage = RecordingStorage({"42": 7})
    with _lazy(storage).open(42) as s:
        assert s.data == 7
        s.data = 42
        assert s.data == 42
    assert storage.args("write") == [("42", 42)]


def test_lazy_writes_the_assigned_value_once() -> None:
    # grammY: "should await written promises": the value assigned is written
    storage = RecordingStorage()
    with _lazy(storage).open(42) as s:
        s.data = 42
    assert storage.args("write") == [("42", 42)]


def test_lazy_read_of_initial_is_written() -> None:
    # grammY: "should wait for read ops to complete"
    storage = RecordingStorage()
    with _lazy(storage).open(42) as s:
        assert s.data == 0
    assert storage.args("read") == [("42",)]
    assert storage.args("write") == [("42", 0)]


# -- describe("enhanceStorage") -----------------------------------------------

MIGRATIONS = {3: lambda old: old * 2, 12: lambda old: old**2, 1: lambda old: old + 10}


def test_enhance_reads_and_writes_nested_d() -> None:
    storage = RecordingStorage({"key": {"__d": {"__d": 42}}})
    enhanced = enhance_storage(storage)
    assert enhanced.read("key") == {"__d": 42}
    assert storage.args("read") == [("key",)]
    enhanced.write("key", {"__d": 42})
    assert storage.args("write") == [("key", {"__d": {"__d": 42}})]
    enhanced.delete("key")
    assert storage.args("delete") == [("key",)]


def test_enhance_supports_timeouts(clock: FakeClock) -> None:
    store = enhance_storage(MemoryStorage(), ttl=0.05, clock=clock)
    assert store.read("k") is None
    store.write("k", 42)
    assert store.read("k") == 42
    clock.tick(0.1)
    assert store.read("k") is None
    store.write("k", 42)
    assert store.read("k") == 42


def test_enhance_requires_migrations() -> None:
    with pytest.raises(ValueError, match="migrations"):
        enhance_storage(RecordingStorage(), migrations={})


def test_enhance_does_not_migrate_absent_values() -> None:
    def nope(old: Any) -> Any:
        raise AssertionError("nope")

    assert enhance_storage(RecordingStorage(), migrations={1: nope}).read("key") is None


def test_enhance_does_not_modify_write_and_delete_calls() -> None:
    storage = RecordingStorage()
    enhanced = enhance_storage(storage, migrations={1: lambda old: old})
    enhanced.write("key", 42)
    assert storage.args("write") == [("key", {"__d": 42, "v": 1})]
    enhanced.delete("key")
    assert storage.args("delete") == [("key",)]


@pytest.mark.parametrize(
    "stored, expected",
    [
        (0, 400),  # from the start: bare value is older than every version
        ({"__d": 5, "v": 3}, 25),  # from the middle
        ({"__d": 42, "v": 12}, 42),  # up to date
        ({"__d": 5, "v": 8}, 25),  # a version with no migration of its own
    ],
)
def test_enhance_runs_migrations(stored: Any, expected: int) -> None:
    enhanced = enhance_storage(RecordingStorage({"key": stored}), migrations=MIGRATIONS)
    assert enhanced.read("key") == expected


def test_enhance_combines_timeouts_and_migrations(clock: FakeClock) -> None:
    storage = MemoryStorage()
    enhanced = enhance_storage(storage, ttl=0.05, migrations=MIGRATIONS, clock=clock)
    storage.write("k", 0)
    assert enhanced.read("k") == 400
    clock.tick(0.1)
    assert enhanced.read("k") is None
    enhanced.write("k", 42)
    assert enhanced.read("k") == 42


# -- describe("MemorySessionStorage") -----------------------------------------


def test_memory_read_write_delete() -> None:
    store = MemoryStorage()
    assert store.read("k") is None
    store.write("k", 42)
    assert store.read("k") == 42
    store.delete("k")
    assert store.read("k") is None


def test_memory_enumerates_all_values() -> None:
    store = MemoryStorage()
    for i, v in enumerate([42, 43, 44]):
        store.write(f"k{i}", v)
    assert list(store.values()) == [42, 43, 44]


def test_memory_supports_timeouts(clock: FakeClock) -> None:
    store = MemoryStorage(ttl=0.05, clock=clock)
    store.write("k", 42)
    assert store.read("k") == 42
    clock.tick(0.1)
    assert store.read("k") is None
    store.write("k", 42)
    assert store.read("k") == 42
