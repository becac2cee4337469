"""The public surface of API.md: complete, importable, typed."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import sessionkit

API = {
    "Sessions", "Session", "MultiSessions", "StorageAdapter", "MemoryStorage", "MsgpackFileStorage", "ShelveStorage",
    "RedisStorage",
    "enhance_storage", "SessionError", "SessionKeyError", "LockTimeout",
    "SerializationError", "CorruptSessionError", "StorageError",
}


def test_all_is_complete_and_importable() -> None:
    assert API <= set(sessionkit.__all__)
    assert len(sessionkit.__all__) == len(set(sessionkit.__all__))
    for name in sessionkit.__all__:
        assert getattr(sessionkit, name) is not None
    public = {n for n in vars(sessionkit) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(sessionkit.__all__)


def test_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from sessionkit import *", namespace)
    assert API <= set(namespace)


def test_version_and_py_typed() -> None:
    assert isinstance(sessionkit.__version__, str)
    assert (pathlib.Path(sessionkit.__file__).parent / "py.typed").exists()


def test_import_needs_only_filelock_and_msgpack() -> None:
    code = (
        "import sys, sessionkit\n"
        "banned = {'redis', 'diskcache', 'sqlitedict', 'telebot', 'flask'} & set(sys.modules)\n"
        "assert not banned, banned\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_module_imports() -> None:
    root = pathlib.Path(sessionkit.__file__).parent
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        importlib.import_module(name.removesuffix(".__init__"))
