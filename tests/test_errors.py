"""The exception tree: built-in bases, context, pickling."""

from __future__ import annotations

import pickle

import pytest

import sessionkit.errors as errors
from sessionkit import (
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
