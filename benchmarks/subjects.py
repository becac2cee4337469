"""What the benchmarks compare: sessionkit's backends, peers, and floors.

Every subject does the same job, "increment ``session["count"]`` for key K",
the way a careful user of that library would make it atomic.  Where a library
offers no atomic read-modify-write, the subject does what its docs suggest and
the tables count the updates it loses.
"""

from __future__ import annotations

import os
import shelve
import threading
from typing import Any, Callable

import msgpack

Group = str  # "sessionkit" | "peer" | "floor"


class Subject:
    """One way of keeping per-key counters, opened on ``workdir``."""

    name = ""
    group: Group = "peer"
    shared_by_processes = True  # one store on disk that processes can share
    atomic = True  # its increment cannot lose updates
    lazy_capable = False
    requires: tuple[str, ...] = ()  # importable modules it needs

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def increment(self, key: str) -> None:
        raise NotImplementedError

    def read_count(self, key: str) -> int:
        raise NotImplementedError

    def lazy_untouched(self, key: str) -> None:
        raise NotImplementedError

    def prefill(self, keys: list[str]) -> None:
        for key in keys:
            self.increment(key)

    def prepare(self, keys: list[str], prefilled: bool) -> None:
        """Untimed set-up in the measuring process for the keys it will use."""

    def close(self) -> None:
        pass


# -- sessionkit ------------------------------------------------------------------


class _Sessionkit(Subject):
    group = "sessionkit"
    lazy_capable = True

    def make_storage(self) -> Any:
        raise NotImplementedError

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        from sessionkit import Sessions

        self.storage = self.make_storage()
        self.sessions = Sessions(self.storage, initial=dict)
        self.lazy = Sessions(self.storage, initial=dict, lazy=True)

    def increment(self, key: str) -> None:
        with self.sessions.open(key) as s:
            s["count"] = s.get("count", 0) + 1

    def read_count(self, key: str) -> int:
        with self.sessions.open(key) as s:
            return int(s.get("count", 0))

    def lazy_untouched(self, key: str) -> None:
        with self.lazy.open(key):
            pass

    def prefill(self, keys: list[str]) -> None:
        write = self.storage.write
        for key in keys:
            write(key, {"count": 0})

    def close(self) -> None:
        self.storage.close()


class SkMemory(_Sessionkit):
    name = "sessionkit memory"
    shared_by_processes = False

    def make_storage(self) -> Any:
        from sessionkit import MemoryStorage

        return MemoryStorage()


class SkMsgpack(_Sessionkit):
    name = "sessionkit msgpack"

    def make_storage(self) -> Any:
        from sessionkit import MsgpackFileStorage

        return MsgpackFileStorage(os.path.join(self.workdir, "msgpack"))


class SkShelve(_Sessionkit):
    name = "sessionkit shelve"

    def make_storage(self) -> Any:
        from sessionkit import ShelveStorage

        return ShelveStorage(os.path.join(self.workdir, "shelf", "sessions"))


class SkShelveGnu(_Sessionkit):
    """The shelf on dbm.gnu (Debian's python3 with python3-gdbm has it)."""

    name = "sessionkit shelve (dbm.gnu)"
    requires = ("dbm.gnu",)

    def make_storage(self) -> Any:
        from sessionkit import ShelveStorage

        return ShelveStorage(os.path.join(self.workdir, "shelf-gnu", "sessions"), dbm="gnu")


class SkShelveSqlite(_Sessionkit):
    """The shelf on dbm.sqlite3 (Python 3.13 and later)."""

    name = "sessionkit shelve (dbm.sqlite3)"
    requires = ("dbm.sqlite3",)

    def make_storage(self) -> Any:
        from sessionkit import ShelveStorage

        return ShelveStorage(os.path.join(self.workdir, "shelf-sqlite3", "sessions"), dbm="sqlite3")


# -- peers ---------------------------------------------------------------------------


class Diskcache(Subject):
    """diskcache: ``Cache.transact()`` makes the read-modify-write atomic."""

    name = "diskcache"
    requires = ("diskcache",)

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        import diskcache

        self.cache = diskcache.Cache(os.path.join(workdir, "diskcache"))

    def increment(self, key: str) -> None:
        with self.cache.transact():
            session = self.cache.get(key, {})
            session["count"] = session.get("count", 0) + 1
            self.cache.set(key, session)

    def read_count(self, key: str) -> int:
        return int(self.cache.get(key, {}).get("count", 0))

    def prefill(self, keys: list[str]) -> None:
        with self.cache.transact():
            for key in keys:
                self.cache.set(key, {"count": 0})

    def close(self) -> None:
        self.cache.close()


class Sqlitedict(Subject):
    """sqlitedict offers no atomic read-modify-write: get, then set (autocommit)."""

    name = "sqlitedict"
    atomic = False
    requires = ("sqlitedict",)

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        from sqlitedict import SqliteDict

        os.makedirs(workdir, exist_ok=True)
        self.db = SqliteDict(os.path.join(workdir, "sqlitedict.sqlite"), autocommit=True, timeout=60)

    def increment(self, key: str) -> None:
        session = self.db.get(key, {})
        session["count"] = session.get("count", 0) + 1
        self.db[key] = session

    def read_count(self, key: str) -> int:
        return int(self.db.get(key, {}).get("count", 0))

    def prefill(self, keys: list[str]) -> None:
        self.db.autocommit = False
        for key in keys:
            self.db[key] = {"count": 0}
        self.db.commit()
        self.db.autocommit = True

    def close(self) -> None:
        self.db.close()


class ShelveFilelock(Subject):
    """The standard library's shelve, opened per operation under a filelock."""

    name = "shelve + filelock"
    requires = ("filelock",)

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        import filelock

        os.makedirs(os.path.join(workdir, "naive-shelve"), exist_ok=True)
        self.path = os.path.join(workdir, "naive-shelve", "sessions")
        self.lock = filelock.FileLock(self.path + ".lock")

    def increment(self, key: str) -> None:
        with self.lock:
            with shelve.open(self.path) as db:
                session = db.get(key, {})
                session["count"] = session.get("count", 0) + 1
                db[key] = session

    def read_count(self, key: str) -> int:
        with self.lock:
            with shelve.open(self.path) as db:
                return int(db.get(key, {}).get("count", 0))

    def prefill(self, keys: list[str]) -> None:
        with self.lock:
            with shelve.open(self.path) as db:
                for key in keys:
                    db[key] = {"count": 0}


class _Telebot(Subject):
    """pyTelegramBotAPI's state storage, through its ``retrieve_data()`` block."""

    atomic = False
    requires = ("telebot",)

    def make(self) -> Any:
        raise NotImplementedError

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.storage = self.make()

    @staticmethod
    def _ids(key: str) -> tuple[int, int]:
        n = int(key.rsplit(":", 1)[-1])
        return n, n

    def prepare(self, keys: list[str], prefilled: bool) -> None:
        # A state must exist before retrieve_data() can save anything.
        if not prefilled:
            for key in keys:
                chat, user = self._ids(key)
                if self.storage.get_state(chat, user) is None:
                    self.storage.set_state(chat, user, "active")

    def prefill(self, keys: list[str]) -> None:
        for key in keys:
            chat, user = self._ids(key)
            self.storage.set_state(chat, user, "active")

    def increment(self, key: str) -> None:
        chat, user = self._ids(key)
        with self.storage.get_interactive_data(chat, user) as data:
            data["count"] = data.get("count", 0) + 1

    def read_count(self, key: str) -> int:
        chat, user = self._ids(key)
        return int((self.storage.get_data(chat, user) or {}).get("count", 0))


class TelebotMemory(_Telebot):
    name = "telebot StateMemoryStorage"
    shared_by_processes = False

    def make(self) -> Any:
        from telebot.storage import StateMemoryStorage

        return StateMemoryStorage()


class TelebotPickle(_Telebot):
    name = "telebot StatePickleStorage"

    def make(self) -> Any:
        from telebot.storage import StatePickleStorage

        return StatePickleStorage(os.path.join(self.workdir, "telebot", "states.pkl"))

    def prefill(self, keys: list[str]) -> None:
        # set_state() rewrites the whole pickle per key (quadratic): build the
        # same file in one go through the storage's own read/write helpers.
        st = self.storage
        data = st._read_from_file()
        for key in keys:
            chat, user = self._ids(key)
            data[st._get_key(chat, user, st.prefix, st.separator, None, None, None)] = {"state": "active", "data": {}}
        st._write_to_file(data)


class Cachelib(Subject):
    """cachelib's FileSystemCache: get, then set; it has no atomic update."""

    name = "cachelib FileSystemCache"
    atomic = False
    requires = ("cachelib",)

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        from cachelib import FileSystemCache

        self.cache = FileSystemCache(os.path.join(workdir, "cachelib"), threshold=0, default_timeout=0)

    def increment(self, key: str) -> None:
        session = self.cache.get(key) or {}
        session["count"] = session.get("count", 0) + 1
        self.cache.set(key, session)

    def read_count(self, key: str) -> int:
        return int((self.cache.get(key) or {}).get("count", 0))


# -- floors ----------------------------------------------------------------------------


class FloorDict(Subject):
    """The least a thread-safe in-memory session can cost: a dict and one Lock."""

    name = "floor: dict + Lock"
    group = "floor"
    shared_by_processes = False
    lazy_capable = True

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.data: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()

    def increment(self, key: str) -> None:
        with self.lock:
            session = self.data.setdefault(key, {})
            session["count"] = session.get("count", 0) + 1

    def read_count(self, key: str) -> int:
        with self.lock:
            return self.data.get(key, {}).get("count", 0)

    def lazy_untouched(self, key: str) -> None:
        pass  # a handler that does not need its session does nothing


class FloorReplace(Subject):
    """A file per key, msgpack to a temp file + os.replace, under a filelock."""

    name = "floor: msgpack temp+replace"
    group = "floor"
    requires = ("filelock",)

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        import filelock

        self.dir = os.path.join(workdir, "replace")
        os.makedirs(self.dir, exist_ok=True)
        self.lock = filelock.FileLock(os.path.join(self.dir, ".lock"))

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key.encode().hex())

    def _load(self, key: str) -> dict[str, int]:
        try:
            with open(self._path(key), "rb") as f:
                return msgpack.unpackb(f.read())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {}

    def _store(self, key: str, session: dict[str, int]) -> None:
        tmp = f"{self._path(key)}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(msgpack.packb(session))
        os.replace(tmp, self._path(key))

    def increment(self, key: str) -> None:
        with self.lock:
            session = self._load(key)
            session["count"] = session.get("count", 0) + 1
            self._store(key, session)

    def read_count(self, key: str) -> int:
        return self._load(key).get("count", 0)

    def prefill(self, keys: list[str]) -> None:
        for key in keys:
            self._store(key, {"count": 0})


BACKENDS: dict[str, Callable[[str], Subject]] = {
    "memory": SkMemory,
    "msgpack": SkMsgpack,
    "shelve": SkShelve,
    "shelve-gnu": SkShelveGnu,
    "shelve-sqlite3": SkShelveSqlite,
}
PEERS: dict[str, Callable[[str], Subject]] = {
    "diskcache": Diskcache,
    "sqlitedict": Sqlitedict,
    "shelve-filelock": ShelveFilelock,
    "telebot-memory": TelebotMemory,
    "telebot-pickle": TelebotPickle,
    "cachelib": Cachelib,
}
FLOORS: dict[str, Callable[[str], Subject]] = {
    "floor-dict": FloorDict,
    "floor-replace": FloorReplace,
}
ALL: dict[str, Callable[[str], Subject]] = {**BACKENDS, **PEERS, **FLOORS}


def available(name: str) -> str | None:
    """None if the subject can run here, else why not."""
    cls: Any = ALL[name]
    for module in cls.requires:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None
