"""Store names for the ``sessionkit`` command: parse them, check they exist, open them.

One argument names a store::

    msgpack:./sessions                      a MsgpackFileStorage directory
    shelve:./prefs.db                       a ShelveStorage (its dbm is detected)
    shelve:./prefs.db?dbm=dbm.gnu           ... on a given dbm (for a new shelf)
    redis://127.0.0.1:6379/0?prefix=bot:    a RedisStorage (also rediss://)
    redis+cluster://host:7000?prefix=bot:   a RedisStorage on a Redis Cluster (also rediss+cluster://)
    ./sessions                              an existing msgpack store directory (it has a FORMAT file)

Redis names also take ``codec=json`` (default ``msgpack``); other query
parameters (``socket_timeout=5``, ...) go to redis-py.  ``memory:`` is
refused: a memory store lives inside one process, which the command cannot
reach.

Nothing here creates a store unless asked to (``open_store(..., create=True)``,
for the destination of ``copy``): the storage constructors create their
directories and files, so existence is checked before one is built.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from .storage.shelf import _SQLITE_FILES  # the files beside a dbm.sqlite3 shelf

__all__ = [
    "CliError", "StoreSpec", "parse_store", "open_store", "close_store", "require_msgpack_store",
    "shelf_files",
    "USAGE_ERROR", "STORE_ERROR", "DAMAGED", "NAME_HELP",
]

USAGE_ERROR = 2
STORE_ERROR = 3
DAMAGED = 4

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_REDIS_SCHEMES = {
    "redis": ("redis", False),
    "rediss": ("rediss", False),
    "redis+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
}
_FORMAT_FILE = "FORMAT"
_DBMS = ("dbm.dumb", "dbm.gnu", "dbm.ndbm", "dbm.sqlite3")  # what shelve:PATH?dbm= may name
_CONNECT_TIMEOUT = 5.0  # seconds, unless the URL sets socket_connect_timeout
_SOCKET_TIMEOUT = 30.0  # seconds, unless the URL sets socket_timeout
NAME_HELP = (
    "msgpack:DIR, shelve:PATH[?dbm=dbm.gnu], redis://HOST:PORT/DB[?prefix=P&codec=json] "
    "(also rediss://, redis+cluster://HOST:PORT), or the path of an existing msgpack store directory"
)


class CliError(Exception):
    """An error the command reports in one line, exiting with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        """An error reported as ``message``, exiting with ``code``."""
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StoreSpec:
    """A parsed store name."""

    kind: str  # "msgpack", "shelve" or "redis"
    name: str  # as given, with any password hidden
    path: str = ""  # msgpack, shelve: absolute path
    dbm: str | None = None  # shelve: the dbm asked for
    url: str = ""  # redis: the URL given to redis-py (without prefix= and codec=)
    cluster: bool = False
    prefix: str = ""
    codec: str = "msgpack"

    @property
    def identity(self) -> str:
        """Who the store is, to tell two names of one store apart (and order locks)."""
        if self.kind == "redis":
            parts = urlsplit(self.url)
            host = (parts.hostname or "localhost").lower()
            db = int(parts.path.strip("/") or "0")
            return f"redis:{host}:{parts.port or 6379}/{db}:{'cluster' if self.cluster else ''}:{self.prefix}"
        return f"{self.kind}:{os.path.realpath(self.path)}"


def _hide_password(name: str) -> str:
    """A store name with the password of a URL replaced by ``***``."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", name)


def _is_msgpack_store(path: str) -> bool:
    """Whether ``path`` holds a msgpack store's FORMAT file."""
    from .storage.msgpack_file import FORMAT_VERSIONS

    try:
        with open(os.path.join(path, _FORMAT_FILE), "rb") as f:
            return f.readline().rstrip(b"\n") in FORMAT_VERSIONS
    except OSError:
        return False


# The files of a shelf named NAME, by dbm: dbm.dumb keeps NAME.dat, NAME.dir (and
# NAME.bak while it rewrites the index), dbm.ndbm NAME.db (Berkeley DB) or
# NAME.dir and NAME.pag (classic ndbm), dbm.gnu and dbm.sqlite3 the bare NAME
# (SQLite also NAME-wal, NAME-shm and NAME-journal beside it).
_SUFFIXED_FILES = (".dat", ".dir", ".bak", ".db", ".pag")
_GNU_MAGICS = {0x13579ACD, 0x13579ACE, 0x13579ACF, 0x13579AD0, 0x13579AD1}
_BERKELEY_MAGICS = {0x00053162, 0x00061561}  # btree, hash (at byte 12)


def _is_dbm_file(path: str) -> bool:
    """Whether ``path`` is a file a dbm keeps under the bare name: gdbm, SQLite or Berkeley DB."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head.startswith(b"SQLite format 3\0"):
        return True
    if len(head) >= 4 and {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} & _GNU_MAGICS:
        return True
    if len(head) == 16:
        magic = {int.from_bytes(head[12:], "little"), int.from_bytes(head[12:], "big")}
        return bool(magic & _BERKELEY_MAGICS)
    return False


def shelf_files(path: str) -> list[str]:
    """The existing files of the shelf at ``path`` (its dbm's files, not its lock file).

    Only the exact names a dbm uses count: ``NAME.dat``/``.dir``/``.bak``
    (dbm.dumb), ``NAME.db`` or ``NAME.pag`` (dbm.ndbm), and the bare ``NAME``
    when it is a gdbm, SQLite or Berkeley DB file (with SQLite's
    ``NAME-wal``/``-shm``/``-journal``).  ``NAME.x.dat`` is another shelf's.
    """
    found = [path + end for end in _SUFFIXED_FILES if os.path.isfile(path + end)]
    if os.path.isfile(path) and _is_dbm_file(path):
        found.append(path)
        found.extend(path + end for end in _SQLITE_FILES if os.path.isfile(path + end))
    return sorted(found)


def _shelves_like(path: str) -> list[str]:
    """Other shelves whose names start with ``path``'s (``store.shelf`` for ``store``), for a hint."""
    directory, name = os.path.split(path)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    found = set()
    for f in names:
        for end in _SUFFIXED_FILES:
            stem = f[:-len(end)]
            if f.endswith(end) and stem.startswith(name) and stem != name:
                found.add(os.path.join(directory, stem))
        if f.startswith(name) and f != name and _is_dbm_file(os.path.join(directory, f)):
            found.add(os.path.join(directory, f))
    return sorted(p for p in found if shelf_files(p))[:3]


def _no_shelf(spec: StoreSpec) -> CliError:
    """The error for a shelve: name whose shelf does not exist, with a hint at the likely one."""
    path = spec.path
    if os.path.isfile(path):
        stem, end = os.path.splitext(path)
        hint = ""
        if end in _SUFFIXED_FILES + (".lock",) and shelf_files(stem):
            hint = f": a shelf is named without its files' endings: shelve:{stem}"
        return CliError(
            f"{path} is a file but not a shelf (no dbm sessionkit knows wrote it){hint}; nothing was changed",
            STORE_ERROR,
        )
    others = _shelves_like(path)
    hint = f"; did you mean {' or '.join('shelve:' + p for p in others)}?" if others else ""
    return CliError(
        f"no shelf at {path} (none of {os.path.basename(path)}.dat/.dir/.db or a dbm file "
        f"{os.path.basename(path)} exists){hint}",
        STORE_ERROR,
    )


def parse_store(name: str) -> StoreSpec:
    """Parse a store name; ``CliError`` (a usage error) when it names no store this command can use."""
    shown = _hide_password(name)
    if not name:
        raise CliError(f"an empty store name; give {NAME_HELP}", USAGE_ERROR)
    match = _SCHEME.match(name)
    kind = match.group(1).lower() if match else ""
    if kind == "memory":
        raise CliError(
            "memory: is not a store this command can reach: a MemoryStorage lives inside the process that "
            "made it; name a msgpack:, shelve: or redis:// store",
            USAGE_ERROR,
        )
    if kind == "msgpack":
        rest = name[len("msgpack:"):]
        if not rest:
            raise CliError("msgpack: needs a directory, e.g. msgpack:./sessions", USAGE_ERROR)
        return StoreSpec("msgpack", shown, path=os.path.abspath(rest))
    if kind == "shelve":
        rest = name[len("shelve:"):]
        dbm = None
        if "?" in rest:
            rest, _, query = rest.rpartition("?")
            for key, value in _query(query, shown):
                if key != "dbm":
                    raise CliError(f"{shown}: unknown option {key!r} (a shelve: name takes only dbm=)",
                                   USAGE_ERROR)
                dbm = value
        if not rest:
            raise CliError("shelve: needs the shelf's path, e.g. shelve:./prefs.db", USAGE_ERROR)
        if dbm and (dbm if dbm.startswith("dbm.") else "dbm." + dbm) not in _DBMS:
            raise CliError(f"{shown}: unknown dbm {dbm!r}; give one of {', '.join(_DBMS)}", USAGE_ERROR)
        return StoreSpec("shelve", shown, path=os.path.abspath(rest), dbm=dbm or None)
    if kind in _REDIS_SCHEMES:
        return _parse_redis(name, kind, shown)
    if kind and "://" in name:
        raise CliError(f"{shown}: unknown store kind {kind!r}; give {NAME_HELP}", USAGE_ERROR)
    # a bare path: only an existing msgpack store is unambiguous
    if os.path.isdir(name) and _is_msgpack_store(name):
        return StoreSpec("msgpack", shown, path=os.path.abspath(name))
    if not os.path.isdir(name) and shelf_files(os.path.abspath(name)):
        raise CliError(f"{shown} looks like a shelf; name it shelve:{name}", USAGE_ERROR)
    if kind:
        raise CliError(f"{shown}: unknown store kind {kind!r}; give {NAME_HELP}", USAGE_ERROR)
    if os.path.isdir(name):
        why = "a directory without a FORMAT file, so not a msgpack store"
    elif os.path.exists(name):
        why = "not a msgpack store directory"
    else:
        why = "no such file or directory"
    raise CliError(f"{shown} is {why}; give {NAME_HELP}", USAGE_ERROR)


def _query(query: str, shown: str) -> list[tuple[str, str]]:
    """``a=1&b=2`` as pairs, percent-decoded (``+`` stays a plus)."""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise CliError(f"{shown}: option {key!r} needs a value ({key}=...)", USAGE_ERROR)
        pairs.append((unquote(key), unquote(value)))
    return pairs


def _parse_redis(name: str, kind: str, shown: str) -> StoreSpec:
    """A ``redis://``-style name: the URL for redis-py, plus ``prefix=`` and ``codec=``."""
    scheme, cluster = _REDIS_SCHEMES[kind]
    parts = urlsplit(name)
    prefix = ""
    codec = "msgpack"
    rest = []
    seen = set()
    for key, value in _query(parts.query, shown):
        if key in ("prefix", "codec"):
            if key in seen:
                raise CliError(f"{shown}: {key}= is given twice", USAGE_ERROR)
            seen.add(key)
            if key == "prefix":
                prefix = value
            elif value not in ("msgpack", "json"):
                raise CliError(f"{shown}: codec must be msgpack or json, not {value!r}", USAGE_ERROR)
            else:
                codec = value
        elif key == "db":
            raise CliError(f"{shown}: give the database in the path (redis://HOST:PORT/DB), not as db=",
                           USAGE_ERROR)
        else:
            rest.append(f"{key}={value}")
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise CliError(f"{shown}: the database must be a number (redis://HOST:PORT/0), not {db!r}",
                       USAGE_ERROR)
    if not parts.hostname:
        raise CliError(f"{shown}: a Redis URL needs a host, e.g. redis://127.0.0.1:6379/0", USAGE_ERROR)
    try:
        parts.port
    except ValueError as exc:
        raise CliError(f"{shown}: {exc}", USAGE_ERROR) from None
    if cluster and db and int(db) != 0:
        raise CliError(f"{shown}: a Redis Cluster has only database 0", USAGE_ERROR)
    url = urlunsplit((scheme, parts.netloc, parts.path, "&".join(rest), ""))
    return StoreSpec("redis", shown, url=url, cluster=cluster, prefix=prefix, codec=codec)


def open_store(spec: StoreSpec, *, create: bool = False) -> Any:
    """The storage ``spec`` names.

    ``CliError`` when it does not exist (unless ``create``) or cannot be opened.
    """
    if spec.kind == "msgpack":
        return _open_msgpack(spec, create)
    if spec.kind == "shelve":
        return _open_shelve(spec, create)
    return _open_redis(spec)


def require_msgpack_store(path: str, create: bool = False) -> None:
    """``CliError`` unless ``path`` is a msgpack store (or, with ``create``, a place to make one)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{path} is not a directory, so not a msgpack store", STORE_ERROR)
    if os.path.exists(os.path.join(path, _FORMAT_FILE)):
        return
    if not os.path.isdir(path):
        if not create:
            raise CliError(f"no msgpack store at {path} (no such directory)", STORE_ERROR)
        return
    names = os.listdir(path)
    if any(n.startswith("shard-") and n.endswith(".log") for n in names):
        raise CliError(
            f"{path} holds shard logs but no FORMAT file (it records the shard count): restore it from a "
            "backup",
            DAMAGED,
        )
    if not create:
        raise CliError(f"{path} is not a msgpack store (it has no FORMAT file)", STORE_ERROR)
    if names:
        raise CliError(f"{path} is not empty and is not a msgpack store; copy into a new or empty directory",
                       STORE_ERROR)


def _open_msgpack(spec: StoreSpec, create: bool) -> Any:
    """A MsgpackFileStorage, once the directory is known to be a store (or a place for one)."""
    from .storage.msgpack_file import MsgpackFileStorage

    require_msgpack_store(spec.path, create)
    return MsgpackFileStorage(spec.path)


def _open_shelve(spec: StoreSpec, create: bool) -> Any:
    """A ShelveStorage, once its files are known to exist (unless ``create``).

    ShelveStorage creates the shelf's lock file (and a new shelf), so nothing
    is built for a name whose dbm files are not there.
    """
    from .storage.shelf import ShelveStorage

    if os.path.isdir(spec.path):
        raise CliError(f"{spec.path} is a directory; a shelf's path names its files (e.g. ./prefs.db)",
                       STORE_ERROR)
    if not shelf_files(spec.path) and (not create or os.path.exists(spec.path)):
        raise _no_shelf(spec)
    from .errors import CorruptSessionError

    try:
        return ShelveStorage(spec.path, dbm=spec.dbm)
    except CorruptSessionError:  # damaged files (a ValueError too): the caller reports them
        raise
    except ValueError as exc:  # a dbm this Python lacks, or another one than the shelf's
        raise CliError(f"{spec.name}: {exc}", USAGE_ERROR) from None


def _open_redis(spec: StoreSpec) -> Any:
    """A RedisStorage on a client that answered a PING."""
    try:
        import redis
        from redis.cluster import RedisCluster
    except ImportError:
        raise CliError("Redis stores need redis-py: pip install 'sessionkit[redis]'", STORE_ERROR) from None
    from .storage.redis_store import RedisStorage

    client: Any = None
    try:
        if spec.cluster:
            client = RedisCluster.from_url(
                spec.url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT
            )
        else:  # the URL's own socket_timeout= and socket_connect_timeout= win over these
            client = redis.Redis.from_url(
                spec.url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT
            )
        client.ping()
        return RedisStorage(client, prefix=spec.prefix, codec=spec.codec)
    except (redis.RedisError, OSError) as exc:
        _close_client(client)
        raise CliError(f"cannot connect to {spec.name}: {exc}", STORE_ERROR) from None
    except (TypeError, ValueError) as exc:  # a query parameter redis-py does not take
        _close_client(client)
        raise CliError(f"{spec.name}: {exc}", USAGE_ERROR) from None
    except Exception as exc:  # redis-py's cluster set-up raises RedisClusterException, not a RedisError
        _close_client(client)
        raise CliError(f"cannot connect to {spec.name}: {type(exc).__name__}: {exc}", STORE_ERROR) from None


def _close_client(client: Any) -> None:
    """Close a redis-py client, ignoring its errors."""
    if client is not None:
        try:
            client.close()
        except Exception:
            pass


def close_store(storage: Any) -> None:
    """Close a storage made by ``open_store`` (and a Redis client it was given)."""
    storage.close()
    client = getattr(storage, "client", None)
    if client is not None:
        _close_client(client)
