"""The exception tree: built-in bases, context, pickling."""

from __future__ import annotations

import datetime
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import sessionkit.errors as errors
from sessionkit import (
    MemoryStorage,
    MsgpackFileStorage,
    CorruptSessionError,
    LockLost,
    LockTimeout,
    SerializationError,
    SessionError,
    SessionKeyError,
    StorageError,
)


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (SessionKeyError, KeyError),
        (LockTimeout, TimeoutError),
        (SerializationError, TypeError),
        (CorruptSessionError, ValueError),
        (StorageError, OSError),
    ],
)
def test_each_error_is_a_session_error_and_its_builtin(cls: type, builtin: type) -> None:
    err = cls("message", key="k", path="/tmp/x")
    assert isinstance(err, SessionError) and isinstance(err, builtin)
    assert str(err) == "message"
    assert err.key == "k" and err.path == "/tmp/x"
    assert cls.__name__ in errors.__doc__  # the tree is drawn in the module docstring


@pytest.mark.parametrize(
    "cls", [SessionError, SessionKeyError, LockTimeout, SerializationError, CorruptSessionError, StorageError, LockLost]
)
def test_errors_pickle_with_their_context(cls: type) -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise cls("failed", key="chat:1", path="/data/x") from exc
    except SessionError as err:
        copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls
    assert str(copy) == "failed" and copy.key == "chat:1" and copy.path == "/data/x"


def test_session_key_error_message_is_not_quoted() -> None:
    assert str(SessionKeyError("no key")) == "no key"


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or e in found:
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
    return found


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"stats": {"seen": datetime.datetime(2024, 1, 1)}}, "['stats']['seen'] is a datetime.datetime"),
        ({"a": [1, 2, {3}]}, "['a'][2] is a set"),
        ({"n": 2**64}, "['n'] is an int out of msgpack's 64-bit range"),
        ({(1, datetime.date(2020, 1, 1)): 1}, "has a key (1, datetime.date(2020, 1, 1)) whose [1] is a datetime.date"),
    ],
)
def test_a_serialization_error_names_the_field(value: Any, where: str) -> None:
    errors: list[BaseException] = []

    def first_write_in_a_new_thread() -> None:  # the thread's first encoding builds its packer
        try:
            MemoryStorage().write("42", value)
        except SerializationError as exc:
            errors.append(exc)

    t = threading.Thread(target=first_write_in_a_new_thread)
    t.start()
    t.join()
    (exc,) = errors
    assert f"session '42': " in str(exc) and where in str(exc), str(exc)
    assert not any(isinstance(e, AttributeError) for e in _chain(exc))


def test_a_file_where_a_msgpack_store_directory_should_be(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        MsgpackFileStorage(tmp_path / "a_file")
