"""What only MemoryStorage has: reclaiming expired entries, its repr."""

from __future__ import annotations

from sessionkit import MemoryStorage

from .helpers import FakeClock


def test_expired_entries_are_reclaimed_not_only_hidden(clock: FakeClock) -> None:
    storage = MemoryStorage(ttl=1, clock=clock)
    for i in range(10_000):
        storage.write(f"short-lived-{i}", {"i": i})
        clock.tick(0.01)
    # at most ~100 writes are younger than the ttl at any time
    assert len(storage._data) <= 101
    assert len(storage._expires) == len(storage._data)


def test_expired_entry_is_dropped_on_read(clock: FakeClock) -> None:
    storage = MemoryStorage(ttl=1, clock=clock)
    storage.write("k", 1)
    clock.tick(2)
    assert storage.read("k") is None
    assert "k" not in storage._data


def test_listing_reclaims(clock: FakeClock) -> None:
    storage = MemoryStorage(ttl=1, clock=clock)
    for i in range(100):
        storage.write(str(i), i)
    clock.tick(5)
    assert list(storage.keys()) == []
    assert storage._data == {}


def test_repr_and_close() -> None:
    storage = MemoryStorage(ttl=5)
    storage.write("k", 1)
    assert repr(storage) == "MemoryStorage(ttl=5.0, sessions=1)"
    storage.close()
    assert storage.read("k") == 1


def test_encoding_one_huge_value_does_not_keep_its_buffer_for_ever() -> None:
    """A thread's msgpack packer would keep a buffer the size of the largest value it packed."""
    import subprocess
    import sys

    code = (
        "from sessionkit import _codec\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) // 1024\n"
        "_codec.dumps({'a': 1}); base = rss()\n"
        "out = _codec.dumps({'blob': b'x' * (200 << 20)}); del out\n"
        "print(rss() - base)\n"
    )
    kept = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert kept < 50, f"{kept} MB kept after encoding a 200 MB value"
