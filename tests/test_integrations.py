"""The framework integrations and examples, run through the real libraries, offline.

pyTelegramBotAPI dispatches real ``Update`` objects through its own threaded
worker pool; every Bot API request a handler makes is answered locally by
``apihelper.CUSTOM_REQUEST_SENDER`` (telebot's hook for replacing its HTTP
layer), so no test reaches the network.  ``process_new_updates`` itself never
calls the API (``get_me`` runs only when polling starts).  The Flask example
runs under gunicorn (or Werkzeug) on loopback.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from sessionkit import (
    MemoryStorage,
    MsgpackFileStorage,
    MultiSessions,
    Session,
    SessionError,
    SessionKeyError,
    Sessions,
)
from sessionkit.integrations.handler import with_session

from .webhook_server import ROOT, Server, free_port, request

_update_ids = itertools.count(1)


def require(module: str, package: str) -> Any:
    """Import ``module`` (from ``package``); skip the test without it, but fail under CI=1."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"{package} is not installed (python -m pip install -e '.[test]'): {exc}"
        if os.environ.get("CI") == "1":
            pytest.fail(f"{reason}; CI=1 runs every integration test")
        pytest.skip(reason)


def counts(sessions: Sessions, keys: Any) -> dict[Any, Any]:
    """Each key's stored ``count`` (0 when absent), read through the manager."""
    found = {}
    for key in keys:
        with sessions.open(key, timeout=5) as s:
            found[key] = (s.data or {}).get("count", 0)
    return found


# -- pyTelegramBotAPI --------------------------------------------------------


def user(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}


def message_json(chat_id: int, text: str, user_id: int | None = None) -> dict[str, Any]:
    kind = "private" if chat_id > 0 else "group"
    return {"message_id": next(_update_ids), "date": 1_700_000_000, "chat": {"id": chat_id, "type": kind},
            "from": user(chat_id if user_id is None else user_id), "text": text}


def message_update(chat_id: int, text: str, user_id: int | None = None) -> dict[str, Any]:
    return {"update_id": next(_update_ids), "message": message_json(chat_id, text, user_id)}


def callback_update(chat_id: int | None, data: str, user_id: int = 7) -> dict[str, Any]:
    query: dict[str, Any] = {"id": str(next(_update_ids)), "from": user(user_id),
                             "chat_instance": "ci", "data": data}
    if chat_id is None:
        query["inline_message_id"] = "inline-1"  # a button under an inline message: no chat
    else:
        query["message"] = message_json(chat_id, "question")
    return {"update_id": next(_update_ids), "callback_query": query}


def inline_update(user_id: int = 7) -> dict[str, Any]:
    return {"update_id": next(_update_ids),
            "inline_query": {"id": str(next(_update_ids)), "from": user(user_id), "query": "q", "offset": ""}}


@pytest.fixture
def telebot() -> Any:
    return require("telebot", "pyTelegramBotAPI")


@pytest.fixture
def api_calls(telebot: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Answer every Bot API request locally, as Telegram would, and record it."""
    from telebot import apihelper, util

    calls: list[tuple[str, dict[str, Any]]] = []

    def send(method: str, url: str, params: Any = None, **kwargs: Any) -> Any:
        name = url.rsplit("/", 1)[-1]
        params = dict(params or {})
        calls.append((name, params))
        result: Any = True
        if name in ("sendMessage", "editMessageText"):
            result = {**message_json(int(params["chat_id"]), str(params.get("text", ""))),
                      "from": {"id": 123, "is_bot": True, "first_name": "bot"}}
        elif name == "getMe":
            result = {"id": 123, "is_bot": True, "first_name": "bot", "username": "test_bot"}
        return util.CustomRequestResponse(json.dumps({"ok": True, "result": result}))

    monkeypatch.setattr(apihelper, "CUSTOM_REQUEST_SENDER", send)
    return calls


@pytest.fixture
def make_bot(telebot: Any, api_calls: Any) -> Iterator[Callable[..., Any]]:
    """Threaded TeleBots with class middlewares and a fake token; their worker pools end with the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        bot = telebot.TeleBot("123:abc", **{"threaded": True, "num_threads": 4, "use_class_middlewares": True,
                                           **options})
        made.append(bot)
        return bot

    yield make
    for bot in made:
        if bot.threaded:
            bot.worker_pool.close()  # workers notice within 0.5 s, all at once


def dispatch(bot: Any, updates: list[dict[str, Any]]) -> None:
    """Hand ``updates`` to telebot's real dispatcher."""
    from telebot.types import Update

    bot.process_new_updates([Update.de_json(u) for u in updates])


def drain(bot: Any, timeout: float = 30.0) -> None:
    """Wait until every task queued on the bot's worker pool has finished.

    The pool's queue has no ``join()`` (its workers never call
    ``task_done``), so queue one barrier task per worker after the updates:
    a worker takes a barrier task only after finishing its previous task,
    and cannot take a second one before all have arrived, so when the
    barrier opens every earlier task is done.
    """
    pool = bot.worker_pool
    barrier = threading.Barrier(pool.num_threads + 1)
    for _ in range(pool.num_threads):
        pool.put(barrier.wait, timeout)
    barrier.wait(timeout)
    assert not pool.exception_event.is_set(), f"a task failed in telebot's pool: {pool.exception_info!r}"


def test_middleware_counts_exactly_under_threaded_dispatch(make_bot: Any, tmp_path: Path) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    sessions = Sessions(MsgpackFileStorage(tmp_path / "s"), initial=dict)
    bot = make_bot()
    bot.setup_middleware(SessionMiddleware(sessions))

    @bot.message_handler(func=lambda message: True)
    def count(message: Any, session: Session) -> None:
        seen = session.get("count", 0)
        time.sleep(0.0002)  # widen the read-modify-write window
        session["count"] = seen + 1

    chats = [5, -1001234567890, 77]
    expected = dict.fromkeys((str(c) for c in chats), 0)
    batches: list[list[dict[str, Any]]] = []
    for t in range(6):
        for b in range(12):
            batch = [message_update(chats[(t + b + i) % 3], "hi") for i in range(5)]
            for u in batch:
                expected[str(u["message"]["chat"]["id"])] += 1
            batches.append(batch)

    def send(mine: list[list[dict[str, Any]]]) -> None:
        for batch in mine:
            dispatch(bot, batch)

    senders = [threading.Thread(target=send, args=(batches[t::6],)) for t in range(6)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(30)
    drain(bot)
    assert counts(sessions, expected) == expected
    assert sum(expected.values()) == 360


def test_a_handler_that_raises_writes_nothing(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    sessions = Sessions(MemoryStorage(), initial=dict)
    bot = make_bot()
    bot.setup_middleware(SessionMiddleware(sessions))
    failures: list[str] = []

    class Recorder:  # telebot's ExceptionHandler protocol: handle(exception) -> handled
        def handle(self, exception: Exception) -> bool:
            failures.append(str(exception))
            return True

    bot.exception_handler = Recorder()

    @bot.message_handler(func=lambda message: True)
    def handler(message: Any, session: Session) -> None:
        session["count"] = session.get("count", 0) + 1
        session.setdefault("log", []).append(message.text)
        if message.text == "boom":
            raise RuntimeError("boom")

    dispatch(bot, [message_update(1, "ok"), message_update(1, "boom"), message_update(2, "boom")])
    drain(bot)
    dispatch(bot, [message_update(1, "ok")])
    drain(bot)
    assert failures == ["boom", "boom"]
    with sessions.open(1, timeout=1) as s:  # unlocked, and only the clean updates are there
        assert s.data == {"count": 2, "log": ["ok", "ok"]}
    assert sessions.storage.read("2") is None


def recorder(seen: list[tuple[str, Any, str]]) -> Any:
    """A handler body that touches the session and notes (kind, key, what happened)."""

    def record(kind: str, session: Session) -> None:
        try:
            session["touched"] = True
            outcome = "stored"
        except SessionKeyError:
            outcome = "SessionKeyError"
        seen.append((kind, session.key, outcome))

    return record


def test_an_update_without_a_chat_has_no_session(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware, chat_key

    storage = MemoryStorage()
    sessions = Sessions(storage, initial=dict)
    bot = make_bot()
    bot.setup_middleware(SessionMiddleware(sessions))
    seen: list[tuple[str, Any, str]] = []
    record = recorder(seen)

    @bot.inline_handler(func=lambda query: True)
    def inline(query: Any, session: Session) -> None:
        record("inline", session)

    @bot.callback_query_handler(func=lambda call: True)
    def button(call: Any, session: Session) -> None:
        record("callback", session)

    dispatch(bot, [inline_update(), callback_update(None, "x"), callback_update(-42, "x")])
    drain(bot)
    assert sorted(seen, key=repr) == sorted([("inline", None, "SessionKeyError"),
                                             ("callback", None, "SessionKeyError"),
                                             ("callback", "-42", "stored")], key=repr)
    assert storage.read("-42") == {"touched": True}
    assert list(storage.keys()) == ["-42"]
    assert chat_key(object()) is None


def test_custom_key_function_and_the_managers_own_get_key(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    per_user = Sessions(MemoryStorage(), initial=dict)
    by_manager = Sessions(MemoryStorage(), initial=dict, get_key=lambda obj: f"u{obj.from_user.id}")
    bot = make_bot()
    bot.setup_middleware(SessionMiddleware(per_user, key=lambda obj: obj.from_user.id))
    bot.setup_middleware(SessionMiddleware(by_manager, name="profile"))

    @bot.message_handler(func=lambda message: True)
    def handler(message: Any, session: Session, profile: Session) -> None:
        session["count"] = session.get("count", 0) + 1
        profile["count"] = profile.get("count", 0) + 2

    group = -500
    dispatch(bot, [message_update(group, "hi", user_id=u) for u in (1, 2, 1, 1, 3, 2)])
    drain(bot)
    assert counts(per_user, ["1", "2", "3"]) == {"1": 3, "2": 2, "3": 1}
    assert {k: by_manager.storage.read(k) for k in ("u1", "u2", "u3")} == {
        "u1": {"count": 6}, "u2": {"count": 4}, "u3": {"count": 2}}
    assert per_user.storage.read(str(group)) is None
    with pytest.raises(ValueError, match="only one"):
        SessionMiddleware(by_manager, key=lambda obj: 1)


def test_handlers_reach_the_session_through_data_or_the_accessor(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    sessions = Sessions(MemoryStorage(), initial=dict)
    middleware = SessionMiddleware(sessions)
    bot = make_bot()
    bot.setup_middleware(middleware)

    @bot.message_handler(commands=["data"])
    def with_data(message: Any, data: dict[str, Any]) -> None:
        data["session"]["via_data"] = True

    @bot.message_handler(commands=["accessor"])
    def plain(message: Any) -> None:
        middleware.session_for(message)["via_accessor"] = True

    @bot.message_handler(commands=["bot"], pass_bot=True)
    def with_bot(message: Any, bot: Any, session: Session) -> None:
        session["via_bot"] = bot.token

    dispatch(bot, [message_update(9, "/data"), message_update(10, "/accessor"), message_update(11, "/bot")])
    drain(bot)
    assert sessions.storage.read("9") == {"via_data": True}
    assert sessions.storage.read("10") == {"via_accessor": True}
    assert sessions.storage.read("11") == {"via_bot": "123:abc"}
    with pytest.raises(SessionError, match="no session is open"):
        middleware.session_for(object())
    assert "session" in (SessionMiddleware.__init__.__doc__ or "")


class Recorder:
    """telebot's ExceptionHandler protocol: records what handlers raised and says it was handled."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []

    def handle(self, exception: Exception) -> bool:
        self.failures.append(exception)
        return True


def test_next_step_handlers_and_with_session_under_a_message_handler(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware, chat_key

    sessions = Sessions(MemoryStorage(), initial=dict)
    profiles = Sessions(MemoryStorage(), initial=dict)
    bot = make_bot()
    SessionMiddleware(sessions).install(bot)
    recorder = Recorder()
    bot.exception_handler = recorder

    @bot.message_handler(commands=["name"])
    def ask_name(message: Any, session: Session) -> None:
        session["asked"] = True
        bot.register_next_step_handler(message, got_name, "extra", step=2)  # the documented recipe

    @with_session(sessions, key=chat_key)
    def got_name(message: Any, extra: str, step: int, session: Session) -> None:
        session["name"] = [message.text, extra, step]

    @bot.message_handler(commands=["profile"])  # the middleware's session and another one
    @with_session(profiles, key=chat_key, name="profile")
    def both(message: Any, session: Session, profile: Session) -> None:
        session["seen"] = True
        profile["count"] = profile.get("count", 0) + 1

    @bot.message_handler(commands=["bot"], pass_bot=True)  # telebot also passes bot=
    @with_session(profiles, key=lambda message: message.chat.id, name="profile")
    def with_bot(message: Any, bot: Any, profile: Session) -> None:
        profile["bot"] = bot.token

    @bot.message_handler(commands=["kwargs"])
    @with_session(profiles, key=chat_key)
    def by_kwargs(message: Any, **kwargs: Any) -> None:
        kwargs["session"]["kwargs"] = sorted(kwargs)

    dispatch(bot, [message_update(1, "/name"), message_update(2, "/profile"), message_update(3, "/bot"),
                   message_update(4, "/kwargs")])
    drain(bot)
    dispatch(bot, [message_update(1, "Alice"), message_update(2, "/profile")])
    drain(bot)
    assert recorder.failures == []
    assert sessions.storage.read("1") == {"asked": True, "name": ["Alice", "extra", 2]}
    assert sessions.storage.read("2") == {"seen": True}
    assert profiles.storage.read("2") == {"count": 2}
    assert profiles.storage.read("3") == {"bot": "123:abc"}
    assert profiles.storage.read("4") == {"kwargs": ["session"]}
    assert not bot.next_step_backend.get_handlers(1)  # the next step ran once, and is gone
    assert chat_key(SimpleNamespace(chat=SimpleNamespace(id=5)), "x", step=2, session=None) == "5"

    @with_session(sessions, key=lambda a, b: a)
    def needs_two(a: Any, session: Session) -> None:
        pass

    with pytest.raises(TypeError, match="cannot take the handler's arguments"):
        needs_two(1)


def test_install_refuses_a_bot_that_runs_no_class_middlewares(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    sessions = Sessions(MemoryStorage(), initial=dict)
    plain = make_bot(use_class_middlewares=False)
    with pytest.raises(SessionError, match=r"use_class_middlewares=True"):
        SessionMiddleware(sessions).install(plain)

    bot = make_bot()
    middleware = SessionMiddleware(sessions)
    assert middleware.install(bot) is middleware
    with pytest.raises(SessionError, match="already installed"):
        middleware.install(bot)
    with pytest.raises(SessionError, match="another name="):
        SessionMiddleware(Sessions(MemoryStorage())).install(bot)
    profiles = Sessions(MemoryStorage(), initial=dict)
    SessionMiddleware(profiles, name="profile").install(bot)
    with pytest.raises(TypeError, match="TeleBot"):
        SessionMiddleware(sessions).install(object())

    @bot.message_handler(func=lambda message: True)
    def handler(message: Any, session: Session, profile: Session) -> None:
        session["n"] = profile["n"] = 1

    dispatch(bot, [message_update(6, "hi")])
    drain(bot)
    assert sessions.storage.read("6") == profiles.storage.read("6") == {"n": 1}

    from telebot.async_telebot import AsyncTeleBot

    with pytest.raises(SessionError, match="AsyncTeleBot"):
        SessionMiddleware(sessions).install(AsyncTeleBot("123:abc"))


def test_a_key_function_that_fails_for_updates_without_a_chat(make_bot: Any) -> None:
    from sessionkit.integrations.telebot import SessionMiddleware

    by_chat = Sessions(MemoryStorage(), initial=dict, get_key=lambda m: m.chat.id)  # no .chat: inline
    by_user = Sessions(MemoryStorage(), initial=dict)
    bot = make_bot(threaded=False)  # an exception from a middleware would escape process_new_updates
    SessionMiddleware(by_chat).install(bot)
    # messages only: an inline query or a callback query has no .text; "boom" is a bug in it
    SessionMiddleware(by_user, key=lambda obj: {"hi": obj.from_user.id}[obj.text], name="user").install(bot)
    seen: list[tuple[str, Any, str]] = []
    record = recorder(seen)

    @bot.inline_handler(func=lambda query: True)
    def inline(query: Any, session: Session, user: Session) -> None:
        record("inline", session)
        record("inline-user", user)

    @bot.callback_query_handler(func=lambda call: True)
    def button(call: Any, session: Session) -> None:
        record("callback", session)

    @bot.message_handler(func=lambda message: True)
    def message(message: Any, session: Session) -> None:
        record("message", session)

    dispatch(bot, [inline_update(), callback_update(None, "x"), message_update(-42, "hi")])
    assert sorted(seen, key=repr) == sorted([("inline", None, "SessionKeyError"),
                                             ("inline-user", None, "SessionKeyError"),
                                             ("callback", None, "SessionKeyError"),
                                             ("message", "-42", "stored")], key=repr)
    assert list(by_chat.storage.keys()) == ["-42"]
    assert list(by_user.storage.keys()) == []
    # an update with a chat: the key function's error is a bug, and it is not hidden
    with pytest.raises(KeyError, match="boom"):
        dispatch(bot, [message_update(-42, "boom")])
    assert len(seen) == 4
    with by_chat.open(SimpleNamespace(chat=SimpleNamespace(id=-42)), timeout=1) as s:  # nothing left locked
        assert s.data == {"touched": True}


def test_readme_bots_section_registers_with_install_and_sets_a_lock_timeout() -> None:
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    section = readme[readme.index("Bots and web servers\n"):readme.index("Deploying the disk backends\n")]
    assert "lock_timeout" in section and "SessionMiddleware(sessions).install(bot)" in section
    assert "setup_middleware(SessionMiddleware" not in section
    assert "register_next_step_handler" in section


def test_the_telebot_example_runs_offline(api_calls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    monkeypatch.setenv("SESSIONKIT_DIR", str(tmp_path / "bot-sessions"))
    example = load_example("telebot_counter_bot")
    try:
        bot = example.bot
        assert bot.threaded and bot.use_class_middlewares
        dispatch(bot, [message_update(1, "/start"), message_update(2, "/start")])
        drain(bot)
        hellos = [message_update(1 + i % 2, f"hello {i}") for i in range(40)]
        senders = [threading.Thread(target=dispatch, args=(bot, hellos[i::4])) for i in range(4)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(30)
        drain(bot)
        dispatch(bot, [message_update(1, "/quiz")])
        drain(bot)
        dispatch(bot, [callback_update(1, "quiz:0:4")])
        drain(bot)
        dispatch(bot, [callback_update(1, "quiz:0:4"), message_update(1, "/score"),
                       message_update(2, "/reset")])
        drain(bot)
        with caplog.at_level(logging.WARNING):
            inline_button = callback_update(None, "quiz:1:Paris")
            dispatch(bot, [inline_button])
            drain(bot)
        assert "this update has no session" not in caplog.text  # no bare SessionKeyError
        logged = [r.getMessage() for r in caplog.records if r.name == "counter_bot"]
        assert len(logged) == 1 and "answer: callback query" in logged[0]
        assert inline_button["callback_query"]["id"] in logged[0] and "inline message" in logged[0]
        assert example.sessions.lock_timeout == 10
        assert example.sessions.storage.read("1") == {"count": 20, "asked": 1, "score": 1}
        assert example.sessions.storage.read("2") is None
        replies = [p.get("text") for name, p in api_calls if name in ("sendMessage", "answerCallbackQuery")]
        assert "Right! Score: 1" in replies
        assert "That question is closed: /quiz asks a new one." in replies
        assert "Quiz buttons work in a chat with the bot: send /quiz there." in replies
        assert "20 messages, score 1" in replies
        assert "Message number 20 in this chat." in replies
        assert all(name in ("sendMessage", "answerCallbackQuery") for name, _ in api_calls)
    finally:
        example.bot.worker_pool.close()
        example.sessions.storage.close()


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` afresh, under a name of its own."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- with_session --------------------------------------------------------------


def test_decorator_counts_exactly_from_eight_threads(fast_switching: None) -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)

    @with_session(sessions, key=lambda update: update["chat"]["id"])
    def handle(update: dict[str, Any], session: Session) -> int:
        seen = session.get("count", 0)
        time.sleep(0)
        session["count"] = seen + 1
        return int(session["count"])

    chats = [1, 2, 3, 4]

    def work(t: int) -> None:
        for i in range(250):
            assert handle({"chat": {"id": chats[(t + i) % 4]}}) >= 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counts(sessions, chats) == dict.fromkeys(chats, 500)


def test_decorator_writes_nothing_when_the_handler_raises() -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)

    @with_session(sessions)
    def handle(chat_id: int, *, fail: bool, session: Session) -> None:
        session["count"] = session.get("count", 0) + 1
        session.setdefault("items", []).append(chat_id)
        if fail:
            raise LookupError("handler failed")

    handle(8, fail=False)
    with pytest.raises(LookupError, match="handler failed"):
        handle(8, fail=True)
    with sessions.open(8, timeout=1) as s:  # the lock was released
        assert s.data == {"count": 1, "items": [8]}


def test_decorator_key_comes_from_the_handlers_arguments() -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)

    @with_session(sessions, key=lambda *args, **kwargs: kwargs.get("user_id", args[0] if args else None),
                  name="state")
    def handle(user_id: int | None = None, state: Any = None) -> str | None:
        if state.key is not None:
            state["hits"] = state.get("hits", 0) + 1
        return str(state.key)

    assert handle(5) == "5"
    assert handle(user_id=5) == "5"
    assert handle() == "None"  # no key: the handler runs, the session is unusable
    assert sessions.storage.read("5") == {"hits": 2}
    assert list(inspect.signature(handle).parameters) == ["user_id"]  # what the caller passes
    assert handle.__name__ == "handle"
    with pytest.raises(TypeError, match="with_session passes it"):
        handle(5, state=1)

    by_object = Sessions(MemoryStorage(), initial=dict, get_key=lambda update: update["chat"]["id"])

    @with_session(by_object)  # default key: the first argument, mapped by get_key
    def first(update: dict[str, Any], session: Session) -> None:
        session["n"] = 1

    first({"chat": {"id": 12}})
    assert by_object.storage.read("12") == {"n": 1}
    with pytest.raises(TypeError, match="positional argument"):
        first(update={"chat": {"id": 12}})


def test_decorator_refuses_handlers_it_cannot_run(make_bot: Any) -> None:
    sessions = Sessions(MemoryStorage(), initial=dict)
    decorate = with_session(sessions)

    async def coroutine(update: Any, session: Session) -> None:
        session["n"] = 1

    async def async_generator(update: Any, session: Session) -> Any:
        yield session

    def generator(update: Any, session: Session) -> Any:
        yield session

    def no_session(update: Any) -> None:
        pass

    def positional_only(update: Any, session: Session, /) -> None:
        pass

    class AsyncCallable:
        async def __call__(self, update: Any, session: Session) -> None:
            pass

    for handler, message in [(coroutine, "async"), (async_generator, "async"), (AsyncCallable(), "async"),
                             (generator, "generator function"), (no_session, "no parameter 'session'"),
                             (positional_only, "positional-only"), (42, "decorates a function")]:
        with pytest.raises(TypeError, match=message):
            decorate(handler)
    def plain(update: Any, session: Session) -> None:
        pass

    with pytest.raises(TypeError, match="no parameter 'state'"):
        with_session(sessions, name="state")(plain)

    # what is accepted runs under telebot's dispatcher: the session by name, or in **kwargs
    bot = make_bot(use_class_middlewares=False)
    recorder = Recorder()
    bot.exception_handler = recorder

    @bot.message_handler(commands=["named"])
    @with_session(sessions, key=lambda message: message.chat.id)
    def named(message: Any, session: Session) -> None:
        session["named"] = True

    @bot.message_handler(commands=["kwargs"])
    @with_session(sessions, key=lambda message: message.chat.id)
    def by_kwargs(message: Any, **kwargs: Any) -> None:
        kwargs["session"]["kwargs"] = True

    dispatch(bot, [message_update(1, "/named"), message_update(2, "/kwargs")])
    drain(bot)
    assert recorder.failures == []
    assert sessions.storage.read("1") == {"named": True}
    assert sessions.storage.read("2") == {"kwargs": True}


def test_decorator_with_multi_sessions() -> None:
    multi = MultiSessions(prefs=Sessions(MemoryStorage(), initial=dict),
                          cart=Sessions(MemoryStorage(), initial=list))

    @with_session(multi, name="m")
    def handle(chat_id: int, m: Any) -> None:
        m.prefs["lang"] = "en"
        m.cart.data.append(chat_id)

    handle(3)
    assert multi.parts["prefs"].storage.read("3") == {"lang": "en"}
    assert multi.parts["cart"].storage.read("3") == [3]
    with pytest.raises(ValueError, match="eager"):
        with_session(multi, lazy=True)


# -- the Flask example under a real server ---------------------------------------


def test_the_flask_example_counts_exactly_across_worker_processes_and_restarts(tmp_path: Path) -> None:
    require("flask", "Flask")
    store_dir = tmp_path / "webhook-sessions"
    env = {"SESSIONKIT_DIR": str(store_dir), "WEBHOOK_SECRET": "s3cret"}
    chats = [11, -22, 33, 44]
    expected = dict.fromkeys(chats, 0)
    secret = {"X-Telegram-Bot-Api-Secret-Token": "s3cret"}

    def run_round(server: Server) -> None:
        errors: list[Any] = []

        def post(t: int) -> None:
            for i in range(20):
                chat = chats[(t + i) % len(chats)]
                update = message_update(chat, "hi") if i % 4 else callback_update(chat, "x")
                status = request(server.url + "/webhook", update, secret)[0]
                if status != 200:
                    errors.append(status)

        threads = [threading.Thread(target=post, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        for t in range(8):
            for i in range(20):
                expected[chats[(t + i) % len(chats)]] += 1
        assert request(server.url + "/webhook", inline_update(), secret)[0] == 200  # no chat: not counted
        assert request(server.url + "/webhook", message_update(11, "hi"))[0] == 403  # no secret: refused
        for chat in chats:
            status, body = request(f"{server.url}/chats/{chat}")
            assert (status, json.loads(body)) == (200, {"chat_id": chat, "count": expected[chat]})

    for _ in range(2):  # the second server carries on from the first one's counts
        server = make_server(tmp_path, env)
        try:
            server.start("/chats/0")
            run_round(server)
        finally:
            server.stop()
    assert server.proc is not None and server.proc.returncode is not None
    store = MsgpackFileStorage(store_dir)
    try:
        assert {c: (store.read(str(c)) or {}).get("count") for c in chats} == expected
        assert sum(expected.values()) == 320
    finally:
        store.close()


def test_the_flask_example_refuses_malformed_chat_ids(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    require("flask", "Flask")
    monkeypatch.setenv("SESSIONKIT_DIR", str(tmp_path / "webhook-sessions"))
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    example = load_example("flask_webhook")
    try:
        client = example.app.test_client()
        for bad in [True, False, 1.0, None, "abc", "1e3", "--5", [1], {"id": 1}]:
            update = message_update(1, "hi")
            update["message"]["chat"]["id"] = bad
            assert client.post("/webhook", json=update).status_code == 400, bad
            query = callback_update(1, "x")
            query["callback_query"]["message"]["chat"]["id"] = bad
            assert client.post("/webhook", json=query).status_code == 400, bad
        no_id = message_update(1, "hi")
        del no_id["message"]["chat"]["id"]
        assert client.post("/webhook", json=no_id).status_code == 400
        assert client.get("/chats/1").get_json() == {"chat_id": 1, "count": 0}  # true was not chat 1
        assert client.get("/chats/0").get_json() == {"chat_id": 0, "count": 0}
        as_text = message_update(1, "hi")
        as_text["message"]["chat"]["id"] = "-1001"
        for update in (message_update(-1001, "hi"), as_text, callback_update(-1001, "x"), inline_update()):
            assert client.post("/webhook", json=update).status_code == 200
        assert client.get("/chats/-1001").get_json() == {"chat_id": -1001, "count": 3}
        assert example.sessions.lock_timeout == 10
    finally:
        example.store.close()


def make_server(tmp_path: Path, env: dict[str, str]) -> Server:
    """gunicorn, 2 workers x 4 threads, when it is installed; else Werkzeug's threaded server."""
    port = free_port()
    log = tmp_path / "server.log"
    if importlib.util.find_spec("gunicorn") is not None and sys.platform != "win32":
        from gunicorn.config import KNOWN_SETTINGS

        argv = [sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}",
                "--graceful-timeout", "5"]
        if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
            argv.append("--no-control-socket")  # newer gunicorn would make one in ~/.gunicorn
        return Server([*argv, "examples.flask_webhook:app"], port, env, log)
    argv = [sys.executable, str(ROOT / "examples" / "flask_webhook.py")]
    return Server(argv, port, {**env, "HOST": "127.0.0.1", "PORT": str(port)}, log)
