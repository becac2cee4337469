"""How fast could a pure-Python disk engine make one read-modify-write?

    python -m benchmarks.floor [--seconds S] [--repeat N] [--scenarios 1t1k,4p1k] [--out DIR | --save]

Beside sessionkit, diskcache and LMDB (the subjects of ``benchmarks.engine``),
it times ``floor``: the system calls and checks that sessionkit's msgpack
engine must make for one read-modify-write that is exact across threads and
processes, written out inline in one function, with nothing else:

* the key's lock: a thread lock, then a kernel byte-range lock (``fcntl``
  ``F_OFD_SETLKW``) on the store's lock file, and a ``stat`` of the lock
  file's path (a lock file deleted mid-block must refuse the write);
* the read: the key's slot in a mapped index, one ``pread``, the record's
  checksums and key checked (``_records.value_of``), msgpack decoding;
* the change, msgpack encoding and the record built (``_records.build``);
* the log's section: a byte-range lock, the log's end read from the shared
  index, an ``fstat`` of the lock file (still linked) and a ``statx`` of the
  log's size and link count (it ends where the index says, and was not
  replaced: ``_statx``, as the engine reads them), the index marked dirty,
  one ``pwrite``, the slot and the counters written back, both locks let go.

The key's hash is computed once, outside the loop.  No layer, no error
handling, no fairness queue, no expiry, no merges: an engine cannot do less
and keep sessionkit's promises, so ``floor`` bounds what pure Python can
reach with them.  The three ``stat`` calls are the promises' part: they are
what refuses a write under a lock file that was deleted or replaced (whose
lock no longer excludes other processes), and a write to a log that was
appended to or replaced behind its index's back.  An engine that dropped
them would lose those writes.  The log's is a ``statx`` that asks for its
size and link count only: on Linux 6.13 and later a file whose timestamps
were asked for (as ``fstat`` does) stamps a fine-grained time at its next
write, about 2 µs more per operation on this machine.  ``floor-unchecked``
times the loop with none of these calls: what the checks cost, not a bound.

Scenarios:

``1t1k``
    One thread, one key, every subject in this process.  Two more subjects
    price the API itself: ``codec`` does what the memory backend does besides
    the API (decode the stored bytes, change, encode, store), and ``memory``
    is ``Sessions(MemoryStorage())``; *memory − codec* is the least the
    public API adds to any storage's read-modify-write (it is the API's
    fastest, inlined path), so the floor plus it bounds sessionkit.
``4p1k``
    Four processes on one key, with ``benchmarks.engine``'s worker pool and
    scenario code (the floor's files are shared the way the engine's are).

The report gives each subject's median ops/s over the repetitions (subjects
take turns within a repetition) and the ratios paired per repetition.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import platform
import shutil
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from sessionkit.storage import _index as ix
from sessionkit.storage import _records as rec
from sessionkit.storage._statx import SizeAndLinks

from .engine import PROCESSES, Diskcache, Lmdb, Pool, Sessionkit, Subject, bump, keyed
from .engine import SUBJECTS as ENGINE_SUBJECTS
from .report import save_outputs

SAVED = Path(__file__).resolve().parent / "results" / "floor"  # the committed run (--save)
F_OFD_SETLKW = 38  # Linux; fcntl.F_OFD_SETLKW from Python 3.12 on
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class Floor(Subject):
    """The msgpack engine's essential work for one read-modify-write, inline (see the module docstring)."""

    name = "floor"
    checks = "all"  # "none": no stat call at all

    def __init__(self, path: str) -> None:
        super().__init__(path)
        os.makedirs(path, exist_ok=True)
        self.lock_path = os.path.join(path, "lock")
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        # The first opener makes the files; the workers of a scenario open one after the other.
        fresh = not os.path.exists(os.path.join(path, "idx"))
        self.log_fd = os.open(os.path.join(path, "log"), os.O_RDWR | os.O_CREAT, 0o600)
        index_fd = os.open(os.path.join(path, "idx"), os.O_RDWR | os.O_CREAT, 0o600)
        if fresh:
            os.pwrite(self.log_fd, rec.MAGIC, 0)
            os.ftruncate(index_fd, ix.HEADER_SIZE + ix.MIN_CAPACITY * ix.SLOT_SIZE)
        self.map = mmap.mmap(index_fd, 0)
        os.close(index_fd)
        self.log_state = SizeAndLinks()
        if fresh:
            ix.COUNTERS.pack_into(self.map, ix.COUNTERS_AT, len(rec.MAGIC), 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0)
        self.mutex = threading.Lock()
        self.keys: dict[str, tuple[bytes, int, int, int]] = {}

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        info = self.keys.get(key)
        if info is None:
            info = self.keys[key] = rec.key_info(key)
        kb, h1, h2 = info[0], info[1], info[2]
        at = ix.HEADER_SIZE + (h1 & (ix.MIN_CAPACITY - 1)) * ix.SLOT_SIZE  # no collisions: one key
        lock_fd, log_fd, m = self.lock_fd, self.log_fd, self.map
        key_range = 1 + (h1 & 0xFFFF)
        checks = self.checks
        with self.mutex:
            fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, key_range, 1, 0))
            try:
                if checks != "none":
                    os.stat(self.lock_path)
                slot = ix.SLOT.unpack_from(m, at)
                raw = rec.value_of(os.pread(log_fd, slot[3], slot[2]), kb) if slot[4] == ix.LIVE else None
                value = {} if raw is None else msgpack.unpackb(raw)
                change(value)
                data = rec.build(kb, msgpack.packb(value), 0, 0.0)
                fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
                try:
                    offset = ix._U64.unpack_from(m, ix.COUNTERS_AT)[0]  # the log's end, shared
                    if checks == "all":
                        size, linked = self.log_state(log_fd)
                        if not os.fstat(lock_fd).st_nlink or not linked or size != offset:
                            raise RuntimeError("the store changed under the floor loop")
                    ix._U64.pack_into(m, ix.DIRTY_AT, 1)
                    os.pwrite(log_fd, data, offset)
                    ix.SLOT.pack_into(m, at, h1, h2, offset, len(data), ix.LIVE, 0.0)
                    ix.COUNTERS.pack_into(m, ix.COUNTERS_AT, offset + len(data), len(data), 1, 1, 0, 0, 0, 0, 0,
                                          0.0, 0)
                finally:
                    fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, 0, 0, 1, 0))
            finally:
                fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, 0, key_range, 1, 0))

    def read_count(self, key: str) -> int:
        info = rec.key_info(key)
        slot = ix.SLOT.unpack_from(self.map, ix.HEADER_SIZE + (info[1] & (ix.MIN_CAPACITY - 1)) * ix.SLOT_SIZE)
        raw = rec.value_of(os.pread(self.log_fd, slot[3], slot[2]), info[0]) if slot[4] == ix.LIVE else None
        return 0 if raw is None else int(msgpack.unpackb(raw).get("count", 0))

    def close(self) -> None:
        self.map.close()
        os.close(self.lock_fd)
        os.close(self.log_fd)


class FloorUnchecked(Floor):
    """``floor`` without its three ``stat`` calls: as exact while nothing outside the engine touches the
    store's files, but it writes under a deleted lock file and into a replaced log (see the module's
    docstring); what those checks cost."""

    name = "floor-unchecked"
    checks = "none"


class Codec(Subject):
    """What the memory backend does besides the API: decode the stored bytes, change, encode, store."""

    name = "codec"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.data: dict[str, bytes] = {}

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        raw = self.data.get(key)
        value = {} if raw is None else msgpack.unpackb(raw)
        change(value)
        self.data[key] = msgpack.packb(value)

    def read_count(self, key: str) -> int:
        raw = self.data.get(key)
        return 0 if raw is None else int(msgpack.unpackb(raw).get("count", 0))


class Memory(Subject):
    """``Sessions(MemoryStorage(), initial=dict)``: the public API over the leanest storage there is."""

    name = "memory"
    modules = ("sessionkit",)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from sessionkit import MemoryStorage, Sessions

        self.sessions = Sessions(MemoryStorage(), initial=dict)

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        with self.sessions.open(key) as session:
            change(session)

    def read_count(self, key: str) -> int:
        with self.sessions.open(key) as session:
            return int(session.get("count", 0))


SUBJECTS: tuple[type[Subject], ...] = (Floor, FloorUnchecked, Codec, Memory, Sessionkit, Diskcache,
                                       Lmdb)
PROCESS_SUBJECTS = ("floor", "floor-unchecked", "sessionkit", "diskcache", "lmdb")  # 4p1k: on disk
for _floor in (Floor, FloorUnchecked):  # for the worker processes of 4p1k (engine.Pool)
    ENGINE_SUBJECTS.setdefault(_floor.name, _floor)


def _available(subjects: tuple[type[Subject], ...]) -> list[type[Subject]]:
    found = []
    for cls in subjects:
        try:
            cls.preload()
        except ImportError:
            continue
        found.append(cls)
    return found


def _rows(rates: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Each subject's median ops/s and its ratio to every other, paired per repetition (median)."""
    rows = []
    for name, mine in rates.items():
        median = statistics.median(mine)
        row: dict[str, Any] = {"subject": name, "ops_s": median, "us_per_rmw": 1e6 / median}
        for peer, theirs in rates.items():
            row[f"vs_{peer}"] = statistics.median(a / b for a, b in zip(mine, theirs))
        rows.append(row)
    return rows


def one_thread(workdir: str, seconds: float, repeat: int) -> dict[str, Any]:
    """1t1k: every available subject in this process, in turn within each repetition (the order rotating)."""
    classes = _available(SUBJECTS)
    stores = {cls.name: cls(os.path.join(workdir, cls.name)) for cls in classes}
    names = list(stores)
    rates: dict[str, list[float]] = {name: [] for name in names}
    done = dict.fromkeys(names, 2000)
    for name in names:  # warm-up
        for _ in range(2000):
            stores[name].rmw("k", bump)
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            store, ops = stores[name], 0
            deadline = time.perf_counter() + seconds
            start = time.perf_counter()
            while time.perf_counter() < deadline:
                for _ in range(200):
                    store.rmw("k", bump)
                ops += 200
            rates[name].append(ops / (time.perf_counter() - start))
            done[name] += ops
    counts = {name: (stores[name].read_count("k"), done[name]) for name in names}
    for store in stores.values():
        store.close()
    return {"rows": _rows(rates), "counts": counts}


def four_processes(workdir: str, seconds: float, repeat: int) -> dict[str, Any]:
    """4p1k: 4 worker processes on one key, with ``benchmarks.engine``'s pool and scenario code."""
    names = [cls.name for cls in _available(SUBJECTS) if cls.name in PROCESS_SUBJECTS]
    pool = Pool(PROCESSES, modules=(__name__,))
    try:
        got = keyed(pool, names, workdir, {"seconds": seconds, "repeat": repeat}, "4p1k", PROCESSES, 1, True)
    finally:
        pool.shutdown()
    rates = {name: list(got[name]["ops_s"]) for name in names}
    counts = {name: (got[name]["counted"], got[name]["expected"]) for name in names}
    return {"rows": _rows(rates), "counts": counts}


SCENARIOS: dict[str, Callable[[str, float, int], dict[str, Any]]] = {"1t1k": one_thread, "4p1k": four_processes}


def run(seconds: float, repeat: int, scenarios: list[str]) -> dict[str, Any]:
    """Each scenario of ``scenarios`` in turn, in a scratch folder removed afterwards."""
    out: dict[str, Any] = {"seconds": seconds, "repeat": repeat, "python": platform.python_version(),
                           "cpus": os.cpu_count(), "scenarios": {}}
    for scenario in scenarios:
        workdir = tempfile.mkdtemp(prefix="sessionkit-floor-")
        try:
            out["scenarios"][scenario] = SCENARIOS[scenario](workdir, seconds, repeat)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    names = [row["subject"] for row in rows]
    out = ["| subject | ops/s | µs per RMW | " + " | ".join(f"÷ {n}" for n in names) + " |",
           "|---|---:|---:|" + "---:|" * len(names)]
    for row in rows:
        ratios = " | ".join(f"{row['vs_' + n]:.2f}" for n in names)
        out.append(f"| {row['subject']} | {row['ops_s']:,.0f} | {row['us_per_rmw']:.1f} | {ratios} |")
    return out


def _budget(by: dict[str, dict[str, Any]], api_us: float | None) -> list[str]:
    """What 3× diskcache and 0.5× LMDB would take, beside the floor (and the floor plus the API's own cost)."""
    out = []
    if "diskcache" in by and "floor" in by:
        need = by["diskcache"]["us_per_rmw"] / 3
        floor = by["floor"]["us_per_rmw"]
        out.append(f"3× diskcache needs {need:.1f} µs per RMW; the floor alone takes {floor:.1f} µs "
                   f"({by['floor']['vs_diskcache']:.2f}× diskcache).")
        if api_us is not None:
            out.append(f"The floor plus the API's own cost ({api_us:.1f} µs) is {floor + api_us:.1f} µs "
                       f"against the {need:.1f} µs needed.")
    if "lmdb" in by and "floor" in by:
        need = by["lmdb"]["us_per_rmw"] * 2
        out.append(f"0.5× LMDB needs {need:.1f} µs per RMW; the floor is {by['floor']['vs_lmdb']:.2f}× LMDB.")
    return out


def report(result: dict[str, Any]) -> str:
    out = [
        "# The pure-Python floor of one read-modify-write",
        "",
        f"Python {result['python']}, {result['cpus']} CPUs; {result['repeat']} repetitions of "
        f"{result['seconds']} s per subject, taking turns. `floor`: the engine's essential system calls and "
        "checks, inline (see `benchmarks/floor.py`). Ratios: this row over the column, median of per-repetition "
        "ratios.",
    ]
    scenarios = result["scenarios"]
    if "1t1k" in scenarios:
        by = {row["subject"]: row for row in scenarios["1t1k"]["rows"]}
        api = None
        if "memory" in by and "codec" in by:
            api = by["memory"]["us_per_rmw"] - by["codec"]["us_per_rmw"]
        out += ["", "## 1t1k: 1 thread, 1 key", "",
                "`codec`: what the memory backend does besides the API (msgpack decode, the change, encode, "
                "a dict store); `memory`: `Sessions(MemoryStorage())`, the public API over that. "
                "*memory − codec* is the least the API itself costs per read-modify-write, on its fastest "
                "(inlined) path.", ""]
        out += _table(scenarios["1t1k"]["rows"])
        if api is not None:
            out += ["", f"memory − codec: {api:.1f} µs."]
        out += [""] + _budget(by, api)
    if "4p1k" in scenarios:
        by = {row["subject"]: row for row in scenarios["4p1k"]["rows"]}
        out += ["", "## 4p1k: 4 processes, 1 key", "",
                "ops/s of the 4 processes together (`benchmarks.engine`'s pool and scenario code).", ""]
        out += _table(scenarios["4p1k"]["rows"])
        out += [""] + _budget(by, None)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per subject per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions")
    parser.add_argument("--scenarios", default="1t1k,4p1k", help=f"comma-separated, of {','.join(SCENARIOS)}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for floor.md and floor.json")
    where.add_argument("--save", action="store_true", help="write to benchmarks/results/floor/")
    args = parser.parse_args(argv)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    result = run(args.seconds, args.repeat, scenarios)
    text = report(result)
    print(text, end="")
    save_outputs(args.out, args.save, SAVED, "floor", text, result)
    wrong = {f"{scenario}/{name}": counts for scenario, got in result["scenarios"].items()
             for name, counts in got["counts"].items() if counts[0] != counts[1]}
    if wrong:
        print(f"counters that do not match the read-modify-writes made (counted, made): {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
