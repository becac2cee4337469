"""A counter and quiz bot for pyTelegramBotAPI, with per-chat sessions on disk.

Run it::

    pip install 'sessionkit[telebot]'
    TELEGRAM_BOT_TOKEN=123456:ABC... python examples/telebot_counter_bot.py

Environment: ``TELEGRAM_BOT_TOKEN`` (required, from @BotFather) and
``SESSIONKIT_DIR`` (where the sessions live, default ``./bot-sessions``).
Restart the bot and every chat keeps its count and score.

Commands: ``/start``, ``/quiz`` (a question with answer buttons), ``/score``,
``/reset``; any other text message is counted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import telebot
from telebot.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message

from sessionkit import MsgpackFileStorage, Session, Sessions
from sessionkit.integrations.telebot import SessionMiddleware

TOKEN = os.environ.get("TELEGRAM_BOT_TOKEN", "")
if not TOKEN:
    raise SystemExit("set TELEGRAM_BOT_TOKEN to the token @BotFather gave you")
SESSIONS_DIR = os.environ.get("SESSIONKIT_DIR", "./bot-sessions")

log = logging.getLogger("counter_bot")

# Built once per process: every worker thread of the bot shares this storage,
# and a session unused for 30 days expires.  lock_timeout: an update waits at
# most 10 s for its chat's session (then LockTimeout, logged by telebot), so
# one slow handler cannot tie up all four workers with its chat's updates.
sessions = Sessions(MsgpackFileStorage(SESSIONS_DIR, ttl=30 * 24 * 3600), initial=dict, lock_timeout=10)

bot = telebot.TeleBot(TOKEN, threaded=True, num_threads=4, use_class_middlewares=True)
SessionMiddleware(sessions).install(bot)  # raises if the bot cannot run class middlewares

# (question, options, right answer)
QUESTIONS: list[tuple[str, list[str], str]] = [
    ("2 + 2 = ?", ["3", "4", "5"], "4"),
    ("The capital of France?", ["Paris", "Rome", "Madrid"], "Paris"),
    ("How many days has a leap year?", ["365", "366", "364"], "366"),
]


@bot.message_handler(commands=["start"])
def start(message: Message, session: Session) -> None:
    """Greet the chat; a chat seen before is welcomed back."""
    if session.get("count"):
        text = f"Welcome back! {session['count']} messages so far, score {session.get('score', 0)}."
    else:
        text = "Hi! I count your messages. Try /quiz, /score and /reset."
    bot.reply_to(message, text)


@bot.message_handler(commands=["quiz"])
def quiz(message: Message, session: Session) -> None:
    """Ask the chat's next question, with one button per option."""
    index = session.get("asked", 0) % len(QUESTIONS)
    question, options, _ = QUESTIONS[index]
    session["asked"] = index + 1
    session["open_question"] = index  # only this question's buttons count
    markup = InlineKeyboardMarkup()
    markup.row(*(InlineKeyboardButton(o, callback_data=f"quiz:{index}:{o}") for o in options))
    bot.send_message(message.chat.id, question, reply_markup=markup)


@bot.callback_query_handler(func=lambda call: (call.data or "").startswith("quiz:"))
def answer(call: CallbackQuery, session: Session) -> None:
    """Score an answer button, once per question asked."""
    if session.key is None:  # a button under an inline message: it belongs to no chat
        log.warning("answer: callback query %s (data %r) from user %s came from an inline message, "
                    "which has no chat and so no session; ignored", call.id, call.data, call.from_user.id)
        bot.answer_callback_query(call.id, "Quiz buttons work in a chat with the bot: send /quiz there.")
        return
    _, index_text, option = (call.data or "").split(":", 2)
    index = int(index_text)
    if session.get("open_question") != index:
        bot.answer_callback_query(call.id, "That question is closed: /quiz asks a new one.")
        return
    del session["open_question"]
    right = QUESTIONS[index][2]
    if option == right:
        session["score"] = session.get("score", 0) + 1
        bot.answer_callback_query(call.id, f"Right! Score: {session['score']}")
    else:
        bot.answer_callback_query(call.id, f"No, it is {right}. Score: {session.get('score', 0)}")


@bot.message_handler(commands=["score"])
def score(message: Message, session: Session) -> None:
    """Show the chat's count and quiz score."""
    bot.reply_to(message, f"{session.get('count', 0)} messages, score {session.get('score', 0)}")


@bot.message_handler(commands=["reset"])
def reset(message: Message, session: Session) -> None:
    """Forget everything about the chat."""
    session.delete()
    bot.reply_to(message, "Forgotten.")


@bot.message_handler(func=lambda message: True, content_types=["text"])
def count(message: Message, session: Session) -> Any:
    """Count every other text message."""
    session["count"] = session.get("count", 0) + 1
    bot.reply_to(message, f"Message number {session['count']} in this chat.")


if __name__ == "__main__":
    bot.infinity_polling()
