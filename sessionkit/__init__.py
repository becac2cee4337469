"""sessionkit: per-key sessions for sync Python bots and threaded servers.

::

    from sessionkit import Sessions, MemoryStorage

    sessions = Sessions(MemoryStorage(), initial=dict)
    with sessions.open(chat_id) as s:       # per-key lock, read
        s["count"] = s.get("count", 0) + 1  # clean exit: write back, unlock
"""

from .enhance import enhance_storage
from .errors import (
    CorruptSessionError,
    LockLost,
    LockTimeout,
    SerializationError,
    SessionError,
    SessionKeyError,
    StorageError,
)
from .manager import MultiSessions, Sessions
from .session import Session
from .storage.base import StorageAdapter
from .storage.memory import MemoryStorage
from .storage.msgpack_file import MsgpackFileStorage
from .storage.redis_store import RedisStorage
from .storage.shelf import ShelveStorage

__version__ = "0.1.0"

__all__ = [
    "Sessions",
    "Session",
    "MultiSessions",
    "StorageAdapter",
    "MemoryStorage",
    "MsgpackFileStorage",
    "ShelveStorage",
    "RedisStorage",
    "enhance_storage",
    "SessionError",
    "SessionKeyError",
    "LockTimeout",
    "SerializationError",
    "CorruptSessionError",
    "StorageError",
    "LockLost",
]
