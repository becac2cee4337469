"""Ready-made glue between sessionkit and the frameworks bots are written with.

- ``sessionkit.integrations.handler``: ``with_session``, a decorator that
  opens a session around any handler call (Flask views, next-step handlers,
  plain functions).  It needs nothing beyond sessionkit.
- ``sessionkit.integrations.telebot``: ``SessionMiddleware``, a class-based
  middleware for pyTelegramBotAPI (``pip install 'sessionkit[telebot]'``).

Nothing here is imported by ``import sessionkit``; each module imports its
framework only when it is imported itself.
"""
