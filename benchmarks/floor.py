"""How fast could a pure-Python disk engine make one read-modify-write?

    python -m benchmarks.floor [--seconds S] [--repeat N] [--out DIR | --save]

One thread, one key, one process: the ``1t1k`` scenario of
``benchmarks.engine``.  Beside sessionkit, diskcache and LMDB (the same
subjects as there), it times ``floor``: the system calls and checks that
sessionkit's msgpack engine must make for one read-modify-write that is
exact across threads and processes, written out inline in one function, with
nothing else:

* the key's lock: a thread lock, then a kernel byte-range lock (``fcntl``
  ``F_OFD_SETLKW``) on the store's lock file, and a ``stat`` of the lock
  file's path (a lock file deleted mid-block must refuse the write);
* the read: the key's slot in a mapped index, one ``pread``, the record's
  checksums and key checked (``_records.value_of``), msgpack decoding;
* the change, msgpack encoding and the record built (``_records.build``);
* the log's section: a byte-range lock, an ``fstat`` of the lock file (still
  linked) and of the log (it ends where the index says), the index marked
  dirty, one ``pwrite``, the slot and the counters written back, both locks
  let go.

The key's hash is computed once, outside the loop.  No layer, no error
handling, no fairness queue, no expiry: an engine cannot do less and keep
sessionkit's promises, so ``floor`` bounds what pure Python can reach.  The
report gives each subject's median ops/s over the repetitions (subjects take
turns within a repetition) and the ratios paired per repetition.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import platform
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from sessionkit.storage import _index as ix
from sessionkit.storage import _records as rec

from .engine import Diskcache, Lmdb, Sessionkit, Subject, bump
from .report import save_outputs

SAVED = Path(__file__).resolve().parent / "results" / "floor"  # the committed run (--save)
F_OFD_SETLKW = 38  # Linux; fcntl.F_OFD_SETLKW from Python 3.12 on
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class Floor(Subject):
    """The msgpack engine's essential work for one read-modify-write, inline (see the module docstring)."""

    name = "floor"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        os.makedirs(path, exist_ok=True)
        self.lock_path = os.path.join(path, "lock")
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.log_fd = os.open(os.path.join(path, "log"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(self.log_fd, rec.MAGIC, 0)
        self.end = len(rec.MAGIC)
        index_fd = os.open(os.path.join(path, "idx"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(index_fd, ix.HEADER_SIZE + ix.MIN_CAPACITY * ix.SLOT_SIZE)
        self.map = mmap.mmap(index_fd, 0)
        os.close(index_fd)
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
        with self.mutex:
            fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, key_range, 1, 0))
            try:
                os.stat(self.lock_path)
                slot = ix.SLOT.unpack_from(m, at)
                raw = rec.value_of(os.pread(log_fd, slot[3], slot[2]), kb) if slot[4] == ix.LIVE else None
                value = {} if raw is None else msgpack.unpackb(raw)
                change(value)
                data = rec.build(kb, msgpack.packb(value), 0, 0.0)
                fcntl.fcntl(lock_fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
                try:
                    if not os.fstat(lock_fd).st_nlink or os.fstat(log_fd).st_size != self.end:
                        raise RuntimeError("the store changed under the floor loop")
                    offset = self.end
                    ix._U64.pack_into(m, ix.DIRTY_AT, 1)
                    os.pwrite(log_fd, data, offset)
                    ix.SLOT.pack_into(m, at, h1, h2, offset, len(data), ix.LIVE, 0.0)
                    self.end = offset + len(data)
                    ix.COUNTERS.pack_into(m, ix.COUNTERS_AT, self.end, len(data), 1, 1, 0, 0, 0, 0, 0, 0.0, 0)
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


SUBJECTS: tuple[type[Subject], ...] = (Floor, Sessionkit, Diskcache, Lmdb)


def _available(subjects: tuple[type[Subject], ...]) -> list[type[Subject]]:
    found = []
    for cls in subjects:
        try:
            cls.preload()
        except ImportError:
            continue
        found.append(cls)
    return found


def run(seconds: float, repeat: int) -> dict[str, Any]:
    """Every available subject, in turn within each repetition (the order rotating)."""
    workdir = tempfile.mkdtemp(prefix="sessionkit-floor-")
    try:
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
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for name in names:
        mine = sorted(rates[name])
        row: dict[str, Any] = {"subject": name, "ops_s": mine[len(mine) // 2], "us_per_rmw": 1e6 / mine[len(mine) // 2]}
        for peer in names:
            ratios = sorted(a / b for a, b in zip(rates[name], rates[peer]))
            row[f"vs_{peer}"] = ratios[len(ratios) // 2]
        rows.append(row)
    return {"seconds": seconds, "repeat": repeat, "rows": rows, "counts": counts,
            "python": platform.python_version(), "cpus": os.cpu_count()}


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    names = [row["subject"] for row in rows]
    out = [
        "# The pure-Python floor of one read-modify-write, 1 thread, 1 key",
        "",
        f"Python {result['python']}, {result['cpus']} CPUs; {result['repeat']} repetitions of "
        f"{result['seconds']} s per subject, taking turns. `floor`: the engine's essential system calls and "
        "checks, inline (see `benchmarks/floor.py`). Ratios: this row over the column, median of per-repetition "
        "ratios.",
        "",
        "| subject | ops/s | µs per RMW | " + " | ".join(f"÷ {n}" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for row in rows:
        ratios = " | ".join(f"{row['vs_' + n]:.2f}" for n in names)
        out.append(f"| {row['subject']} | {row['ops_s']:,.0f} | {row['us_per_rmw']:.1f} | {ratios} |")
    by = {row["subject"]: row for row in rows}
    if "diskcache" in by and "floor" in by:
        need = by["diskcache"]["us_per_rmw"] / 3
        out += ["", f"3× diskcache needs {need:.1f} µs per RMW; the floor alone takes "
                f"{by['floor']['us_per_rmw']:.1f} µs ({by['floor']['vs_diskcache']:.2f}× diskcache)."]
    if "lmdb" in by and "floor" in by:
        need = by["lmdb"]["us_per_rmw"] * 2
        out += [f"0.5× LMDB needs {need:.1f} µs per RMW; the floor is {by['floor']['vs_lmdb']:.2f}× LMDB."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per subject per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for floor.md and floor.json")
    where.add_argument("--save", action="store_true", help="write to benchmarks/results/floor/")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.repeat)
    text = report(result)
    print(text, end="")
    save_outputs(args.out, args.save, SAVED, "floor", text, result)
    wrong = {name: counts for name, counts in result["counts"].items() if counts[0] != counts[1]}
    if wrong:
        print(f"counters that do not match the read-modify-writes made (counted, made): {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
