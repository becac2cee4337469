"""The second process of tests/test_model.py, and the steps it shares with it.

A spawned child imports this module by name and runs :func:`serve`: it reads
commands from its end of a pipe, one at a time, and answers each with
``("ok", result)`` or ``("error", traceback)``, so a failure in the child shows
in the test with its traceback instead of as a hang.  The test's own process
runs its sessions through :func:`apply_steps` too, so both processes change a
session in exactly the same way.

A *step* is a tuple naming what a ``with sessions.open(key) as s:`` block
does to ``s``:

``("assign", value)``, ``("delete",)``, ``("read",)``, ``("raise",)``,
``("set", path, slot, value)``, ``("del", path, slot)``, ``("pop", path, slot)``,
``("append", path, value)``, ``("setdefault", key, value)``, ``("update", mapping)``

where ``path`` leads from the session value to a nested dict or list, and
``slot`` is a key of that dict or an index into that list.  An empty path
goes through the handle's own mapping methods (``s[k] = v``, ``del s[k]``,
``s.pop(k)``) when the value is a dict.
"""

from __future__ import annotations

import copy
import traceback
from typing import Any, Callable, Sequence

from sessionkit import MemoryStorage, MsgpackFileStorage, Session, Sessions, ShelveStorage

__all__ = ["Planned", "apply_steps", "open_spec", "serve"]


class Planned(Exception):
    """Raised inside a ``with`` block on purpose: nothing may be written."""


def open_spec(spec: dict[str, Any], clock: Callable[[], float]) -> Any:
    """A new storage object on the store ``spec`` describes.

    ``spec``: ``kind`` (a backend of tests/conftest.py), ``ttl``, and ``path``
    (and ``dbm``) for a disk store or ``url`` and ``prefix`` for Redis.  Redis
    keeps its own time; every other backend reads ``clock``.
    """
    kind, ttl = spec["kind"], spec.get("ttl")
    if kind == "memory":
        return MemoryStorage(ttl=ttl, clock=clock)
    if kind == "msgpack":
        return MsgpackFileStorage(spec["path"], ttl=ttl, clock=clock)
    if kind == "shelve":
        return ShelveStorage(spec["path"], dbm=spec.get("dbm"), ttl=ttl, clock=clock)
    if kind in ("redis", "redis-cluster"):
        from sessionkit import RedisStorage

        return RedisStorage(url=spec["url"], cluster=kind == "redis-cluster", prefix=spec["prefix"], ttl=ttl)
    raise AssertionError(f"unknown backend {kind}")


def _container(s: Session, path: Sequence[Any]) -> Any:
    """The dict or list at ``path`` inside the session value (the first step through the handle)."""
    if not path:
        return s.data
    node = s[path[0]] if type(s.data) is dict else s.data[path[0]]
    for part in path[1:]:
        node = node[part]
    return node


def _read(s: Session) -> None:
    """Touch the value every way a handler might, changing nothing."""
    value = s.data
    if type(value) is dict:
        assert len(s) == len(value) and list(s) == list(value)
        assert list(s.keys()) == list(value.keys())
        assert list(s.items()) == list(value.items()) and list(s.values()) == list(value.values())
        for k in value:
            assert k in s and s.get(k) is value[k] and s[k] is value[k]
        assert "\x00missing" not in s and s.get("\x00missing") is None


def apply_steps(s: Session, steps: Sequence[tuple[Any, ...]]) -> None:
    """Do ``steps`` to the open session ``s`` (values are copied, never shared with the caller)."""
    for step in steps:
        op = step[0]
        if op == "assign":
            s.data = copy.deepcopy(step[1])
        elif op == "delete":
            s.delete()
        elif op == "read":
            _read(s)
        elif op == "raise":
            raise Planned()
        elif op == "setdefault":
            s.setdefault(step[1], copy.deepcopy(step[2]))
        elif op == "update":
            s.update(copy.deepcopy(step[1]))
        elif op == "append":
            _container(s, step[1]).append(copy.deepcopy(step[2]))
        else:
            path, slot = step[1], step[2]
            top = not path and type(s.data) is dict
            if op == "set":
                if top:
                    s[slot] = copy.deepcopy(step[3])
                else:
                    _container(s, path)[slot] = copy.deepcopy(step[3])
            elif op == "del":
                if top:
                    del s[slot]
                else:
                    del _container(s, path)[slot]
            elif op == "pop":
                if top:
                    s.pop(slot)
                else:
                    _container(s, path).pop(slot)
            else:
                raise AssertionError(f"unknown step {step!r}")


def serve(conn: Any) -> None:
    """Answer the test's commands until ``("exit",)`` or the pipe closes.

    ``("open", spec)`` opens a storage (closing the one before), ``("close",)``
    closes it, ``("session", now, prefix, write_unchanged, key, lazy, steps)``
    runs one session at clock time ``now`` and answers ``["raised", start]``
    when its steps raised :class:`Planned` (else ``["done", start]``; ``start``
    is the value an eager session started from), ``("items", now)`` answers
    ``storage.items()`` as a list.
    """
    now = [0.0]
    storage: Any = None
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command[0] == "exit":
                return
            try:
                result: Any = None
                if command[0] == "open":
                    if storage is not None:
                        storage.close()
                        storage = None
                    storage = open_spec(command[1], lambda: now[0])
                elif command[0] == "close":
                    if storage is not None:
                        storage.close()
                        storage = None
                elif command[0] == "session":
                    _, now[0], prefix, write_unchanged, key, lazy, steps = command
                    sessions = Sessions(storage, initial=dict, prefix=prefix, write_unchanged=write_unchanged,
                                        lock_timeout=10)
                    result = ["done", None]
                    try:
                        with sessions.open(key, lazy=lazy) as s:
                            if not lazy:  # already read: what it started from
                                result[1] = copy.deepcopy(s.data)
                            apply_steps(s, steps)
                    except Planned:
                        result[0] = "raised"
                elif command[0] == "items":
                    now[0] = command[1]
                    result = list(storage.items())
                else:
                    raise AssertionError(f"unknown command {command!r}")
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        if storage is not None:
            storage.close()
        conn.close()
