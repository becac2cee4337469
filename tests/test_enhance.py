"""enhance_storage beyond grammY's own tests: fractional versions, the envelope, the wrapper."""

from __future__ import annotations

from typing import Any

import pytest

from sessionkit import MemoryStorage, Sessions, enhance_storage

from .helpers import FakeClock, RecordingStorage


def test_fractional_versions_run_in_numeric_order() -> None:
    ran: list[Any] = []

    def step(v: Any) -> Any:
        return lambda old: ran.append(v) or old + [v]

    enhanced = enhance_storage(RecordingStorage({"k": []}), migrations={4: step(4), 1.5: step(1.5), 1: step(1)})
    assert enhanced.read("k") == [1, 1.5, 4]
    ran.clear()
    enhanced = enhance_storage(
        RecordingStorage({"k": {"__d": [], "v": 1}}), migrations={4: step(4), 1.5: step(1.5), 1: step(1)}
    )
    assert enhanced.read("k") == [1.5, 4]
    enhanced.write("k", [])
    assert enhanced.storage.read("k") == {"__d": [], "v": 4}


def test_version_keys_must_be_numbers() -> None:
    for bad in ("1", True, None):
        with pytest.raises(TypeError, match="numbers"):
            enhance_storage(RecordingStorage(), migrations={bad: lambda o: o})
    with pytest.raises(TypeError, match="callable"):
        enhance_storage(RecordingStorage(), migrations={1: 5})  # type: ignore[dict-item]


def test_expiry_is_integer_milliseconds(clock: FakeClock) -> None:
    clock.now = 1000.0005
    storage = RecordingStorage()
    enhance_storage(storage, ttl=1.5, clock=clock).write("k", "x")
    stored = storage.data["k"]
    assert stored == {"__d": "x", "e": 1001500} and type(stored["e"]) is int


@pytest.mark.parametrize("stored", [7, {"__d": 7}, {"__d": 7, "v": 1}])
def test_value_without_expiry_gets_one_on_read(stored: Any, clock: FakeClock) -> None:
    storage = RecordingStorage({"k": stored})
    enhanced = enhance_storage(storage, ttl=10, clock=clock)
    assert enhanced.read("k") == 7
    assert storage.data["k"]["e"] == int(clock.now * 1000 + 10_000)
    clock.tick(11)
    assert enhanced.read("k") is None
    assert "k" not in storage.data


def test_reads_grammy_envelopes_written_elsewhere(clock: FakeClock) -> None:
    now_ms = int(clock.now * 1000)
    storage = RecordingStorage(
        {"live": {"__d": {"a": 1}, "e": now_ms + 5000, "v": 2}, "dead": {"__d": 1, "e": now_ms - 1}}
    )
    enhanced = enhance_storage(storage, ttl=60, migrations={2: lambda o: o}, clock=clock)
    assert enhanced.read("live") == {"a": 1}
    assert enhanced.read("dead") is None


def test_wrapper_keeps_listings_lock_and_close_and_hides_expired(clock: FakeClock) -> None:
    inner = MemoryStorage()
    enhanced = enhance_storage(inner, ttl=10, clock=clock)
    enhanced.write("a", 1)
    clock.tick(5)
    enhanced.write("b", 2)
    clock.tick(6)
    assert enhanced.has("b") and not enhanced.has("a")
    assert list(enhanced.keys()) == ["b"]
    assert list(enhanced.values()) == [2]
    assert list(enhanced.items()) == [("b", 2)]
    with enhanced.lock("b"):
        assert inner._locks.held_by_me("b")
    enhanced.close()
    assert "EnhancedStorage" in repr(enhanced)
    with pytest.raises(ValueError):
        enhanced.write("k", None)


def test_wrapper_without_ttl_lists_inner_keys() -> None:
    enhanced = enhance_storage(MemoryStorage(), migrations={1: lambda o: o * 2})
    enhanced.storage.write("bare", 2)
    enhanced.write("new", 3)
    assert sorted(enhanced.keys()) == ["bare", "new"]
    assert dict(enhanced.items()) == {"bare": 4, "new": 3}


def test_wrapper_over_lockless_storage_shares_its_lock() -> None:
    inner = RecordingStorage()
    enhanced = enhance_storage(inner, migrations={1: lambda o: o})
    with Sessions(enhanced).open("k"):
        from sessionkit._locks import shared_key_locks

        assert shared_key_locks(inner).held_by_me("k")


def test_migrated_value_is_stored_by_next_write_back() -> None:
    inner = MemoryStorage()
    inner.write("k", {"name": "x"})
    enhanced = enhance_storage(inner, migrations={1: lambda old: {**old, "lang": "en"}})
    with Sessions(enhanced).open("k") as s:
        s["seen"] = True
    assert inner.read("k") == {"__d": {"name": "x", "lang": "en", "seen": True}, "v": 1}
