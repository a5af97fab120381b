"""A run store in PostgreSQL, so a trainer on a cluster node and a dashboard elsewhere share runs.

Same tables, same queries and same semantics as the SQLite store (the queries of
:class:`~trainer.store.base.RunStore` run unchanged); this module only supplies connections,
transactions and the schema's home:

* **One schema per run.** ``panda.runs`` lists the runs (name → id, schema version); run ``id``
  keeps its six tables in schema ``panda_run_<id>``, and each connection sets its
  ``search_path`` there. So the run's tables are exactly SQLite's, and a run can be dropped
  with one ``DROP SCHEMA … CASCADE``.
* **One writer at a time per run.** A write transaction first takes a transaction-level
  advisory lock on the run (https://www.postgresql.org/docs/current/explicit-locking.html
  #ADVISORY-LOCKS). That is what ``BEGIN IMMEDIATE`` gives SQLite: ids are handed out and
  committed in the same order, so incremental readers ("rows after id N") never skip a row that
  committed late, and commands are applied in commit order.
* **Autocommit reads.** Readers never hold a transaction open, so every read sees the newest
  committed rows and a dashboard cannot block a trainer.
* **Commands are pushed.** Adding a command sends ``NOTIFY panda_run_<id>`` with its commit
  (https://www.postgresql.org/docs/current/sql-notify.html); the trainer's poller listens on a
  connection of its own, which runs no query (psycopg drops notifications that arrive during a
  query: https://github.com/psycopg/psycopg/issues/962), and sleeps in a socket wait until
  then, instead of querying 20 times a second: each query wakes a thread that must take the GIL
  from the training loop.

Connection URLs are libpq's (``postgresql://user@host:5432/db``); keep passwords out of them
with ``PGPASSWORD`` or ``~/.pgpass``, which libpq reads. Needs the ``postgres`` extra
(``pip install 'panda-babysitter[postgres]'``, which installs psycopg 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import types
import urllib.parse
from pathlib import Path
from typing import Any

from trainer.store.base import (
    RunStore,
    StoreError,
    first_line,
    sanitize_run_name,
)
from trainer.store.schema import (
    METRIC_COLUMNS,
    METRICS,
    SCHEMA_VERSION,
    create_statements,
    migration_statements,
    upsert_metrics_tail,
)

CONNECT_TIMEOUT_S = 5      # a dead or unreachable server is reported instead of hanging
LISTEN_FALLBACK_S = 1.0    # a command poller re-reads at least this often (a lost notification)
LOCK_CLASS = 0x50414E44    # "PAND": first key of Panda's advisory locks, apart from other apps'
REGISTRY_LOCK = 0          # second key while creating the registry or a run (run ids are ≥ 1)
JIT_SINCE = 110_000        # server_version of PostgreSQL 11, which added JIT (and its setting)

_REGISTRY = """
CREATE SCHEMA IF NOT EXISTS panda;
CREATE TABLE IF NOT EXISTS panda.runs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL)
"""

# A flush's metric rows as one statement of one array per column: row-by-row executemany costs
# ~20 µs of client CPU per row (5 ms for a 100 ms flush at 2,300 steps/s), the arrays ~3 µs.
_ARRAY_TYPES = {"int": "bigint", "real": "float8"}
_TYPES = tuple(_ARRAY_TYPES[c.type] for c in METRICS.columns)
_UPSERT_METRIC_ARRAYS = (
    f"INSERT INTO metrics({', '.join(METRIC_COLUMNS)}) SELECT * FROM "
    f"unnest({', '.join(f'?::{t}[]' for t in _TYPES)}) " + upsert_metrics_tail())


# A run's id, schema version, and whether its levels of detail exist (development builds of
# schema 2 wrote runs without them), in one round trip.
_FIND_RUN = ("SELECT id, version, to_regclass('panda_run_' || id || '.levels') IS NOT NULL "
             "FROM panda.runs WHERE name = %s")


def _array(values, kind: type) -> str:
    """A PostgreSQL array literal. ``repr`` of a float is its shortest form that reads back
    as the same double, and PostgreSQL's float8 input rounds correctly, so nothing is lost.

    ``json.dumps`` writes numbers exactly as ``repr`` does, in C: a flush's columns are
    encoded without a Python call per value (the flusher holds the GIL meanwhile). Values it
    cannot encode (a tensor LR) take the value-by-value path.
    """
    values = list(values)
    if kind is int and not all(type(v) is int for v in values):  # e.g. an epoch set as 2.0
        values = [None if v is None else int(v) for v in values]
    try:
        text = json.dumps(values, allow_nan=False)
        return "{" + text[1:-1].replace("null", "NULL") + "}"
    except (TypeError, ValueError):
        return "{" + ",".join("NULL" if v is None else repr(kind(v)) for v in values) + "}"



def redact(url: str) -> str:
    """``url`` with any password (``user:pw@`` or ``?password=``) replaced by ``***``, for
    messages, JSON output and the page."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))

def _driver():
    try:
        import psycopg
    except ImportError:
        raise StoreError("a PostgreSQL store needs psycopg: "
                         "pip install 'panda-babysitter[postgres]'") from None
    return psycopg


def connect(url: str):
    """An autocommit connection to ``url``, or StoreError with the server's reason."""
    psycopg = _driver()
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except (psycopg.Error, ValueError) as err:
        raise StoreError(f"cannot reach the PostgreSQL store {redact(url)}: "
                         f"{first_line(err)}") from None


def _ensure_registry(conn) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, REGISTRY_LOCK))
        for statement in filter(str.strip, _REGISTRY.split(";")):
            conn.execute(statement)


def _registry_exists(conn) -> bool:
    return conn.execute("SELECT to_regclass('panda.runs') IS NOT NULL").fetchone()[0]




class _Connection:
    """A psycopg connection that takes SQLite's ``?`` placeholders (our SQL has no ``%``)."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql: str, params: tuple = ()):
        return self.raw.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows) -> None:
        rows = list(rows)
        if rows:
            with self.raw.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    def close(self) -> None:
        self.raw.close()


class _Transaction:
    """One transaction holding the run's advisory lock (see the module docstring), sent as a
    pipeline: BEGIN, the lock, the statements and COMMIT cost one network round trip instead
    of one each (https://www.psycopg.org/psycopg3/docs/advanced/pipeline.html)."""

    def __init__(self, conn: _Connection, run_id: int):
        self.conn, self.run_id = conn, run_id
        self._blocks: contextlib.ExitStack | None = None

    def __enter__(self) -> _Connection:
        with contextlib.ExitStack() as blocks:
            blocks.enter_context(self.conn.raw.pipeline())
            blocks.enter_context(self.conn.raw.transaction())
            self.conn.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_CLASS, self.run_id))
            self._blocks = blocks.pop_all()
        return self.conn

    def __exit__(self, *exc) -> None:
        self._blocks.__exit__(*exc)


class PostgresStore(RunStore):
    """One run in a PostgreSQL database, behind the :class:`RunStore` interface.

    Args:
        url: libpq connection URL (``postgresql://user@host/db``).
        name: the run's name (sanitized like a run directory's name).
        create: create the run if the database does not hold it yet.
        run_dir: where this process keeps the run's checkpoints. A trainer passes its own; a
            reader gets the one the trainer recorded (``meta["run_dir"]``), which is only a
            real directory on the trainer's host.
        connection: an open psycopg connection to use on this thread instead of a new one;
            it stays open when the store closes (its owner closes it).
        per_thread: each thread gets a connection of its own (a trainer's flusher and poller
            query at the same time). False: one connection for callers that take turns, such
            as a dashboard session, whose every re-run is a new thread.
    """

    backend = "postgresql"

    def __init__(self, url: str, name: str, *, create: bool = False,
                 run_dir: str | os.PathLike | None = None, connection: Any = None,
                 per_thread: bool = True):
        psycopg = _driver()
        # A reconnect to a server that is down raises StoreError (from connect()): background
        # threads must retry on it like on any driver error, not die.
        self.errors = (psycopg.Error, StoreError)
        self.url = url
        name = sanitize_run_name(name)
        super().__init__(name=name, address=f"{url}#{name}",
                         shown_address=f"{redact(url)}#{name}", run_dir=run_dir or name)
        self._local = threading.local() if per_thread else types.SimpleNamespace()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        owned = connection is None
        conn = connect(url) if owned else connection
        try:
            self.run_id = self._find_or_create(conn, create)
            self._adopt(conn, owned=owned)  # the lookup's connection becomes this thread's
            if run_dir is None:  # a reader: where the trainer keeps the checkpoints
                self.run_dir = self._recorded_run_dir()
        except (psycopg.Error, StoreError) as err:
            if owned:
                conn.close()
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"{redact(url)} holds no readable run {self.name!r}: "
                             f"{first_line(err)}") from None

    def _find_or_create(self, conn, create: bool) -> int:
        if create:
            _ensure_registry(conn)
        elif not _registry_exists(conn):
            raise StoreError(f"no run {self.name!r} in {redact(self.url)} (no Panda runs there)")
        row = conn.execute(_FIND_RUN, (self.name,)).fetchone()
        if row is None and create:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, REGISTRY_LOCK))
                row = conn.execute(_FIND_RUN, (self.name,)).fetchone()
                if row is None:  # nobody created it while we waited for the lock
                    row = self._create_run(conn)
        if row is None:
            raise StoreError(f"no run {self.name!r} in {redact(self.url)}")
        run_id, version, has_levels = row
        if version > SCHEMA_VERSION:
            raise StoreError(f"run {self.name!r} in {redact(self.url)} was written by a newer "
                             f"Panda (schema {version}, this one reads up to {SCHEMA_VERSION}); "
                             "upgrade panda-babysitter")
        if version < SCHEMA_VERSION or not has_levels:
            self._migrate(conn, run_id)
        return run_id

    def _migrate(self, conn, run_id: int) -> None:
        """Bring an older run's tables to this version (under the registry lock, once), or
        add the levels to a run that a development build of this version wrote without."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, REGISTRY_LOCK))
            (_, current, has_levels) = conn.execute(_FIND_RUN, (self.name,)).fetchone()
            conn.execute(f"SET LOCAL search_path TO panda_run_{int(run_id)}")
            if current < SCHEMA_VERSION:
                for statement in migration_statements(current, "postgresql"):
                    conn.execute(statement)
                self._migrated(_Connection(conn), current)
                conn.execute("UPDATE panda.runs SET version = %s WHERE id = %s",
                             (SCHEMA_VERSION, run_id))
            elif not has_levels:
                self._add_levels(_Connection(conn))
            # else: another process migrated it while we waited

    def _create_run(self, conn) -> tuple[int, int, bool]:
        run_id = conn.execute("INSERT INTO panda.runs(name, version, created) "
                              "VALUES (%s, %s, %s) RETURNING id",
                              (self.name, SCHEMA_VERSION, time.time())).fetchone()[0]
        conn.execute(f"CREATE SCHEMA panda_run_{int(run_id)}")
        conn.execute(f"SET LOCAL search_path TO panda_run_{int(run_id)}")
        for statement in create_statements("postgresql"):
            conn.execute(statement)
        return run_id, SCHEMA_VERSION, True

    def _recorded_run_dir(self) -> Path:
        recorded = self.meta().get("run_dir")
        return Path(recorded) if isinstance(recorded, str) else Path(self.name)

    # --- the backend hooks RunStore calls --------------------------------------------------------

    def _conn(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.raw.closed:  # first use on this thread, or the link broke
            conn = self._adopt(connect(self.url))
        return conn

    def _adopt(self, raw, *, owned: bool = True) -> _Connection:
        setup = f"SET search_path TO panda_run_{int(self.run_id)}"
        if raw.info.server_version >= JIT_SINCE:
            # Panda's statements are short, and JIT compiling one costs more than it runs:
            # the levels' upkeep of a 1,000-row batch on a 1 M-step run took 0.8 s with JIT,
            # 3 ms without (PostgreSQL 15; JIT pays off for long analytical queries:
            # https://www.postgresql.org/docs/current/jit-decision.html).
            setup += "; SET jit = off"
        raw.execute(setup)  # one round trip: no parameters, so psycopg sends both at once
        conn = self._local.conn = _Connection(raw)
        if owned:  # closed with the store
            with self._lock:
                self._connections.append(conn)
        return conn

    def transaction(self) -> _Transaction:
        return _Transaction(self._conn(), self.run_id)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = (threading.local() if isinstance(self._local, threading.local)
                       else types.SimpleNamespace())

    @staticmethod
    def _insert_id(tx: Any, sql: str, params: tuple) -> int:
        return int(tx.execute(sql + " RETURNING id", params).fetchone()[0])

    @property
    def _channel(self) -> str:
        return f"panda_run_{int(self.run_id)}"

    def _notify_commands(self, tx: Any) -> None:
        tx.execute(f"NOTIFY {self._channel}")

    def wake_command_waiters(self) -> None:
        self._conn().execute(f"NOTIFY {self._channel}")

    def wait_for_commands(self, timeout: float, stop: threading.Event) -> None:
        """Sleep until a command is committed, ``stop`` is set (see wake_command_waiters), or
        LISTEN_FALLBACK_S passes. ``timeout`` is the SQLite polling interval: unused here."""
        if stop.is_set():
            return
        listener = getattr(self._local, "listener", None)
        if listener is None or listener.closed:  # first call, or the link broke
            listener = self._local.listener = connect(self.url)
            with self._lock:
                self._connections.append(_Connection(listener))
            listener.execute(f"LISTEN {self._channel}")
            return  # commands committed before LISTEN: the caller reads them now
        for _ in listener.notifies(timeout=LISTEN_FALLBACK_S, stop_after=1):
            pass
        # Later notifications of the same burst stay queued and end the next wait at once.

    @staticmethod
    def _insert_metrics(tx: Any, columns) -> None:
        if columns and columns[0]:
            tx.execute(_UPSERT_METRIC_ARRAYS, [_array(c, int if t == "bigint" else float)
                                               for c, t in zip(columns, _TYPES)])


def drop_run(url: str, name: str) -> None:
    """Delete run ``name`` and all its rows from the database at ``url``."""
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, REGISTRY_LOCK))
        row = conn.execute("DELETE FROM panda.runs WHERE name = %s RETURNING id",
                           (name,)).fetchone()
        if row is None:
            raise StoreError(f"no run {name!r} in {redact(url)}")
        conn.execute(f"DROP SCHEMA panda_run_{int(row[0])} CASCADE")


def summaries(url: str) -> list[tuple[str, dict[str, Any] | Exception]]:
    """``(name, summary)`` of every run at ``url``, or ``(name, error)`` for a run that cannot
    be read, over one connection: a connection per run would add its set-up (~10 ms here, a
    few network round trips elsewhere) to every listing."""
    found: list[tuple[str, dict[str, Any] | Exception]] = []
    errors = (StoreError, _driver().Error)
    with connect(url) as conn:
        if not _registry_exists(conn):
            return []
        for (name,) in conn.execute("SELECT name FROM panda.runs ORDER BY id").fetchall():
            try:
                found.append((name, PostgresStore(url, name, connection=conn).summary()))
            except errors as err:  # e.g. a run dropped meanwhile: listed as unreadable
                found.append((name, err))
    return found
