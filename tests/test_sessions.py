"""Sessions and Session: key resolution, the write-back rules, lazy mode, closed handles."""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionkit import MemoryStorage, Session, SessionError, SessionKeyError, Sessions

from .helpers import RecordingStorage

# -- key resolution -------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [(42, "p:42"), (-7, "p:-7"), ("abc", "p:abc"), ("", "p:"), (None, None)],
)
def test_key_resolution(given: Any, expected: Any) -> None:
    assert Sessions(prefix="p:").resolve_key(given) == expected
    with Sessions(prefix="p:").open(given) as s:
        assert s.key == expected


def test_int_and_str_subclasses_resolve_to_their_plain_value() -> None:
    class Color(enum.IntEnum):
        RED = 5

    class Name(str):
        def __str__(self) -> str:
            return "something else"

    assert Sessions().resolve_key(Color.RED) == "5"
    assert Sessions().resolve_key(Name("bob")) == "bob"


@pytest.mark.parametrize("bad", [True, False, 1.5, b"42", ("a",), object()])
def test_other_key_types_are_a_clear_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="session key"):
        Sessions().open(bad)


def test_get_key_derives_the_key_and_its_type_is_checked() -> None:
    sessions = Sessions(get_key=lambda update: update["chat"]["id"], prefix="chat:")
    with sessions.open({"chat": {"id": 9}}) as s:
        assert s.key == "chat:9"
    with pytest.raises(TypeError, match="get_key returned float"):
        Sessions(get_key=lambda u: 1.0).open({})


def test_none_key_runs_the_block_and_fails_only_on_access() -> None:
    storage = RecordingStorage()
    ran = False
    with Sessions(storage).open(None) as s:
        ran = True
        assert s.key is None
        for access in (lambda: s.data, lambda: s["x"], lambda: s.is_new, s.delete):
            with pytest.raises(SessionKeyError, match="no session"):
                access()
    assert ran and storage.calls == []


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="initial"):
        Sessions(initial={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read"):
        Sessions(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix"):
        Sessions(prefix=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"class MemoryStorage.*MemoryStorage\(\.\.\.\)"):
        Sessions(MemoryStorage)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad, error",
    [("5", TypeError), (True, TypeError), ([1], TypeError), (-1, ValueError), (float("nan"), ValueError)],
    ids=repr,
)
def test_bad_timeouts_fail_where_they_are_given(bad: Any, error: type) -> None:
    with pytest.raises(error, match="lock_timeout"):
        Sessions(lock_timeout=bad)
    sessions = Sessions()
    with pytest.raises(error, match="timeout"):
        sessions.open("k", timeout=bad)
    from sessionkit import MultiSessions

    with pytest.raises(error, match="timeout"):
        MultiSessions(a=sessions).open("k", timeout=bad)


def test_good_timeouts() -> None:
    for ok in (0, 0.5, 3, float("inf")):
        with Sessions(lock_timeout=ok).open("k", timeout=ok):
            pass


def test_enhance_storage_checks_its_migrations() -> None:
    from sessionkit import enhance_storage

    with pytest.raises(TypeError, match="migrations must be a mapping"):
        enhance_storage(MemoryStorage(), migrations=[lambda old: old])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not callable"):
        enhance_storage(MemoryStorage(), migrations={1: "upgrade"})  # type: ignore[dict-item]


def test_a_handle_never_entered_holds_nothing_and_says_how_to_use_it() -> None:
    storage = RecordingStorage()
    sessions = Sessions(storage, initial=dict)
    forgotten = sessions.open("k")  # no `with`
    with pytest.raises(SessionError, match=r"with sessions\.open\(key\) as s"):
        forgotten["n"] = 1
    with pytest.raises(SessionError, match="not entered"):
        forgotten.data
    with pytest.raises(SessionError, match="not entered"):
        forgotten.data = {}
    with sessions.open("k", timeout=0.01) as s:  # the key is free
        s["n"] = 1
    assert storage.count("read") == 1 and storage.args("write") == [("k", {"n": 1})]
    with pytest.raises(SessionError, match="already used"):
        with_block = sessions.open("k")
        with with_block:
            pass
        with with_block:
            pass


# -- write-back rules -----------------------------------------------------------


@pytest.fixture(params=["memory", "plain"])
def store(request: Any) -> Any:
    """A built-in storage (encoded fast path) and a plain user storage."""
    return MemoryStorage() if request.param == "memory" else RecordingStorage()


def test_rule1_lock_is_held_from_read_to_write_back(store: Any) -> None:
    sessions = Sessions(store, initial=dict)
    with sessions.open("k"):
        with pytest.raises(Exception) as info:
            with sessions.open("k", timeout=0.01):
                pass
        assert isinstance(info.value, SessionError)
    with sessions.open("k", timeout=0.01):  # released on exit
        pass


def test_rule2_exception_writes_nothing_and_propagates_unchanged(store: Any) -> None:
    sessions = Sessions(store, initial=dict)
    with sessions.open("k") as s:
        s["list"] = [1]
    error = ValueError("boom")
    with pytest.raises(ValueError) as info:
        with sessions.open("k") as s:
            s["list"].append(2)
            s["new"] = 1
            raise error
    assert info.value is error
    assert store.read("k") == {"list": [1]} or isinstance(store, RecordingStorage)
    with sessions.open("k", timeout=0.01) as s:  # lock released
        if not isinstance(store, RecordingStorage):
            assert s.data == {"list": [1]}


def test_rule2_nested_changes_before_error_are_invisible_on_builtin_storage() -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)
    with sessions.open("k") as s:
        s["list"] = [1]
    with pytest.raises(RuntimeError):
        with sessions.open("k") as s:
            s["list"].append(2)
            raise RuntimeError
    with sessions.open("k") as s:
        assert s["list"] == [1]


def test_rule2_delete_before_error_is_not_done(store: Any) -> None:
    store.write("k", {"a": 1})
    with pytest.raises(RuntimeError):
        with Sessions(store).open("k") as s:
            s.delete()
            raise RuntimeError
    assert store.read("k") == {"a": 1}


def test_rule3_unchanged_read_is_not_rewritten() -> None:
    storage = RecordingStorage({"k": {"a": [1, 2]}})
    with Sessions(storage).open("k") as s:
        assert s["a"] == [1, 2]
    assert storage.count("write") == 0


def test_rule3_nested_in_place_change_is_written(store: Any) -> None:
    store.write("k", {"a": {"b": [1]}})
    with Sessions(store).open("k") as s:
        s["a"]["b"].append(2)
    assert store.read("k") == {"a": {"b": [1, 2]}}


def test_rule3_assignment_is_written_even_if_equal() -> None:
    storage = RecordingStorage({"k": 5})
    with Sessions(storage).open("k") as s:
        s.data = 5
    assert storage.args("write") == [("k", 5)]


def test_rule3_none_deletes(store: Any) -> None:
    store.write("k", {"a": 1})
    with Sessions(store).open("k") as s:
        s.data = None
    assert store.read("k") is None


def test_rule3_write_unchanged_writes_what_was_read() -> None:
    storage = RecordingStorage({"k": {"a": 1}})
    with Sessions(storage, write_unchanged=True).open("k") as s:
        s.data
    assert storage.args("write") == [("k", {"a": 1})]


@pytest.mark.parametrize("write_unchanged", [False, True])
def test_rule3_write_unchanged_slides_a_ttl(write_unchanged: bool) -> None:
    from .helpers import FakeClock

    clock = FakeClock()
    storage = MemoryStorage(ttl=10, clock=clock)
    storage.write("k", {"a": 1})
    clock.tick(6)
    with Sessions(storage, write_unchanged=write_unchanged).open("k") as s:
        assert s["a"] == 1
    clock.tick(6)
    assert storage.has("k") is write_unchanged


def test_rule3_untouched_eager_session_is_not_written_and_absent_stays_absent() -> None:
    storage = RecordingStorage()
    with Sessions(storage).open("k"):
        pass
    with Sessions(storage).open("k") as s:
        assert s.data is None
    assert storage.count("write") == 0 and storage.count("delete") == 0


def test_rule4_initial_only_when_storage_is_empty_and_counts_as_change(store: Any) -> None:
    calls = []

    def initial() -> dict[str, int]:
        calls.append(1)
        return {"n": 0}

    sessions = Sessions(store, initial=initial)
    with sessions.open("k") as s:
        assert s.is_new
        assert s.data == {"n": 0}
    assert store.read("k") == {"n": 0}
    with sessions.open("k") as s:
        assert not s.is_new
    assert len(calls) == 1


def test_rule5_lazy_untouched_session_costs_nothing() -> None:
    storage = RecordingStorage({"k": 1})
    sessions = Sessions(storage, lazy=True)
    with sessions.open("k"):
        # not even locked: another handle can take the key meanwhile
        with sessions.open("k", lazy=False, timeout=0.01) as other:
            assert other.data == 1
    assert storage.args("read") == [("k",)]


def test_rule5_lazy_locks_at_first_touch() -> None:
    sessions = Sessions(MemoryStorage(), lazy=True, initial=dict)
    with sessions.open("k") as s:
        s["a"] = 1
        with pytest.raises(SessionError):
            with sessions.open("k", lazy=False, timeout=0.01):
                pass


def test_open_lazy_overrides_the_default() -> None:
    storage = RecordingStorage()
    with Sessions(storage).open("k", lazy=True):
        pass
    with Sessions(storage, lazy=True).open("k", lazy=False):
        pass
    assert storage.args("read") == [("k",)]


def test_is_new_after_assignment_asks_the_storage(store: Any) -> None:
    store.write("old", 1)
    sessions = Sessions(store, lazy=True)
    with sessions.open("old") as s:
        s.data = 2
        assert s.is_new is False
        assert s.data == 2
    with sessions.open("fresh") as s:
        s.data = 2
        assert s.is_new is True
    assert store.read("old") == 2


# -- the handle -------------------------------------------------------------------


def test_mapping_methods_act_on_a_dict_value(store: Any) -> None:
    with Sessions(store, initial=dict).open("k") as s:
        s["a"] = 1
        s.update({"b": 2}, c=3)
        assert s.setdefault("d", 4) == 4
        assert s.pop("d") == 4
        assert s.pop("zz", None) is None
        del s["c"]
        assert "a" in s and "c" not in s
        assert len(s) == 2
        assert list(s) == ["a", "b"]
        assert list(s.keys()) == ["a", "b"]
        assert list(s.values()) == [1, 2]
        assert list(s.items()) == [("a", 1), ("b", 2)]
        assert s.get("zz", 9) == 9
    assert store.read("k") == {"a": 1, "b": 2}


def test_mapping_methods_on_non_dict_are_type_error_with_hint() -> None:
    with Sessions().open("k") as s:
        with pytest.raises(TypeError, match="initial=dict"):
            s["a"] = 1
    with Sessions(initial=list).open("k") as s:
        s.data.append(1)
        with pytest.raises(TypeError, match="list"):
            s.get("a")


def test_handle_is_closed_after_the_block() -> None:
    sessions = Sessions(initial=dict)
    with sessions.open("k") as s:
        s["a"] = 1
    assert s.key == "k"
    for access in (lambda: s.data, lambda: s["a"], lambda: s.is_new, s.delete, lambda: len(s)):
        with pytest.raises(SessionError, match="closed"):
            access()
    with pytest.raises(SessionError, match="closed"):
        s.data = 1
    with pytest.raises(SessionError):
        with s:
            pass


def test_handle_is_closed_after_an_error_too() -> None:
    with pytest.raises(KeyError):
        with Sessions(initial=dict).open("k") as s:
            s["missing"]
    with pytest.raises(SessionError, match="closed"):
        s.data


def test_open_returns_a_session() -> None:
    handle = Sessions().open("k")
    assert isinstance(handle, Session)
    assert "k" in repr(handle)


def test_encode_error_at_write_back_keeps_stored_value_and_releases_lock() -> None:
    from sessionkit import SerializationError

    storage = MemoryStorage()
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["a"] = 1
    with pytest.raises(SerializationError) as info:
        with sessions.open("k") as s:
            s["a"] = {1, 2}
    assert info.value.key == "k"
    assert storage.read("k") == {"a": 1}
    with sessions.open("k", timeout=0.01):
        pass


@pytest.mark.parametrize("kind", ["memory", "msgpack"])
def test_a_huge_session_leaves_no_encoding_buffer_behind(kind: str, tmp_path: Path) -> None:
    """The write-back of a session inlines the codec's encoding (the memory
    and disk fast paths): a thread's packer that encoded a huge value must be
    let go as ``_codec.dumps`` lets it go, not keep a buffer that large for ever."""
    code = (
        "import sys\n"
        "from sessionkit import MemoryStorage, MsgpackFileStorage, Sessions\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) // 1024\n"
        f"storage = MemoryStorage() if {kind!r} == 'memory' else MsgpackFileStorage(sys.argv[1])\n"
        "sessions = Sessions(storage, initial=dict)\n"
        "with sessions.open('small') as s: s['n'] = 1\n"
        "base = rss()\n"
        "with sessions.open('big') as s: s['blob'] = b'x' * (150 << 20)\n"
        "del s\n"
        "storage.delete('big')\n"
        "print(rss() - base)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept = int(done.stdout)
    assert kept < 60, f"{kept} MB kept after writing back a 150 MB session"
