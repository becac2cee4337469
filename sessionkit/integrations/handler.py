"""``with_session``: open a session around any handler and pass it in.

::

    from sessionkit import Sessions, MemoryStorage
    from sessionkit.integrations.handler import with_session

    sessions = Sessions(MemoryStorage(), initial=dict)

    @with_session(sessions, key=lambda update: update["chat"]["id"])
    def on_update(update, session):
        session["count"] = session.get("count", 0) + 1

The framework calls ``on_update(update)``; the decorator derives the key from
the same arguments, locks and reads the session, calls the handler with the
session as a keyword argument, and writes it back when the handler returns.
If the handler raises, nothing is written and the exception propagates.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar, Union

from ..manager import MultiSessions, Sessions

__all__ = ["with_session", "first_argument"]

R = TypeVar("R")
SessionsLike = Union[Sessions, MultiSessions]


def first_argument(*args: Any, **kwargs: Any) -> Any:
    """The default key function: the handler's first positional argument.

    What it returns goes to ``sessions.open()``, so the manager's own
    ``get_key`` (if any) still maps it, e.g. from an update object to a chat id.
    """
    if not args:
        raise TypeError(
            "with_session: the handler was called without a positional argument, so the "
            "default key (the first argument) is missing; pass key=lambda *args, **kwargs: ..."
        )
    return args[0]


def with_session(
    sessions: SessionsLike,
    *,
    key: Callable[..., Any] | None = None,
    name: str = "session",
    lazy: bool | None = None,
    timeout: float | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a handler so that it runs inside ``with sessions.open(...)``.

    ``sessions``: a ``Sessions`` (the handler gets a ``Session``) or a
    ``MultiSessions`` (the handler gets a ``MultiSession``).

    ``key``: called with the handler's own arguments (``key(*args,
    **kwargs)``) and returns what ``sessions.open()`` takes: a key (``str``
    or ``int``), ``None`` for "no session" (the handler still runs, and
    touching the session raises ``SessionKeyError``), or an object the
    manager's ``get_key`` maps.  Default: the first positional argument.

    ``name``: the keyword argument the session is passed as (default
    ``"session"``).  A call that already passes that keyword is a
    ``TypeError``.

    ``lazy``: for a ``Sessions``, lock and read only when the handler first
    touches the session (default: the manager's setting).  ``timeout``:
    seconds to wait for the key's lock before ``LockTimeout`` (default: the
    manager's ``lock_timeout``).

    The handler's return value is returned once the session is written
    back; if the handler raises, nothing is written and the lock is released.
    """
    if not isinstance(sessions, (Sessions, MultiSessions)):
        raise TypeError(f"with_session needs a Sessions or a MultiSessions, not {type(sessions).__name__}")
    if key is not None and not callable(key):
        raise TypeError("key must be a callable taking the handler's arguments")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a valid keyword argument name, got {name!r}")
    if lazy and isinstance(sessions, MultiSessions):
        raise ValueError("multi-session parts are eager: lazy=True needs a Sessions")
    key_of: Callable[..., Any] = first_argument if key is None else key

    def decorate(handler: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(handler)
        def run_with_session(*args: Any, **kwargs: Any) -> R:
            if name in kwargs:
                raise TypeError(
                    f"{handler.__qualname__}() got {name!r} from its caller; with_session passes it"
                )
            target = key_of(*args, **kwargs)
            handle: Any
            if isinstance(sessions, MultiSessions):
                handle = sessions.open(target, timeout=timeout)
            else:
                handle = sessions.open(target, lazy=lazy, timeout=timeout)
            with handle as session:
                kwargs[name] = session
                return handler(*args, **kwargs)

        _hide_parameter(run_with_session, handler, name)
        return run_with_session

    return decorate


def _hide_parameter(wrapper: Callable[..., Any], handler: Callable[..., Any], name: str) -> None:
    """Give ``wrapper`` the handler's signature without the injected parameter.

    Frameworks that look at a handler's parameters (pyTelegramBotAPI passes
    only what the signature asks for) then see what the caller must supply.
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # a builtin or other callable without one
        return
    if name in signature.parameters:
        kept = [p for p in signature.parameters.values() if p.name != name]
        setattr(wrapper, "__signature__", signature.replace(parameters=kept))
