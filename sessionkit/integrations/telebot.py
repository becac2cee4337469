"""pyTelegramBotAPI: a class-based middleware that gives every handler its session.

::

    import telebot
    from sessionkit import MsgpackFileStorage, Sessions
    from sessionkit.integrations.telebot import SessionMiddleware

    # once per process; lock_timeout: a slow handler cannot hold up its chat's other updates for ever
    sessions = Sessions(MsgpackFileStorage("./sessions"), initial=dict, lock_timeout=10)
    bot = telebot.TeleBot(token, use_class_middlewares=True)
    SessionMiddleware(sessions).install(bot)  # raises if class middlewares are off

    @bot.message_handler(commands=["count"])
    def count(message, session):  # telebot passes data["session"] by name
        session["count"] = session.get("count", 0) + 1
        bot.reply_to(message, str(session["count"]))

The key is grammY's default: the id of the update's chat, as a ``str``
(``None`` for updates without a chat, such as inline queries: the handler
still runs, and touching its session raises ``SessionKeyError``).  The
session is written back after the handler returns; if the handler raises,
nothing is written.

Next-step and reply handlers bypass class middlewares; decorate them with
``with_session`` and ``chat_key``, which ignores the extra arguments
``register_next_step_handler`` passes on::

    from sessionkit.integrations.handler import with_session
    from sessionkit.integrations.telebot import chat_key

    @with_session(sessions, key=chat_key)
    def got_name(message, extra, step, session):
        session["name"] = message.text

    bot.register_next_step_handler(message, got_name, "extra", step=2)

This module imports pyTelegramBotAPI (``pip install 'sessionkit[telebot]'``);
``import sessionkit`` does not.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Optional, Union

from telebot import util as _telebot_util
from telebot.handler_backends import BaseMiddleware

from ..errors import SessionError
from ..manager import Sessions, _check_timeout
from ..session import Session

__all__ = ["SessionMiddleware", "chat_key", "UPDATE_TYPES"]

log = logging.getLogger(__name__)

#: Every update type pyTelegramBotAPI runs class middlewares for.  (Its
#: dispatcher calls chosen inline results ``"chosen_inline_query"``, while
#: ``telebot.util.update_types`` spells them ``"chosen_inline_result"``.)
_LISTED: list[str] = list(getattr(_telebot_util, "update_types", ["message", "callback_query"]))
UPDATE_TYPES: tuple[str, ...] = tuple(dict.fromkeys([*_LISTED, "chosen_inline_query"]))

KeyFunction = Callable[[Any], Union[str, int, None]]


def chat_key(update: Any, *args: Any, **kwargs: Any) -> Optional[str]:
    """grammY's default session key: the id of the update's chat, as a ``str``.

    ``update`` is what a telebot handler receives: a ``Message`` (its
    ``chat``), a ``CallbackQuery`` (the chat of its ``message``), a
    ``ChatMemberUpdated``, ``ChatJoinRequest``, ``MessageReactionUpdated``
    and so on (their ``chat``).  Returns ``None`` when there is no chat
    (inline queries, polls, a callback query from an inline message).

    Any further arguments are ignored, so ``with_session(sessions,
    key=chat_key)`` works on any handler whose first argument is the update:
    a next-step handler registered with extra arguments, or a message
    handler that telebot also passes ``bot=`` or ``session=``.
    """
    chat = getattr(update, "chat", None)
    if chat is None:
        chat = getattr(getattr(update, "message", None), "chat", None)
    chat_id = getattr(chat, "id", None)
    return None if chat_id is None else str(chat_id)


class SessionMiddleware(BaseMiddleware):
    """Opens each update's session before its handler and writes it back after.

    Use it with ``TeleBot(token, use_class_middlewares=True)`` and
    ``SessionMiddleware(sessions).install(bot)``, which raises when the bot
    cannot run class middlewares (``bot.setup_middleware`` would only log
    that, and every handler would then miss its ``session`` argument).  A
    handler gets the session by naming a parameter after ``name`` (``def h(message,
    session)``), from ``data[name]`` if it takes ``data``, or by calling
    ``middleware.session_for(message)``.

    The session is opened lazily: its key is locked and its value read when
    the handler first touches it, and written back (if it changed) and
    unlocked after the handler, in ``post_process``.  A handler that raises
    writes nothing.  Lazy opening is what makes this safe inside telebot's
    dispatcher, which skips ``post_process`` when a later middleware cancels
    the update or raises in ``pre_process``: no lock is held until the
    handler runs, and once it runs ``post_process`` always follows.  (Touch
    the session in another middleware's ``pre_process`` only if that
    middleware cannot cancel or fail afterwards.)

    The key function (``key=``, or the manager's ``get_key``) sees every
    update type in ``update_types``, not only messages.  When it raises for
    an update without a chat (an inline query, a poll, a callback query
    from an inline message: ``chat_key`` gives ``None``), that update has no
    session, as if it had returned ``None``; when it raises for an update
    with a chat, the exception propagates (a bug in it is not hidden).

    Next-step and reply handlers (``register_next_step_handler``) bypass
    class middlewares in telebot; decorate them with
    ``sessionkit.integrations.handler.with_session(sessions, key=chat_key)``.
    """

    update_sensitive: bool = False

    def __init__(
        self,
        sessions: Sessions,
        *,
        key: KeyFunction | None = None,
        name: str = "session",
        update_types: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Build the middleware.

        ``sessions``: the ``Sessions`` manager, built once per process.
        ``key``: maps the handler's object (a ``Message``, ``CallbackQuery``
        ...) to a session key (``str``/``int``) or ``None`` for no session;
        default ``chat_key``, unless ``sessions`` has its own ``get_key``,
        which then gets the object itself (give one or the other).
        ``name``: the ``data`` entry, and the handler parameter, the session
        is passed as.  ``update_types``: the update types to open sessions
        for (default: all, ``UPDATE_TYPES``).  ``timeout``: seconds to wait
        for a key's lock before ``LockTimeout`` (default: the manager's
        ``lock_timeout``).
        """
        super().__init__()
        if not isinstance(sessions, Sessions):
            raise TypeError(
                f"SessionMiddleware needs a Sessions, not {type(sessions).__name__}; for a "
                "MultiSessions, decorate handlers with sessionkit.integrations.handler.with_session"
            )
        if key is not None and not callable(key):
            raise TypeError("key must be a callable: update object -> str | int | None")
        own_get_key = getattr(sessions, "_get_key", None)
        if key is not None and own_get_key is not None:
            raise ValueError("both key= and the Sessions' get_key= derive the key: give only one")
        if not isinstance(name, str) or not name.isidentifier() or name in ("data", "bot"):
            raise ValueError(f"name must be an identifier other than 'data' and 'bot', got {name!r}")
        _check_timeout(timeout, "timeout")
        self.sessions = sessions
        self.name = name
        self.timeout = timeout
        self.update_types = list(UPDATE_TYPES if update_types is None else update_types)
        # None: hand the object to sessions.open(), whose get_key maps it
        self._key: KeyFunction | None = None if own_get_key is not None else (key or chat_key)
        self._slot = f"sessionkit:{name}"  # our own data entry: never a parameter name
        self._by_object: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        return f"SessionMiddleware({self.sessions!r}, name={self.name!r})"

    def install(self, bot: Any) -> SessionMiddleware:
        """Register this middleware on ``bot``, or raise if it would never run; returns ``self``.

        ``bot``: a ``telebot.TeleBot`` made with ``use_class_middlewares=True``.
        Raises ``SessionError`` when the bot runs no class middlewares (made
        without that flag, or an ``AsyncTeleBot``, whose middlewares are
        async), or already has a ``SessionMiddleware`` passing a session as
        ``name``.  Use it instead of ``bot.setup_middleware(middleware)``,
        which only logs the first problem and lets every handler with a
        ``session`` parameter fail on a missing argument.
        """
        if not callable(getattr(bot, "setup_middleware", None)):
            raise TypeError(f"install() needs a telebot.TeleBot, not {type(bot).__name__}")
        if not hasattr(bot, "use_class_middlewares"):  # AsyncTeleBot: its middlewares are coroutines
            raise SessionError(
                f"SessionMiddleware runs under telebot.TeleBot(token, use_class_middlewares=True), not "
                f"{type(bot).__name__}: for an AsyncTeleBot, open sessions in the handlers"
            )
        if not bot.use_class_middlewares:
            raise SessionError(
                "this bot runs no class middlewares, so SessionMiddleware would never run and every "
                "handler with a session parameter would fail: make the bot with "
                "telebot.TeleBot(token, use_class_middlewares=True)"
            )
        for other in getattr(bot, "middlewares", None) or ():
            if other is self:
                raise SessionError("this SessionMiddleware is already installed on this bot")
            if isinstance(other, SessionMiddleware) and other.name == self.name:
                raise SessionError(
                    f"this bot already has a SessionMiddleware passing {self.name!r}: give the second "
                    "one another name=, e.g. SessionMiddleware(profiles, name='profile')"
                )
        bot.setup_middleware(self)
        if self not in (getattr(bot, "middlewares", None) or ()):
            raise SessionError("telebot did not register the middleware (see its log for why)")
        return self

    def _open(self, message: Any) -> Session:
        """The (lazy, not yet entered) session handle for ``message``."""
        try:
            target = message if self._key is None else self._key(message)
            return self.sessions.open(target, lazy=True, timeout=self.timeout)
        except Exception as exc:
            if chat_key(message) is not None:
                raise
            log.debug("SessionMiddleware: the key function failed for a %s without a chat (%r): "
                      "no session", type(message).__name__, exc)
            return Session(self.sessions, None, timeout=self.timeout, lazy=True)

    def pre_process(self, message: Any, data: dict[str, Any]) -> None:
        """Open ``message``'s session (lazily) and put it in ``data[name]``.

        ``message``: the update's object (a ``Message``, ``CallbackQuery``
        ...).  ``data``: telebot's per-update dict, passed on to handlers.
        """
        handle = self._open(message)
        handle.__enter__()  # lazy: nothing is locked or read yet
        data[self.name] = handle
        data[self._slot] = handle
        try:
            with self._guard:
                self._by_object[message] = handle
        except TypeError:  # an object that cannot be weakly referenced: data[name] still works
            pass

    def post_process(self, message: Any, data: dict[str, Any], exception: BaseException | None) -> None:
        """Close ``message``'s session: write it back, or nothing if the handler raised.

        ``exception``: what the handler raised, or ``None`` (telebot passes
        it here after catching it).  An error while writing (``StorageError``,
        ``SerializationError``) propagates to telebot.
        """
        handle = data.pop(self._slot, None)
        try:
            with self._guard:
                self._by_object.pop(message, None)
        except TypeError:
            pass
        if handle is None:
            return
        if exception is None:
            handle.__exit__(None, None, None)
        else:
            handle.__exit__(type(exception), exception, exception.__traceback__)

    def session_for(self, message: Any) -> Session:
        """The session opened for ``message``, the object a handler received.

        For handlers that do not take the session as a parameter.  Raises
        ``SessionError`` when no session is open for it (the update type is
        not in ``update_types``, or its handler has finished).
        """
        try:
            with self._guard:
                handle = self._by_object.get(message)
        except TypeError:  # an object that cannot be weakly referenced was never registered
            handle = None
        if handle is None:
            raise SessionError(
                f"no session is open for this {type(message).__name__}: call session_for() inside a "
                "handler, for an update type in the middleware's update_types"
            )
        return handle
