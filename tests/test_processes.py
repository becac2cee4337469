"""Every disk backend: processes sharing one store lose no update."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from . import workers
from .conftest import SHELVE_DBM

spawn = multiprocessing.get_context("spawn")

STORES = {
    "msgpack": lambda tmp: str(tmp / "store"),
    "shelve": lambda tmp: f"shelve:{tmp / 'shelf' / 'sessions'}:{SHELVE_DBM or ''}",
}


@pytest.mark.parametrize("backend", list(STORES))
def test_processes_on_one_key_lose_nothing(backend: str, tmp_path: Path) -> None:
    where = STORES[backend](tmp_path)
    workers.open_store(where).close()  # create it before the workers race to
    start = spawn.Event()
    per_process = 150
    procs = [spawn.Process(target=workers.increment, args=(where, "k", per_process, start)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert workers.open_store(where).read("k") == {"n": 4 * per_process}
