"""Fixtures shared by the suite: every backend, built the same way."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from typing import Any, Callable, Iterator

import pytest

from sessionkit import MemoryStorage, MsgpackFileStorage, RedisStorage, ShelveStorage

from . import redis_servers
from .helpers import FakeClock

_prefixes = itertools.count()

BACKENDS = ["memory", "msgpack", "shelve", "redis", "redis-cluster"]
# Backends whose expiry runs on the server's clock, which a FakeClock cannot move
REAL_CLOCK = {"redis", "redis-cluster"}
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
    """A fresh storage of ``kind``; ``options`` are ``ttl`` and ``clock``.

    A Redis backend needs ``server=`` (a ``redis_servers`` server or cluster);
    each storage gets a prefix of its own, so tests never see each other's keys.
    """
    if kind in REAL_CLOCK:
        options.pop("clock", None)
        server = options.pop("server")
        client = server.client() if kind == "redis-cluster" else redis_client(server)
        return RedisStorage(client, prefix=f"t{next(_prefixes)}:", **options)
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


def redis_client(server: Any, **options: Any) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=server.port, **options)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A redis-server on a free loopback port, persistence off, for the whole run."""
    directory = redis_servers.temporary_directory("redis")
    server = redis_servers.RedisServer(directory)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A 3-master Redis Cluster on loopback, for the whole run."""
    directory = redis_servers.temporary_directory("cluster")
    cluster = redis_servers.RedisCluster(directory)
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def storage_factory(backend: str, tmp_path: Any, request: Any) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []
    extra: dict[str, Any] = {}
    if backend == "redis":
        extra["server"] = request.getfixturevalue("redis_server")
    elif backend == "redis-cluster":
        extra["server"] = request.getfixturevalue("redis_cluster")

    def factory(**options: Any) -> Any:
        store = make_storage(backend, tmp_path, **extra, **options)
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


# -- the reruns under the other Pythons (tests/test_other_pythons.py) ---------------


def _is_rerun_test(item: Any) -> bool:
    return item.nodeid.startswith("tests/test_other_pythons.py::")


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """The tests that wait for the reruns go last: the rest of the run overlaps the reruns."""
    items.sort(key=_is_rerun_test)  # stable: the order within each part is kept


def pytest_collection_finish(session: Any) -> None:
    """Start the reruns in the background as soon as the tests that report them are selected."""
    if session.config.getoption("collectonly") or os.environ.get("SESSIONKIT_RERUN"):
        return
    if not any(_is_rerun_test(item) for item in session.items):
        return
    from .test_other_pythons import RUNNER

    RUNNER.start()


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    module = sys.modules.get("tests.test_other_pythons")
    if module is not None:
        module.RUNNER.stop()  # an interrupted run leaves no rerun behind

