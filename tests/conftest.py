"""Fixtures shared by the suite: every backend, built the same way."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import pytest

import os

from sessionkit import MemoryStorage, MsgpackFileStorage, ShelveStorage

from .helpers import FakeClock

BACKENDS = ["memory", "msgpack", "shelve"]
# The dbm module the shelve backend runs on (tests/test_other_pythons.py
# reruns the shelve tests under another Python with dbm.gnu).
SHELVE_DBM = os.environ.get("SESSIONKIT_TEST_DBM") or None


def make_shelf(path: Any, **options: Any) -> ShelveStorage:
    """A ShelveStorage at ``path`` on the dbm under test (``dbm=`` overrides it)."""
    return ShelveStorage(path, dbm=options.pop("dbm", SHELVE_DBM), **options)


def shelf_spec(path: str) -> str:
    """How a worker process opens the same shelf (see ``workers.open_store``)."""
    return f"shelve:{path}:{SHELVE_DBM or ''}"


def make_storage(kind: str, tmp_path: Any, **options: Any) -> Any:
    """A fresh storage of ``kind``; ``options`` are ``ttl`` and ``clock``."""
    if kind == "memory":
        return MemoryStorage(**options)
    if kind == "msgpack":
        return MsgpackFileStorage(tmp_path / "sessions", **options)
    if kind == "shelve":
        return ShelveStorage(tmp_path / "shelf" / "sessions", dbm=SHELVE_DBM, **options)
    raise AssertionError(f"unknown backend {kind}")


@pytest.fixture(params=BACKENDS)
def backend(request: Any) -> str:
    return str(request.param)


@pytest.fixture
def storage_factory(backend: str, tmp_path: Any) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def factory(**options: Any) -> Any:
        store = make_storage(backend, tmp_path, **options)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def storage(storage_factory: Callable[..., Any]) -> Any:
    return storage_factory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond so in-memory races really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
