"""Where a session's lock lives in Redis: the same cluster slot as its data.

A Redis Cluster runs a script only when all its keys hash to one slot.  The
slot of a key is CRC16 of its *hash tag* (the text between the first ``{``
and the next ``}``, when that is not empty) or of the whole key.  The data
key is the session key itself (``prefix + key``), so the helper keys of a
session (its lock, its wake-up list, its waiter count, its commit
receipts) are built as
``{T}`` + a marker + the data key, with a tag ``T`` of the same slot:

* the data key's own hash tag, when it has one;
* else the whole data key, when it is not empty and holds no ``}`` (so
  ``{T}`` closes where the data key ends);
* else (a key such as ``a}b``, ``x{}y`` or ``""``) a short tag of three letters and
  digits found to hash to the same slot (a table built on first need).

The marker holds NUL bytes, so no printable session key can collide with a
helper key; :func:`is_helper` tells them apart in listings, and
``RedisStorage`` refuses a session key that is one.
"""

from __future__ import annotations

import binascii
import itertools
import string
import threading

__all__ = ["helper_keys", "is_helper", "slot_of", "MARKS"]

SLOTS = 16384
# The three helper keys of a session, by their marker
MARKS = ("\x00sk-lock\x00", "\x00sk-wake\x00", "\x00sk-wait\x00", "\x00sk-done\x00")
_table: list[str] = []
_table_mutex = threading.Lock()


def _tag(key: str) -> str | None:
    """The hash tag Redis Cluster uses for ``key``, or None (the whole key counts)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None  # no closing brace, or "{}": the whole key is hashed
    return key[start + 1 : end]


def slot_of(key: str) -> int:
    """Redis Cluster's slot for ``key`` (as UTF-8)."""
    tag = _tag(key)
    return binascii.crc_hqx((key if tag is None else tag).encode("utf-8", "surrogatepass"), 0) % SLOTS


def _short_tag(slot: int) -> str:
    """A tag of three letters and digits whose slot is ``slot``."""
    if not _table:
        with _table_mutex:
            if not _table:
                found: list[str | None] = [None] * SLOTS
                alphabet = string.ascii_letters + string.digits
                left = SLOTS
                for letters in itertools.product(alphabet, repeat=3):
                    tag = "".join(letters)
                    s = binascii.crc_hqx(tag.encode(), 0) % SLOTS
                    if found[s] is None:
                        found[s] = tag
                        left -= 1
                        if not left:
                            break
                if left:  # cannot happen with 238,328 candidates; checked anyway
                    raise RuntimeError("no three-letter hash tag for some cluster slots")
                _table.extend(t for t in found if t is not None)
    return _table[slot]


def helper_keys(data_key: str) -> tuple[str, ...]:
    """The lock, wake-up list, waiter count and commit receipts keys of ``data_key``."""
    tag = _tag(data_key)
    if tag is None:
        tag = data_key if data_key and "}" not in data_key else _short_tag(slot_of(data_key))
    head = "{" + tag + "}"
    return tuple(head + mark + data_key for mark in MARKS)


def is_helper(key: str) -> bool:
    """Whether ``key`` (from a listing, or asked for as a session) is one of sessionkit's helper keys."""
    if not key.startswith("{"):
        return False
    close = key.find("}", 1)
    if close < 2:
        return False
    rest = key[close + 1 :]
    for number, mark in enumerate(MARKS):
        if rest.startswith(mark):
            return helper_keys(rest[len(mark) :])[number] == key
    return False
