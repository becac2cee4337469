"""The msgpack encoding shared by the memory and msgpack-file backends.

Both backends accept exactly the same values, so moving a bot from memory to
disk never changes what a session can hold: ``None``, ``bool``, ``int``
(64-bit), ``float``, ``str``, ``bytes``, and lists/tuples/dicts of these.
Tuples come back as lists; dict keys may be ``str``, ``bytes``, ``int`` or
tuples of these (which come back as tuples).
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from .errors import CorruptSessionError, SerializationError

_unpackb = msgpack.unpackb
# What msgpack raises for bytes it cannot decode (an unhashable map key is a
# TypeError).  Nothing broader: an exception a signal handler raises while
# decoding must propagate as itself, not be reported as a damaged session.
DECODE_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)
_local = threading.local()


def _new_packer() -> Any:
    packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def dumps(value: Any, key: str | None = None) -> bytes:
    """Encode ``value``; ``SerializationError`` if msgpack cannot hold it."""
    # A Packer per thread is three times faster than msgpack.packb, which
    # builds a new Packer on every call; a Packer resets itself after errors.
    try:
        try:
            packer = _local.packer
        except AttributeError:
            packer = _new_packer()
        return packer.pack(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(
            f"cannot store session {key!r}: {exc} (sessions hold None, bool, int, "
            "float, str, bytes, and lists and dicts of these)",
            key=key,
        ) from exc


def _lists(value: Any) -> Any:
    """Tuples back to lists, except where they are dict keys."""
    if isinstance(value, tuple):
        return [_lists(item) for item in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def loads(data: bytes, key: str | None = None, path: str | None = None) -> Any:
    """Decode stored bytes; ``CorruptSessionError`` if they are not msgpack."""
    try:
        try:
            return _unpackb(data, raw=False, strict_map_key=False)
        except TypeError:
            # a tuple as a dict key ({("sku", 7): 2}) is stored as an array,
            # which cannot be a key once decoded as a list: decode arrays as
            # tuples, then turn every one that is not a key back into a list
            return _lists(_unpackb(data, raw=False, strict_map_key=False, use_list=False))
    except DECODE_ERRORS as exc:
        where = f" in {path}" if path else ""
        raise CorruptSessionError(
            f"stored bytes of session {key!r}{where} cannot be decoded: {exc}",
            key=key,
            path=path,
        ) from exc
