"""Model-based tests: random runs of sessions on every backend, checked against a dict.

Hypothesis drives :class:`StoreMachine` through random sequences of steps on
one store:

* a session on one storage object: nested edits (dicts and lists inside the
  value), top-level edits through the handle's mapping methods, assignment of
  a whole value, ``s.delete()``, plain reads; eager or lazy, through a
  ``Sessions`` with a prefix, without one, or with ``write_unchanged=True``;
* the same with the block raising at the end: nothing may be written;
* one session open while a second one (another key, maybe on the other
  storage object) runs inside it;
* the clock moving past the ``ttl``, and ``purge_expired()``;
* closing a storage object and opening a new one on the same store (a
  restart), with the path spelled another way;
* a second storage object on the same store, used in turn with the first;
* a second process (tests/model_worker.py, fed commands over a pipe) running
  sessions on the store and listing it.

After every step the store must hold exactly what a plain dict says: every
key reads back its value (compared with types, dict order and the sign of
zero, so ``1`` is not ``True`` and ``0.0`` is not ``-0.0``), ``has()`` agrees,
and ``keys()`` and ``items()`` list exactly the dict's keys.

Each backend of ``conftest.BACKENDS`` runs the machine on a fresh store per
example (a new temporary directory, or a new prefix on the session's Redis
server and cluster).  What a backend cannot do is left out for it:
``MemoryStorage`` lives inside one object, so it has no reopening, no second
storage object and no second process; only the disk backends have
``purge_expired()``; and Redis expires keys on the server's own clock, which
a ``FakeClock`` cannot move, so Redis runs never move the clock (most of their
examples give the storage a ``ttl`` so long that no run reaches it, which
still sends every write down the expiring path).  The worker process reads
the test's fake clock, sent with each command, as processes on one machine
share a clock.

Values are what every backend accepts (msgpack's types: ``None``, ``bool``,
64-bit ``int``, ``float``, ``str``, ``bytes``, lists, and dicts with ``str``
keys); NaN is left out because it never equals itself.

Runs are short by default so the suite stays fast.  ``SESSIONKIT_MODEL_EXAMPLES=N``
runs ``N`` examples per backend instead, e.g. for a long run::

    SESSIONKIT_MODEL_EXAMPLES=2000 python -m pytest tests/test_model.py
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sessionkit import Sessions

from . import model_worker
from .conftest import BACKENDS, REAL_CLOCK, SHELVE_DBM, redis_client
from .helpers import stressed
from .helpers import FakeClock
from .model_worker import Planned, apply_steps, open_spec

# Hypothesis keeps caches (of this code's constants, of Unicode tables) in a
# directory of its own: not in the checkout, unless someone asks for it.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "sessionkit-hypothesis")
)

# Examples per backend by default: more where an example is cheap (about
# 30 s of CPU for the whole file; a quarter of that in the reruns under the
# other Pythons, see tests/helpers.STRESS).
EXAMPLES = {"memory": 80, "msgpack": 40, "shelve": 40, "redis": 30, "redis-cluster": 20}
STEPS = 25


def model_settings(kind: str) -> settings:
    """Hypothesis' settings for ``kind``'s run (``SESSIONKIT_MODEL_EXAMPLES`` overrides the count)."""
    return settings(
        max_examples=int(os.environ.get("SESSIONKIT_MODEL_EXAMPLES") or 0) or int(stressed(EXAMPLES[kind], 10)),
        stateful_step_count=STEPS,
        deadline=None,
        database=None,  # nothing written into the checkout
        print_blob=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" pass on a failure
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# The fake clock moves by whole seconds and sessions live 100.5 s, so no
# check ever falls on the very moment a session expires.
TTL = 100.5
TICKS = [1, 30, 60, 99, 101, 250]
WAITS = [0, 0, 0, 30, 60, 99]  # before a session: mostly none
LONG_TTL = 3600.0  # Redis: never reached by a run

_prefixes = itertools.count()

# -- what sessions hold -----------------------------------------------------------

# Characters drawn from an explicit alphabet: every code point but the
# surrogates, with the awkward ones made likely.
_CHARS = st.one_of(
    st.sampled_from(list("aZ09 _-.:/\\{}*?[]\x00\n\t\x7f\xe9\xf1\xdf")),
    st.sampled_from(list("\u0301\u200b\u2028\ufeff\u043a\u65e5\U0001f511")),
    st.integers(0, 0x10FFFF).filter(lambda c: not 0xD800 <= c <= 0xDFFF).map(chr),
)
TEXT = st.text(alphabet=_CHARS, max_size=8)
FIELDS = st.text(alphabet=_CHARS, max_size=5)  # dict keys inside a value

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    TEXT,
    st.binary(max_size=8),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(FIELDS, inner, max_size=3)),
    max_leaves=6,
)
ROOTS = st.dictionaries(FIELDS, VALUES, max_size=3)  # what a session usually holds

# Session keys: empty, unicode in both normal forms, NUL, Redis hash tags and
# glob characters, path-like, a lone surrogate, long; ints (42 is "42").
AWKWARD_KEYS: list[Any] = [
    "", "42", 42, -7, 2**64, "ключ", "日本語", "🔑", "\u00e9", "e\u0301", "a\x00b", " \n\t",
    "{tag}a", "{tag}b", "a}b", "x{}y", "*?[a]\\", "../x", "/", "\udc80", "k" * 3000,
]
KEYS = st.one_of(st.sampled_from(AWKWARD_KEYS), TEXT, st.integers(min_value=-(2**63), max_value=2**64))

# Sessions over each storage object: (prefix, write_unchanged)
VARIANTS = {"plain": ("", False), "prefixed": ("π/", False), "touch": ("", True)}
EDITS = {"set", "del", "pop", "append", "setdefault", "update"}


def canon(value: Any) -> Any:
    """``value`` as nested tuples that tell apart what ``==`` does not: types,
    dict order, the sign of zero."""
    if type(value) is dict:
        return ("dict", tuple((k, canon(v)) for k, v in value.items()))
    if type(value) is list:
        return ("list", tuple(canon(v) for v in value))
    if type(value) is float:
        return ("float", struct.pack("<d", value))
    return (type(value).__name__, value)


def same(a: Any, b: Any) -> bool:
    return bool(canon(a) == canon(b))


def _containers(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, container) of every dict and list in ``value``, itself included."""
    if type(value) is dict:
        yield path, value
        for k, v in value.items():
            yield from _containers(v, path + (k,))
    elif type(value) is list:
        yield path, value
        for i, v in enumerate(value):
            yield from _containers(v, path + (i,))


def _edits_of(path: tuple[Any, ...], container: Any) -> st.SearchStrategy[tuple[Any, ...]]:
    """An in-place edit of one dict or list inside the value."""
    if type(container) is dict:
        keys = list(container)
        options = [st.tuples(st.just("set"), st.just(path), FIELDS, VALUES)]
        if keys:
            present = st.sampled_from(keys)
            options += [
                st.tuples(st.just("set"), st.just(path), present, VALUES),
                st.tuples(st.just("del"), st.just(path), present),
                st.tuples(st.just("pop"), st.just(path), present),
                # an edit that leaves the value as it was
                present.map(lambda k: ("set", path, k, copy.deepcopy(container[k]))),
            ]
        return st.one_of(options)
    options = [st.tuples(st.just("append"), st.just(path), VALUES)]
    if container:
        index = st.integers(-len(container), len(container) - 1)
        options += [
            st.tuples(st.just("set"), st.just(path), index, VALUES),
            st.tuples(st.just("del"), st.just(path), index),
            st.tuples(st.just("pop"), st.just(path), index),
        ]
    return st.one_of(options)


def step_for(value: Any) -> st.SearchStrategy[tuple[Any, ...]]:
    """A step a block may take on a session whose value is ``value``."""
    options: list[st.SearchStrategy[tuple[Any, ...]]] = [
        st.tuples(st.just("assign"), st.one_of(ROOTS, VALUES)),
        st.just(("delete",)),
        st.just(("read",)),
    ]
    if type(value) is dict:
        field = st.one_of(st.sampled_from(list(value)), FIELDS) if value else FIELDS
        options += [
            st.tuples(st.just("setdefault"), field, VALUES),
            st.tuples(st.just("update"), st.dictionaries(field, VALUES, max_size=2)),
        ]
    spots = list(_containers(value))
    if spots:
        options += [st.sampled_from(spots).flatmap(lambda spot: _edits_of(*spot))] * 2
    return st.one_of(options)


def model_apply(value: Any, step: tuple[Any, ...]) -> Any:
    """``step`` done to a plain value (in place where it edits); the new value."""
    op = step[0]
    if op == "assign":
        return copy.deepcopy(step[1])
    if op == "delete":
        return None
    if op in ("read", "raise"):
        return value
    if op == "setdefault":
        value.setdefault(step[1], copy.deepcopy(step[2]))
        return value
    if op == "update":
        value.update(copy.deepcopy(step[1]))
        return value
    node = value
    for part in step[1]:
        node = node[part]
    if op == "append":
        node.append(copy.deepcopy(step[2]))
    elif op == "set":
        node[step[2]] = copy.deepcopy(step[3])
    elif op == "del":
        del node[step[2]]
    elif op == "pop":
        node.pop(step[2])
    return value


@dataclass
class Block:
    """What one ``with`` block does, drawn up front, and what it must leave."""

    steps: list[tuple[Any, ...]]
    start: Any  # the value the block starts from
    final: Any  # the value at the end of the block
    assigned: bool  # s.data = ... or s.delete() happened
    edited: bool  # an in-place edit happened
    raises: bool


def draw_block(data: Any, start: Any, most: int = 4, raises: bool = False) -> Block:
    """Steps for a block on a session that starts as ``start``, and their outcome."""
    value = copy.deepcopy(start)
    steps: list[tuple[Any, ...]] = []
    assigned = edited = False
    for _ in range(data.draw(st.integers(0, most), label="steps")):
        step = data.draw(step_for(value), label="step")
        steps.append(step)
        value = model_apply(value, step)
        assigned = assigned or step[0] in ("assign", "delete")
        edited = edited or step[0] in EDITS
    if raises:
        steps.append(("raise",))
    return Block(steps, copy.deepcopy(start), value, assigned, edited, raises)


# -- the model --------------------------------------------------------------------


@dataclass
class Entry:
    """A live session in the model.

    ``expires`` is when it expires (None: never).  After a block edited a
    value and left it equal to what it was, the API does not say whether it
    is written again (a rewrite slides the expiry): then ``later`` is the
    expiry the rewrite would give, and the first check between the two
    settles which happened.
    """

    value: Any
    expires: float | None
    later: float | None = None


@dataclass
class Handle:
    """A storage object on the store, with the ``Sessions`` over it."""

    storage: Any
    client: Any  # a Redis client made for this handle, closed with it
    sessions: dict[str, Sessions]


class Worker:
    """A long-lived child process running tests/model_worker.py's commands."""

    def __init__(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=model_worker.serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.broken = False

    def call(self, *command: Any) -> Any:
        """Send a command; its result, or AssertionError with the child's traceback."""
        assert not self.broken, "the worker process stopped answering earlier"
        self.conn.send(command)
        if not self.conn.poll(60):
            self.broken = True
            raise AssertionError(f"the worker process did not answer {command[0]!r} within 60 s")
        status, result = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"the worker process failed:\n{result}")
        return result

    def stop(self) -> None:
        try:
            self.conn.send(("exit",))
        except OSError:
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(30)
        self.conn.close()
        self.process.close()


def spell(path: str, root: str, link: str, how: int) -> str:
    """Another spelling of ``path`` (a path under ``root``; ``link`` is a symlink to ``root``)."""
    parent, name = os.path.split(path)
    if how == 1:
        return os.path.join(parent, ".", name)
    if how == 2:
        return os.path.join(link, os.path.relpath(path, root))
    if how == 3:
        return os.path.relpath(path)
    if how == 4:
        return os.path.join(parent, "..", os.path.basename(parent), name)
    return path


SPELLINGS = st.integers(0, 4)


class StoreMachine(RuleBasedStateMachine):
    """One store of one backend, against a dict of what it must hold."""

    kind = "memory"
    server: Any = None  # the Redis server or cluster
    worker: Worker | None = None

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.root = tempfile.mkdtemp(prefix="sessionkit-model-")
        self.link = self.root + "-link"
        os.symlink(self.root, self.link)
        self.prefix = f"model{os.getpid()}.{next(_prefixes)}:"
        self.handles: list[Handle] = []
        self.model: dict[str, Entry] = {}
        self.model_ttl: float | None = None
        self.storage_ttl: float | None = None
        self.keys_used: list[Any] = []  # key arguments, as given to open()
        self.touched: set[str] = set()  # full keys since the last check
        self.expired: set[str] = set()  # keys whose last write expired: at most what a purge finds
        self.worker_open = False

    # -- set-up ------------------------------------------------------------------

    @initialize(ttl=st.sampled_from([True, True, False]))
    def start(self, ttl: bool) -> None:
        """Open the first storage object, with or without a ttl."""
        if ttl:
            self.model_ttl = None if self.kind in REAL_CLOCK else TTL
            self.storage_ttl = LONG_TTL if self.kind in REAL_CLOCK else TTL
        self.handles.append(self._open(0))

    def _path(self) -> str:
        if self.kind == "msgpack":
            return os.path.join(self.root, "sessions")
        return os.path.join(self.root, "shelf", "sessions")

    def _spec(self, how: int) -> dict[str, Any]:
        """How a storage object (here or in the worker) opens this store."""
        spec: dict[str, Any] = {"kind": self.kind, "ttl": self.storage_ttl}
        if self.kind in REAL_CLOCK:
            spec.update(url=self.server.url, prefix=self.prefix)
        elif self.kind != "memory":
            spec.update(path=spell(self._path(), self.root, self.link, how), dbm=SHELVE_DBM)
        return spec

    def _open(self, how: int) -> Handle:
        client = None
        if self.kind in REAL_CLOCK:
            from sessionkit import RedisStorage

            client = self.server.client() if self.kind == "redis-cluster" else redis_client(self.server)
            storage = RedisStorage(client, prefix=self.prefix, ttl=self.storage_ttl)
        else:
            storage = open_spec(self._spec(how), self.clock)
        sessions = {
            name: Sessions(storage, initial=dict, prefix=prefix, write_unchanged=touch, lock_timeout=10)
            for name, (prefix, touch) in VARIANTS.items()
        }
        return Handle(storage, client, sessions)

    @staticmethod
    def _close(handle: Handle) -> None:
        handle.storage.close()
        if handle.client is not None:
            handle.client.close()

    def teardown(self) -> None:
        try:
            if self.worker_open:
                assert self.worker is not None
                self.worker.call("close")
            if self.kind in REAL_CLOCK and self.handles:
                storage = self.handles[0].storage
                for key in list(storage.keys()):
                    storage.delete(key)
        finally:
            for handle in self.handles:
                self._close(handle)
            self.handles = []
            shutil.rmtree(self.root, ignore_errors=True)
            os.unlink(self.link)

    # -- drawing -------------------------------------------------------------------

    def _draw_handle(self, data: Any) -> Handle:
        return self.handles[data.draw(st.integers(0, len(self.handles) - 1), label="storage object")]

    def _draw_key(self, data: Any, variant: str) -> tuple[Any, str]:
        """A key argument (often one used before) and the full key it names."""
        if self.keys_used and data.draw(st.integers(0, 2), label="reuse a key") > 0:
            key = data.draw(st.sampled_from(self.keys_used), label="key")
        else:
            key = data.draw(KEYS, label="key")
        if key not in self.keys_used:
            self.keys_used.append(key)
        full = VARIANTS[variant][0] + (key if isinstance(key, str) else str(key))
        self.touched.add(full)
        return key, full

    def _start(self, full: str) -> Any:
        """The value a block on ``full`` starts from: the stored one or ``initial()``."""
        entry = self.model.get(full)
        return {} if entry is None else copy.deepcopy(entry.value)

    # -- the model's bookkeeping -----------------------------------------------------

    def _settle(self, full: str, block: Block, touched: bool, write_unchanged: bool) -> None:
        """Record what a block that ended cleanly left in the store."""
        if block.raises or not touched:
            return
        if block.final is None:
            self.model.pop(full, None)
            return
        now = self.clock()
        expires = None if self.model_ttl is None else now + self.model_ttl
        entry = self.model.get(full)
        if entry is None or block.assigned or write_unchanged or not same(block.final, entry.value):
            self.model[full] = Entry(copy.deepcopy(block.final), expires)
            self.expired.discard(full)
        elif block.edited and expires is not None:
            self.model[full] = Entry(entry.value, entry.expires, expires)

    def _run_here(self, handle: Handle, variant: str, key: Any, full: str, lazy: bool, block: Block,
                  check_new: bool, inner: Any = None) -> bool:
        """Run ``block`` in this process; whether the session was touched.

        ``inner`` (a callable) runs inside the block, after its steps."""
        absent = full not in self.model
        steps = block.steps[:-1] if block.raises else block.steps
        touched = bool(steps) or not lazy or check_new
        try:
            with handle.sessions[variant].open(key, lazy=lazy) as s:
                assert s.key == full
                if not lazy:  # read on entry
                    assert same(s.data, block.start), (s.data, block.start)
                if check_new:
                    assert s.is_new == absent
                apply_steps(s, steps)
                if touched:
                    assert same(s.data, block.final), (s.data, block.final)
                if inner is not None:
                    inner()
                if block.raises:
                    raise Planned()
        except Planned:
            assert block.raises
        return touched

    def _sweep(self) -> None:
        """Drop what has expired by now from the model."""
        now = self.clock()
        for full, entry in list(self.model.items()):
            last = entry.expires if entry.later is None else entry.later
            if last is not None and last <= now:
                del self.model[full]
                self.expired.add(full)

    def _resolve(self) -> None:
        """Settle each value whose expiry the API leaves open, now that it matters."""
        now = self.clock()
        storage = self.handles[0].storage
        for full, entry in list(self.model.items()):
            if entry.later is not None and entry.expires is not None and entry.expires <= now:
                got = storage.read(full)
                if got is None:  # not rewritten: expired
                    del self.model[full]
                    self.expired.add(full)
                else:
                    self.model[full] = Entry(entry.value, entry.later)

    def _wait(self, data: Any) -> None:
        """Maybe let time pass before a session (more often than the rule alone would)."""
        if self.model_ttl is not None:
            seconds = data.draw(st.sampled_from(WAITS), label="wait")
            if seconds:
                self.clock.tick(seconds)
                self._sweep()
                self._resolve()

    def _session_block(self, data: Any, raises: bool) -> None:
        self._wait(data)
        handle = self._draw_handle(data)
        variant = data.draw(st.sampled_from(sorted(VARIANTS)), label="sessions")
        key, full = self._draw_key(data, variant)
        lazy = data.draw(st.booleans(), label="lazy")
        check_new = data.draw(st.booleans(), label="ask is_new")
        block = draw_block(data, self._start(full), raises=raises)
        touched = self._run_here(handle, variant, key, full, lazy, block, check_new)
        self._settle(full, block, touched, VARIANTS[variant][1])

    # -- rules ---------------------------------------------------------------------

    @rule(data=st.data())
    def session(self, data: Any) -> None:
        """A session that ends cleanly: edits, assignments, deletions, reads."""
        self._session_block(data, raises=False)

    @rule(data=st.data())
    def session_that_raises(self, data: Any) -> None:
        """A session whose block raises after its steps: nothing is written."""
        self._session_block(data, raises=True)

    @rule(data=st.data())
    def session_inside_a_session(self, data: Any) -> None:
        """A session on another key runs (and maybe raises) while one is held open."""
        outer_handle, inner_handle = self._draw_handle(data), self._draw_handle(data)
        outer_variant = data.draw(st.sampled_from(sorted(VARIANTS)), label="outer sessions")
        inner_variant = data.draw(st.sampled_from(sorted(VARIANTS)), label="inner sessions")
        outer_key, outer_full = self._draw_key(data, outer_variant)
        inner_key, inner_full = self._draw_key(data, inner_variant)
        if inner_full == outer_full:
            inner_key = f"{inner_key}~"
            inner_full += "~"
            self.touched.add(inner_full)
        outer_lazy, inner_lazy = data.draw(st.booleans()), data.draw(st.booleans())
        outer = draw_block(data, self._start(outer_full), most=2, raises=data.draw(st.booleans()))
        inner = draw_block(data, self._start(inner_full), most=2, raises=data.draw(st.booleans()))

        def run_inner() -> None:
            touched = self._run_here(
                inner_handle, inner_variant, inner_key, inner_full, inner_lazy, inner, False
            )
            self._settle(inner_full, inner, touched, VARIANTS[inner_variant][1])

        touched = self._run_here(outer_handle, outer_variant, outer_key, outer_full, outer_lazy, outer, False,
                                 inner=run_inner)
        self._settle(outer_full, outer, touched, VARIANTS[outer_variant][1])

    @precondition(lambda self: self.model_ttl is not None)
    @rule(seconds=st.sampled_from(TICKS))
    def time_passes(self, seconds: int) -> None:
        """The clock moves on; sessions older than the ttl expire."""
        self.clock.tick(seconds)
        self._sweep()

    @precondition(lambda self: self.kind in ("msgpack", "shelve"))
    @rule(data=st.data())
    def purge(self, data: Any) -> None:
        """``purge_expired()`` reclaims at most the expired sessions, and then none is left."""
        storage = self._draw_handle(data).storage
        purged = storage.purge_expired()
        assert 0 <= purged <= len(self.expired), (purged, sorted(self.expired))
        assert storage.purge_expired() == 0
        self.expired.clear()

    @precondition(lambda self: self.kind != "memory")
    @rule(data=st.data(), how=SPELLINGS, close_first=st.booleans())
    def reopen(self, data: Any, how: int, close_first: bool) -> None:
        """A storage object is closed and a new one opened on the same store (a restart)."""
        index = data.draw(st.integers(0, len(self.handles) - 1), label="which")
        old = self.handles[index]
        if close_first:
            self._close(old)
            self.handles[index] = self._open(how)
        else:
            self.handles[index] = self._open(how)
            self._close(old)

    @precondition(lambda self: self.kind != "memory" and len(self.handles) == 1)
    @rule(how=SPELLINGS)
    def open_second(self, how: int) -> None:
        """A second storage object on the same store, used in turn with the first."""
        self.handles.append(self._open(how))

    @precondition(lambda self: len(self.handles) == 2)
    @rule(which=st.integers(0, 1))
    def close_one(self, which: int) -> None:
        """One of two storage objects is closed; the other goes on working."""
        self._close(self.handles.pop(which))

    def _worker_ready(self, how: int = 0, again: bool = False) -> Worker:
        assert self.worker is not None
        if again or not self.worker_open:
            self.worker.call("open", self._spec(how))
            self.worker_open = True
        return self.worker

    @precondition(lambda self: self.worker is not None)
    @rule(data=st.data())
    def session_in_another_process(self, data: Any) -> None:
        """The worker process runs a session (which may raise) on the store."""
        self._wait(data)
        worker = self._worker_ready()
        variant = data.draw(st.sampled_from(sorted(VARIANTS)), label="sessions")
        key, full = self._draw_key(data, variant)
        lazy = data.draw(st.booleans(), label="lazy")
        block = draw_block(data, self._start(full), raises=data.draw(st.booleans(), label="raises"))
        prefix, touch = VARIANTS[variant]
        ended, start = worker.call("session", self.clock(), prefix, touch, key, lazy, block.steps)
        assert ended == ("raised" if block.raises else "done")
        if not lazy:
            assert same(start, block.start), f"the worker read {full!r}: {start!r}, model {block.start!r}"
        self._settle(full, block, bool(block.steps) or not lazy, touch)

    @precondition(lambda self: self.worker is not None)
    @rule(how=SPELLINGS, again=st.booleans())
    def listed_by_another_process(self, how: int, again: bool) -> None:
        """The worker process (maybe after reopening its storage) lists what the model holds."""
        items = self._worker_ready(how, again).call("items", self.clock())
        assert len(items) == len({k for k, _ in items}), "a key listed twice"
        self._agree(dict(items), "the worker's items()")

    # -- the check -----------------------------------------------------------------

    def _agree(self, found: dict[str, Any], where: str) -> None:
        want = sorted(self.model)
        assert sorted(found) == want, f"{where}: {sorted(found)!r}, model {want!r}"
        for full, entry in self.model.items():
            got = found[full]
            assert same(got, entry.value), f"{where}[{full!r}]: {got!r}, model {entry.value!r}"

    @invariant()
    def store_matches_model(self) -> None:
        """Every storage object reads and lists exactly what the model holds."""
        if not self.handles:
            return
        self._resolve()
        for number, handle in enumerate(self.handles):
            storage = handle.storage
            for full in set(self.model) | self.touched:
                entry = self.model.get(full)
                got = storage.read(full)
                if entry is None:
                    assert got is None, f"storage {number}: {full!r} reads {got!r}, model has nothing"
                else:
                    want = entry.value
                    assert same(got, want), f"storage {number}: {full!r} is {got!r}, model {want!r}"
                assert storage.has(full) == (entry is not None), f"storage {number}: has({full!r})"
            keys = list(storage.keys())
            assert len(keys) == len(set(keys)), f"storage {number}: a key listed twice in {keys!r}"
            assert sorted(keys) == sorted(self.model), f"storage {number}: keys() {sorted(keys)!r}"
        items = list(self.handles[-1].storage.items())
        assert len(items) == len({k for k, _ in items}), "a key listed twice by items()"
        self._agree(dict(items), "items()")
        self.touched.clear()


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """One worker process for every backend's run."""
    running = Worker()
    yield running
    running.stop()


@pytest.mark.parametrize("kind", BACKENDS)
def test_store_behaves_like_a_dict(kind: str, request: Any) -> None:
    """Random runs of sessions leave every backend holding what a dict says."""
    server = None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
    elif kind == "redis-cluster":
        server = request.getfixturevalue("redis_cluster")
    worker = None if kind == "memory" else request.getfixturevalue("worker")
    machine = type(f"StoreMachine_{kind.replace('-', '_')}", (StoreMachine,),
                   {"kind": kind, "server": server, "worker": worker})
    run_state_machine_as_test(machine, settings=model_settings(kind))
