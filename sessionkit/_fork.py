"""What happens to sessionkit's in-process state when the process forks.

``os.fork()`` copies every mutex in whatever state it is in, but only the
forking thread goes on in the child.  A mutex that another thread held at
that moment would stay locked in the child for ever, and a key that another
thread held would never be released there.  So every object that owns such
state registers here, and ``os.register_at_fork`` runs, in this order:

``before`` (in the parent, in the forking thread)
    takes every registered object's mutexes, so the fork happens between
    storage calls and never copies a half-updated index;
``after_in_parent``
    releases them again;
``after_in_child``
    releases them too, forgets every key held or awaited by the parent's
    other threads (keys the forking thread holds stay held, and a disk
    store refuses the child's writes of them), and reopens what must not be
    shared with the parent (a lock file's open file description and the
    directory's ``flock``: a lock taken through a shared one would belong to
    both processes).

An object registers with :func:`register` and implements ``_fork_before()``,
``_fork_after_parent()`` and ``_fork_after_child()``.  Objects are held
weakly; their hooks run in registration order (reversed after the fork), and
no code path holds the mutexes of two registered objects at once, so taking
them all cannot deadlock.
"""

from __future__ import annotations

import logging  # noqa: F401 - its fork hook registered before ours (see install)
import os
import threading
import weakref
from typing import Any

_objects: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_counter = 0
_mutex = threading.Lock()
_taken: list[Any] = []  # objects whose _fork_before() ran, for the two after-hooks
_first: list[Any] = []  # module-level mutexes, taken before _mutex (see register_mutex)


def register_mutex(mutex: Any) -> None:
    """Hold ``mutex`` across every fork.  Code that holds it may call
    :func:`register`, so it is taken before this module's own mutex."""
    _first.append(mutex)


def register(obj: Any) -> None:
    """Run ``obj``'s fork hooks at every ``os.fork()`` while ``obj`` lives."""
    global _counter
    with _mutex:
        _counter += 1
        _objects[_counter] = obj


def unregister(obj: Any) -> None:
    """Stop running ``obj``'s fork hooks (it released what they guard)."""
    with _mutex:
        for number, registered in list(_objects.items()):
            if registered is obj:
                del _objects[number]


def _before() -> None:
    for mutex in _first:
        mutex.acquire()
    _mutex.acquire()
    try:
        for _, obj in sorted(_objects.items()):
            obj._fork_before()
            _taken.append(obj)
    except BaseException:
        _after_parent()
        raise


def _after_parent() -> None:
    try:
        while _taken:
            _taken.pop()._fork_after_parent()
    finally:
        _mutex.release()
        for mutex in reversed(_first):
            mutex.release()


def _after_child() -> None:
    global _mutex
    try:
        while _taken:
            _taken.pop()._fork_after_child()
    finally:
        _mutex = threading.Lock()
        for mutex in reversed(_first):
            mutex.release()


_generation = 0


def install() -> None:
    """Register the hooks with ``os.register_at_fork`` (again).

    Python runs ``before`` hooks newest first.  A library whose own fork
    hook waits for its calls in flight to finish (filelock 4 does) must have
    registered *before* ours, or a thread inside a storage call could wait
    on that library while our hook waits on the thread.  So whoever imports
    such a library calls ``install()`` afterwards; the older registrations
    become no-ops.  The standard library's ``logging`` is one: its hook
    takes the logging lock, which a thread inside a storage call may need
    (to log) before it lets go of the mutex ours waits for, so it is
    imported above, before ours is registered.
    """
    global _generation
    if not hasattr(os, "register_at_fork"):
        return
    _generation += 1
    mine = _generation

    def before() -> None:
        if mine == _generation:
            _before()

    def after_in_parent() -> None:
        if mine == _generation:
            _after_parent()

    def after_in_child() -> None:
        if mine == _generation:
            _after_child()

    os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)


install()
