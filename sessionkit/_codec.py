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
_KEEP_BUFFER = 1 << 20  # a packer that encoded more than this is dropped, with its buffer


def _new_packer() -> Any:
    packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def dumps(value: Any, key: str | None = None) -> bytes:
    """Encode ``value``; ``SerializationError`` if msgpack cannot hold it."""
    # A Packer per thread is three times faster than msgpack.packb, which
    # builds a new Packer on every call; a Packer resets itself after errors.
    try:
        packer = _local.packer
    except AttributeError:  # handled here, so it is never the context of an error below
        packer = _new_packer()
    try:
        data: bytes = packer.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        where = find_unstorable(value, _msgpack_leaf)
        raise SerializationError(
            f"cannot store session {key!r}: {where or exc} (sessions hold None, bool, int, "
            "float, str, bytes, and lists and dicts of these)",
            key=key,
        ) from exc
    if len(data) > _KEEP_BUFFER:
        del _local.packer  # it keeps a buffer as large as its largest value: let that go
    return data


def _msgpack_leaf(value: Any) -> str | None:
    """Why msgpack cannot hold ``value`` itself (not its items), or None."""
    kind = type(value)
    if value is None or isinstance(value, (float, str, bytes, list, tuple, dict)):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else "is an int out of msgpack's 64-bit range"
    return f"is a {kind.__module__ + '.' if kind.__module__ != 'builtins' else ''}{kind.__qualname__}"


def find_unstorable(value: Any, leaf: Any, limit: int = 100_000) -> str | None:
    """The path of the first part of ``value`` that ``leaf`` refuses, as
    ``["stats"]["seen"] is a datetime.datetime``; None if none is found.

    ``leaf(part)`` says why one part (not its items) cannot be stored, or
    None.  Dict keys are checked too.  Only called once encoding has failed.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    seen = 0
    while stack and seen < limit:
        path, part = stack.pop()
        seen += 1
        why = leaf(part)
        if why is not None:
            return f"{path or 'the value'} {why}"
        if isinstance(part, dict):
            items = list(part.items())
            for k, v in reversed(items):
                why_key = leaf(k)
                if why_key is None and isinstance(k, tuple):
                    inner = find_unstorable(k, leaf, limit)
                    why_key = None if inner is None else f"whose {inner}"
                elif why_key is not None:
                    why_key = f"that {why_key}"
                if why_key is not None:
                    return f"{path or 'the value'} has a key {k!r} {why_key}"
                stack.append((f"{path}[{k!r}]", v))
        elif isinstance(part, (list, tuple)):
            for i in range(len(part) - 1, -1, -1):
                stack.append((f"{path}[{i}]", part[i]))
    return None


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
            f"stored bytes of session {key!r}{where} cannot be decoded: {exc or type(exc).__name__}",
            key=key,
            path=path,
        ) from exc
