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

The handler must be a plain (synchronous, non-generator) function that takes
the session as a keyword argument; anything else is refused with a
``TypeError`` when the decorator is applied, not at the first update.
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

    ``key``: called with the handler's own arguments, as many as it takes:
    positional arguments beyond its positional parameters, and keyword
    arguments it does not name, are left out, so ``key=lambda message:
    message.chat.id`` works when the framework also passes ``bot=``,
    ``session=`` (another middleware's) or a next-step handler's extra
    arguments; a key with ``*args``/``**kwargs`` gets them all.  It returns
    what ``sessions.open()`` takes: a key (``str`` or ``int``), ``None`` for
    "no session" (the handler still runs, and touching the session raises
    ``SessionKeyError``), or an object the manager's ``get_key`` maps.
    Default: the first positional argument.

    ``name``: the keyword argument the session is passed as (default
    ``"session"``).  The handler must have a parameter of that name that can
    be passed by keyword, or ``**kwargs``.  A call that already passes that
    keyword is a ``TypeError``.

    ``lazy``: for a ``Sessions``, lock and read only when the handler first
    touches the session (default: the manager's setting).  ``timeout``:
    seconds to wait for the key's lock before ``LockTimeout`` (default: the
    manager's ``lock_timeout``).

    The handler's return value is returned once the session is written
    back; if the handler raises, nothing is written and the lock is released.
    Decorating an ``async def`` function, a generator function or a handler
    without the session parameter raises ``TypeError`` at once: the first
    two would return before their body runs, after the session was written
    back and unlocked.
    """
    if not isinstance(sessions, (Sessions, MultiSessions)):
        raise TypeError(f"with_session needs a Sessions or a MultiSessions, not {type(sessions).__name__}")
    if key is not None and not callable(key):
        raise TypeError("key must be a callable taking the handler's arguments")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a valid keyword argument name, got {name!r}")
    if lazy and isinstance(sessions, MultiSessions):
        raise ValueError("multi-session parts are eager: lazy=True needs a Sessions")
    key_of: Callable[..., Any] = first_argument if key is None else _fitted(key)

    def decorate(handler: Callable[..., R]) -> Callable[..., R]:
        _check_handler(handler, name)

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


def _fitted(key: Callable[..., Any]) -> Callable[..., Any]:
    """``key``, called with as many of the handler's arguments as it takes.

    Extra positional arguments (beyond its positional parameters, unless it
    has ``*args``) and keyword arguments it does not name (unless it has
    ``**kwargs``) are dropped; a call it still cannot take is a
    ``TypeError`` that names the key and says what to do.
    """
    try:
        signature = inspect.signature(key)
    except (TypeError, ValueError):  # a builtin or other callable without one: pass everything
        return key
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return key  # takes anything
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    max_positional = None if inspect.Parameter.VAR_POSITIONAL in kinds else len(positional)
    named: set[str] | None = None
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        named = {p.name for p in signature.parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    label = getattr(key, "__qualname__", None) or repr(key)

    def call_key(*args: Any, **kwargs: Any) -> Any:
        if max_positional is not None:
            args = args[:max_positional]
        if named is not None:
            filled = positional[:len(args)]
            kwargs = {k: v for k, v in kwargs.items() if k in named and k not in filled}
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"with_session: key={label} cannot take the handler's arguments ({exc}); it gets "
                "the handler's positional arguments and the keyword arguments it names: give it "
                "parameters for them, or write it as key=lambda *args, **kwargs: ..."
            ) from None
        return key(*bound.args, **bound.kwargs)

    return call_key


def _check_handler(handler: Any, name: str) -> None:
    """Refuse, when decorating, a handler that ``with_session`` cannot run correctly."""
    if not callable(handler):
        raise TypeError(f"with_session decorates a function, not {type(handler).__name__}")
    label = getattr(handler, "__qualname__", None) or repr(handler)
    call = handler if inspect.isroutine(handler) or isinstance(handler, functools.partial) else getattr(
        type(handler), "__call__", handler)
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        raise TypeError(
            f"with_session cannot wrap {label}: it is async, so it would run after the session was "
            "written back and unlocked; with_session is for synchronous handlers"
        )
    if inspect.isgeneratorfunction(call):
        raise TypeError(
            f"with_session cannot wrap {label}: it is a generator function, so its body would run "
            "after the session was written back and unlocked; collect the results in a list instead"
        )
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # a builtin or other callable without one: cannot tell
        return
    parameter = signature.parameters.get(name)
    if parameter is None:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            return
        raise TypeError(
            f"with_session passes the session to {label} as {name}=..., but it has no parameter "
            f"{name!r} (nor **kwargs): add one, e.g. def {getattr(handler, '__name__', 'handler')}"
            f"(update, {name}), or choose the keyword with with_session(..., name=...)"
        )
    if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
        raise TypeError(
            f"with_session passes the session to {label} as {name}=..., but its parameter {name!r} "
            "is positional-only: move it after the '/'"
        )
    if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        raise TypeError(f"with_session passes the session as {name}=..., but {label} has *{name}")


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
