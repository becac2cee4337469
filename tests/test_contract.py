"""The storage contract, run against every backend (the ``backend`` fixture).

A new backend joins by adding itself to ``conftest.BACKENDS``; it then has to
keep every promise below.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import pytest

from sessionkit import (
    LockTimeout,
    SerializationError,
    Sessions,
    StorageAdapter,
    enhance_storage,
)

from .conftest import REAL_CLOCK
from .helpers import FakeClock

VALUES = [
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    True,
    False,
    "",
    "naïve ✓",
    b"\x00\xff",
    [],
    [1, [2, [3]]],
    {},
    {"a": {"b": [1, 2, {"c": None}]}},
    {1: "int key", "s": "str key", b"b": "bytes key"},
]

# What each kind of backend cannot store: msgpack holds JSON-like data,
# pickle holds almost anything but functions, locks and the like.
UNSTORABLE = {
    "msgpack": [{1, 2}, object(), 2**64, -(2**63) - 1, {"a": lambda: 0}],
    "pickle": [lambda: 0, {"a": threading.Lock()}, [(x for x in [])], memoryview(b"x"), {"c": threading.Condition()}],
}
CODING = {"memory": "msgpack", "msgpack": "msgpack", "shelve": "pickle", "redis": "msgpack", "redis-cluster": "msgpack"}

HOSTILE_KEYS = ["../../x", "/etc/passwd", "", "a\x00b", "k" * 5000, "ключ🔑", ".", "..", "CON", " "]


def test_is_a_storage_adapter(storage: Any) -> None:
    assert isinstance(storage, StorageAdapter)
    for name in ("has", "keys", "values", "items", "lock", "close"):
        assert callable(getattr(storage, name))


def test_absent_reads_none(storage: Any) -> None:
    assert storage.read("nope") is None
    assert not storage.has("nope")
    storage.delete("nope")  # deleting an absent key is fine


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip(storage: Any, value: Any) -> None:
    storage.write("k", value)
    assert storage.read("k") == value
    assert type(storage.read("k")) is type(value)


def test_tuples(storage: Any, backend: str) -> None:
    storage.write("k", (1, (2, 3)))
    expected = [1, [2, 3]] if CODING[backend] == "msgpack" else (1, (2, 3))
    assert storage.read("k") == expected


def test_tuple_dict_keys_round_trip(storage: Any, backend: str) -> None:
    """A cart keyed by (sku, size) stays readable after it is stored."""
    cart = {("sku", 7): 2, ("sku", 9): [1, (2, 3)], "note": {"nested": ("a", "b")}}
    storage.write("k", cart)
    if CODING[backend] == "msgpack":  # tuples that are keys stay tuples; the others come back as lists
        assert storage.read("k") == {("sku", 7): 2, ("sku", 9): [1, [2, 3]], "note": {"nested": ["a", "b"]}}
    else:
        assert storage.read("k") == cart
    with Sessions(storage, initial=dict).open("k") as s:
        s[("sku", 7)] += 1
    assert storage.read("k")[("sku", 7)] == 3


@pytest.mark.parametrize("index", range(5))
def test_unstorable_value_is_serialization_error_and_keeps_old(storage: Any, backend: str, index: int) -> None:
    values = UNSTORABLE[CODING[backend]]
    storage.write("k", {"ok": 1})
    with pytest.raises(SerializationError) as info:
        storage.write("k", values[index])
    assert isinstance(info.value, TypeError) and info.value.key == "k"
    assert storage.read("k") == {"ok": 1}
    with pytest.raises(SerializationError):
        with Sessions(storage, initial=dict).open("k") as s:
            s["bad"] = values[index]
    assert storage.read("k") == {"ok": 1}


def test_none_is_never_stored(storage: Any) -> None:
    with pytest.raises(ValueError, match="None"):
        storage.write("k", None)


def test_values_are_isolated_from_callers(storage: Any) -> None:
    value = {"list": [1]}
    storage.write("k", value)
    value["list"].append(2)
    read = storage.read("k")
    assert read == {"list": [1]}
    read["list"].append(3)
    assert storage.read("k") == {"list": [1]}


def test_overwrite_and_delete(storage: Any) -> None:
    storage.write("k", 1)
    storage.write("k", 2)
    assert storage.read("k") == 2
    storage.delete("k")
    assert storage.read("k") is None and not storage.has("k")


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=lambda k: repr(k[:12]))
def test_any_key_string_round_trips(storage: Any, key: str) -> None:
    storage.write(key, {"key": key})
    assert storage.read(key) == {"key": key}
    assert storage.has(key)
    assert key in list(storage.keys())
    storage.delete(key)
    assert storage.read(key) is None


def test_listings(storage: Any) -> None:
    data = {f"k{i}": {"i": i} for i in range(20)}
    for k, v in data.items():
        storage.write(k, v)
    storage.delete("k3")
    del data["k3"]
    assert sorted(storage.keys()) == sorted(data)
    assert sorted(storage.values(), key=lambda v: v["i"]) == sorted(data.values(), key=lambda v: v["i"])
    assert dict(storage.items()) == data


def test_non_str_keys_are_a_type_error(storage: Any) -> None:
    with pytest.raises(TypeError):
        storage.write(5, 1)
    with pytest.raises(TypeError):
        storage.read(None)


def skip_server_clock(backend: str) -> None:
    if backend in REAL_CLOCK:
        pytest.skip("Redis expires keys on its own clock: test_redis.py checks its ttl in real time")


def test_ttl_expires_hides_and_slides(storage_factory: Callable[..., Any], clock: FakeClock, backend: str) -> None:
    skip_server_clock(backend)
    storage = storage_factory(ttl=10, clock=clock)
    storage.write("old", 1)
    clock.tick(6)
    storage.write("young", 2)
    clock.tick(5)  # old: 11 s since write, young: 5 s
    assert storage.read("old") is None
    assert not storage.has("old")
    assert list(storage.keys()) == ["young"]
    assert list(storage.values()) == [2]
    assert list(storage.items()) == [("young", 2)]
    storage.write("young", 3)  # a write slides the expiry
    clock.tick(9)
    assert storage.read("young") == 3
    clock.tick(1)
    assert storage.read("young") is None


def test_ttl_accepts_timedelta_and_rejects_nonsense(
    storage_factory: Callable[..., Any], clock: FakeClock, backend: str
) -> None:
    skip_server_clock(backend)
    storage = storage_factory(ttl=timedelta(minutes=1), clock=clock)
    storage.write("k", 1)
    clock.tick(59)
    assert storage.read("k") == 1
    clock.tick(1)
    assert storage.read("k") is None
    with pytest.raises(ValueError):
        storage_factory(ttl=0)
    with pytest.raises(TypeError):
        storage_factory(ttl="1h")


def test_lock_excludes_other_threads_and_times_out(storage: Any) -> None:
    outcome: list[Any] = []

    def contender() -> None:
        try:
            with storage.lock("k", timeout=0.05):
                outcome.append("entered")
        except LockTimeout as exc:
            outcome.append(exc)

    with storage.lock("k"):
        t = threading.Thread(target=contender)
        t.start()
        t.join()
        with storage.lock("other", timeout=0.05):  # another key is free
            pass
    assert isinstance(outcome[0], LockTimeout) and outcome[0].key == "k"
    t = threading.Thread(target=contender)
    t.start()
    t.join()
    assert outcome[1] == "entered"


def test_sessions_counter_with_threads(storage: Any) -> None:
    """8 threads x 50 increments of one key through Sessions come out exact."""
    sessions = Sessions(storage, initial=dict)
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            with sessions.open("count") as s:
                s["n"] = s.get("n", 0) + 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read("count") == {"n": 400}


def test_enhanced_storage_over_backend(storage: Any, clock: FakeClock) -> None:
    enhanced = enhance_storage(storage, migrations={1: lambda d: {**d, "v1": True}}, ttl=60, clock=clock)
    sessions = Sessions(enhanced, initial=dict)
    with sessions.open("k") as s:
        s["a"] = 1
    stored = storage.read("k")
    assert stored == {"__d": {"a": 1}, "v": 1, "e": int((clock.now + 60) * 1000)}
    with sessions.open("k") as s:
        assert s.data == {"a": 1}
    clock.tick(61)
    with sessions.open("k") as s:
        assert s.is_new
