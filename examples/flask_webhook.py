"""A threaded Flask webhook server that counts Telegram updates per chat.

``POST /webhook`` takes a Telegram update (JSON) and counts it in its chat's
session; ``GET /chats/<chat_id>`` returns ``{"chat_id": ..., "count": ...}``.
The sessions live in a ``MsgpackFileStorage`` directory, so several worker
processes with several threads each share them safely, and a restart keeps
every count.

Run it::

    pip install 'sessionkit[flask]' gunicorn
    SESSIONKIT_DIR=./webhook-sessions gunicorn -w 2 --threads 4 -b 127.0.0.1:8000 examples.flask_webhook:app
    # or Werkzeug's threaded server, for development:
    SESSIONKIT_DIR=./webhook-sessions PORT=8000 python examples/flask_webhook.py

Environment: ``SESSIONKIT_DIR`` (default ``./webhook-sessions``),
``WEBHOOK_SECRET`` (optional: the ``secret_token`` given to ``setWebhook``;
requests without it in ``X-Telegram-Bot-Api-Secret-Token`` are refused),
and for the Werkzeug server ``HOST``/``PORT`` (default ``127.0.0.1:8000``).
"""

from __future__ import annotations

import hmac
import os
import re
from typing import Any, Optional

from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue

from sessionkit import MsgpackFileStorage, Session, Sessions
from sessionkit.integrations.handler import with_session

SESSIONS_DIR = os.environ.get("SESSIONKIT_DIR", "./webhook-sessions")
WEBHOOK_SECRET = os.environ.get("WEBHOOK_SECRET", "")

# Built once per process (gunicorn imports this module once in each worker);
# all of the process's threads share it.  lock_timeout: a request waits at
# most 10 s for its chat's session, then fails (500, and Telegram delivers the
# update again later) instead of tying up a worker thread behind a slow one.
store = MsgpackFileStorage(SESSIONS_DIR)
sessions = Sessions(store, initial=dict, lock_timeout=10)

app = Flask(__name__)


class BadUpdate(ValueError):
    """The update's chat is malformed: the webhook answers 400 and counts nothing."""


def update_chat_id(update: dict[str, Any]) -> Optional[int]:
    """The chat an update belongs to (grammY's ``ctx.chat``), or ``None``.

    A message-like update carries ``chat``; a callback query carries it in
    its ``message``; inline queries, polls and the like have none.  A chat
    whose ``id`` is not an integer (an ``int``, or a ``str`` of one; never a
    ``bool``, which JSON's ``true`` becomes) raises ``BadUpdate``.
    """
    for field, value in update.items():
        if field == "update_id" or not isinstance(value, dict):
            continue
        if "chat" in value:
            chat = value["chat"]
        else:
            message = value.get("message")
            chat = message.get("chat") if isinstance(message, dict) else None
        if chat is None:
            continue
        chat_id = chat.get("id") if isinstance(chat, dict) else None
        if isinstance(chat_id, str) and re.fullmatch(r"-?[0-9]{1,19}", chat_id):
            return int(chat_id)
        if type(chat_id) is not int:  # bool is an int subclass: {"id": true} is no chat 1
            raise BadUpdate(f"{field}.chat.id must be an integer, got {type(chat_id).__name__}")
        return chat_id
    return None


@with_session(sessions, key=update_chat_id)
def count_update(update: dict[str, Any], session: Session) -> None:
    """Count ``update`` in its chat's session (an update without a chat is not counted)."""
    if session.key is None:
        return
    session["count"] = session.get("count", 0) + 1


@app.post("/webhook")
def webhook() -> ResponseReturnValue:
    """Telegram's webhook: one update per request; any 2xx acknowledges it."""
    if WEBHOOK_SECRET:
        given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not hmac.compare_digest(given.encode(), WEBHOOK_SECRET.encode()):
            abort(403)
    update = request.get_json(silent=True)
    if not isinstance(update, dict):
        abort(400)
    try:
        count_update(update)  # its key, update_chat_id(update), raises BadUpdate before any lock
    except BadUpdate:
        abort(400)
    return "", 200


@app.get("/chats/<int(signed=True):chat_id>")
def chat_count(chat_id: int) -> ResponseReturnValue:
    """A chat's count.  One storage read is atomic, so a read-only view takes no lock."""
    key = sessions.resolve_key(chat_id)  # the key sessions.open(chat_id) uses
    value = (store.read(key) if key is not None else None) or {}
    return jsonify(chat_id=chat_id, count=value.get("count", 0))


if __name__ == "__main__":
    app.run(host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")), threaded=True)
