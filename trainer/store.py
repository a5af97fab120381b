"""The run store: the only bridge between processes. The default keeps one SQLite file per run.

Trainers, dashboards and the CLI never talk to each other directly; they read and write
``runs/<run>/run.db`` (or, with :mod:`trainer.store_pg`, a PostgreSQL database that trainers
and dashboards on different machines share). :class:`RunStore` is both the SQLite store and
the interface: every query below is written in SQL that SQLite and PostgreSQL both accept,
and a backend only supplies connections, transactions and the schema.

SQLite in WAL mode allows one writer and many concurrent readers, and a committed transaction
survives ``kill -9`` of the writer (https://sqlite.org/wal.html). ``synchronous=NORMAL`` in WAL
mode keeps every commit safe from process crashes; only an OS crash or power cut can lose the
last transactions, never corrupt the file.

Tables (schema version in ``PRAGMA user_version``):

* ``meta``       key → JSON value: name, task, optimizer, config, created, status, heartbeat …
* ``metrics``    one row per optimizer step: step, epoch, wall, loss, lr, momentum, weight_decay
* ``validation`` one row per named metric per evaluation: step, epoch, wall, name, value
* ``commands``   id, created, kind, payload (JSON), status, applied_step, error, source
* ``events``     intervention events, drawn as chart markers: step, wall, kind, knob, old, new
* ``results``    JSON results attached to the run (e.g. LR range tests)

Every read method is incremental ("everything after X") so a dashboard fetches only new rows.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
DB_NAME = "run.db"
BUSY_TIMEOUT_MS = 10_000  # writers wait this long for the lock instead of failing
HEARTBEAT_STALE_S = 3.0   # a live trainer updates its heartbeat every flush (~0.1 s)
SCHEMA_WAIT_S = 2.0       # how long a reader waits for a store that is being created

# A diverged run is alive: its trainer waits (paused) for a rollback or a resume.
RUNNING_STATES = ("starting", "running", "paused", "diverged")
FINAL_STATES = ("stopped", "finished", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    step INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, wall REAL NOT NULL, loss REAL,
    lr REAL, momentum REAL, weight_decay REAL);
CREATE TABLE IF NOT EXISTS validation (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    wall REAL NOT NULL, name TEXT NOT NULL, value REAL);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL DEFAULT 'pending',
    applied_step INTEGER, error TEXT, source TEXT NOT NULL DEFAULT 'api', updated REAL);
CREATE INDEX IF NOT EXISTS commands_status ON commands(status, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER NOT NULL, wall REAL NOT NULL,
    kind TEXT NOT NULL, knob TEXT, old REAL, new REAL, command_id INTEGER, message TEXT);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, kind TEXT NOT NULL,
    status TEXT NOT NULL, payload TEXT NOT NULL DEFAULT '{}');
"""

# Upserts in the SQL both backends speak (SQLite ≥ 3.24 and PostgreSQL ≥ 9.5).
_UPSERT_META = ("INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
_UPSERT_METRICS = (
    "INSERT INTO metrics(step, epoch, wall, loss, lr, momentum, weight_decay) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(step) DO UPDATE SET epoch = excluded.epoch, "
    "wall = excluded.wall, loss = excluded.loss, lr = excluded.lr, "
    "momentum = excluded.momentum, weight_decay = excluded.weight_decay")

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class StoreError(RuntimeError):
    """A run store that cannot be used (missing, corrupt, or from a newer Panda)."""


@dataclass(frozen=True)
class Command:
    """One row of the command table."""

    id: int
    created: float
    kind: str
    payload: str
    status: str
    applied_step: int | None
    error: str | None
    source: str


def sanitize_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name (letters, digits, ``._-``), else raise ValueError.

    Names never contain a path separator or start with a dot, so they cannot escape the runs
    directory.
    """
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid run name {name!r}: use letters, digits, '.', '_' or '-' "
                         "(at most 100, not starting with '.')")
    return name


def first_line(err: BaseException) -> str:
    """An exception's message on one line (a driver's can span several), else its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class RunStore:
    """Read and write one run's ``run.db``. Safe to share between threads of one process.

    Each thread gets its own SQLite connection (SQLite connections must not be used from two
    threads at once); each process opens its own store.

    Attributes every store has: ``name`` (the run's name), ``address`` (what
    :func:`trainer.runs.open_store` opens it by: a directory for SQLite), ``run_dir`` (where its
    checkpoints live) and ``errors`` (the driver's exceptions for a store that is briefly
    unreachable: background threads retry on them instead of dying).
    """

    backend = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, run_dir: str | os.PathLike, *, create: bool = False):
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        self.address = str(self.run_dir)
        self.shown_address = self.address  # what users may see (PostgreSQL hides a password)
        self.path = self.run_dir / DB_NAME
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise StoreError(f"no run at {self.run_dir} (no {DB_NAME} there)")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._check_schema(create)
        except sqlite3.DatabaseError as err:
            self.close()
            raise StoreError(f"{self.path} is not a readable Panda run store: {err}") from None
        except StoreError:
            self.close()  # refused stores leave no open connection behind
            raise

    # --- connections ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _check_schema(self, create: bool) -> None:
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        deadline = time.monotonic() + SCHEMA_WAIT_S
        while version == 0 and not create and time.monotonic() < deadline:
            # Another process may be creating this store right now: give it a moment.
            time.sleep(0.05)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer Panda (schema {version}, "
                             f"this one reads up to {SCHEMA_VERSION}); upgrade panda-babysitter")
        if version == 0:
            if not create:
                raise StoreError(f"{self.path} is not a Panda run store (no schema)")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"cannot switch {self.path} to WAL mode")
            with self.transaction() as tx:
                # Statement by statement: executescript() would COMMIT the open transaction.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    tx.execute(statement)
                tx.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def transaction(self):
        """Context manager: one IMMEDIATE transaction on this thread's connection."""
        return _Transaction(self._conn())

    @staticmethod
    def _insert_id(tx: Any, sql: str, params: tuple) -> int:
        """Run one INSERT and return the id it gave its row (backends differ only here)."""
        return int(tx.execute(sql, params).lastrowid)

    @staticmethod
    def _insert_metrics(tx: Any, rows: Sequence[tuple]) -> None:
        """Upsert a batch of metric rows (a backend may send the batch its own way)."""
        tx.executemany(_UPSERT_METRICS, rows)

    def close(self) -> None:
        """Close every connection this store opened (from any thread)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- meta ----------------------------------------------------------------------------------

    def set_meta(self, **values: Any) -> None:
        """Store JSON-serializable metadata values (run name, config, status, …)."""
        rows = [(key, json.dumps(value)) for key, value in values.items()]
        with self.transaction() as tx:
            tx.executemany(_UPSERT_META, rows)

    def meta(self) -> dict[str, Any]:
        rows = self._conn().execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    # --- metrics -------------------------------------------------------------------------------

    def append_metrics(self, rows: Sequence[tuple], *, meta: dict | None = None) -> None:
        """Insert ``(step, epoch, wall, loss, lr, momentum, weight_decay)`` rows in one commit.

        Non-finite losses are stored as NULL (SQLite has no NaN) and read back as NaN. ``meta``
        values (e.g. the heartbeat) are written in the same transaction.
        """
        clean = [(r[0], r[1], r[2], _finite_or_none(r[3]), *r[4:]) for r in rows]
        with self.transaction() as tx:
            self._insert_metrics(tx, clean)
            if meta:
                tx.executemany(_UPSERT_META, [(k, json.dumps(v)) for k, v in meta.items()])

    def metrics_since(self, after_step: int = -1, *, columns: Iterable[str] = (
            "step", "epoch", "wall", "loss", "lr", "momentum", "weight_decay")) -> dict[str, list]:
        """Metric columns for every step after ``after_step``, as ``{column: list}``."""
        cols = list(columns)
        allowed = {"step", "epoch", "wall", "loss", "lr", "momentum", "weight_decay"}
        if not set(cols) <= allowed:
            raise ValueError(f"unknown metric column in {cols}")
        rows = self._conn().execute(
            f"SELECT {', '.join(cols)} FROM metrics WHERE step > ? ORDER BY step",
            (after_step,)).fetchall()
        out: dict[str, list] = {c: [r[i] for r in rows] for i, c in enumerate(cols)}
        if "loss" in out:
            out["loss"] = [math.nan if v is None else v for v in out["loss"]]
        return out

    def last_metric(self) -> dict[str, Any] | None:
        """The newest metrics row, or None before the first step."""
        cur = self._conn().execute("SELECT * FROM metrics ORDER BY step DESC LIMIT 1")
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def truncate_after(self, step: int) -> None:
        """Forget metrics and validation logged at or after ``step`` (used on resume)."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM metrics WHERE step >= ?", (step,))
            tx.execute("DELETE FROM validation WHERE step >= ?", (step,))

    # --- validation ----------------------------------------------------------------------------

    def append_validation(self, rows: Sequence[tuple]) -> None:
        """Insert ``(step, epoch, wall, name, value)`` rows."""
        clean = [(*r[:4], _finite_or_none(r[4])) for r in rows]
        with self.transaction() as tx:
            tx.executemany("INSERT INTO validation(step, epoch, wall, name, value) "
                           "VALUES (?, ?, ?, ?, ?)", clean)

    def validation_since(self, after_id: int = 0) -> list[dict[str, Any]]:
        """Validation rows with id > ``after_id``: dicts with id, step, epoch, wall, name, value."""
        return self._dicts("SELECT * FROM validation WHERE id > ? ORDER BY id", (after_id,))

    # --- commands ------------------------------------------------------------------------------

    def submit_command(self, kind: str, payload: dict | None = None, *,
                       source: str = "api") -> int:
        """Append a pending command and return its id. Callers validate before submitting."""
        return self.submit_raw_command(kind, json.dumps(payload or {}), source=source)

    def submit_raw_command(self, kind: str, payload_text: str, *, source: str = "raw") -> int:
        """Append a command whose payload is stored verbatim (tests of hostile input use this)."""
        with self.transaction() as tx:
            command_id = self._insert_id(
                tx, "INSERT INTO commands(created, kind, payload, source) VALUES (?, ?, ?, ?)",
                (time.time(), kind, payload_text, source))
            self._notify_commands(tx)
            return command_id

    def wait_for_commands(self, timeout: float, stop: threading.Event) -> None:
        """Block until new commands may be pending: ``timeout`` seconds, or until ``stop`` is
        set. SQLite cannot notify, so its readers poll; a server store returns as soon as a
        command is committed."""
        stop.wait(timeout)

    def wake_command_waiters(self) -> None:
        """Make :meth:`wait_for_commands` return now in every process (no-op for SQLite)."""

    def _notify_commands(self, tx: Any) -> None:
        """Called inside the transaction that adds a pending command (no-op for SQLite)."""

    def _select_commands(self, where: str, params: tuple) -> list[Command]:
        rows = self._conn().execute(
            "SELECT id, created, kind, payload, status, applied_step, error, source "
            f"FROM commands WHERE {where} ORDER BY id", params)
        return [Command(*row) for row in rows.fetchall()]

    def pending_commands(self, after_id: int = 0) -> list[Command]:
        """Pending commands with id > ``after_id``, oldest first."""
        return self._select_commands("status = 'pending' AND id > ?", (after_id,))

    def command(self, command_id: int) -> Command | None:
        found = self._select_commands("id = ?", (command_id,))
        return found[0] if found else None

    def commands(self, after_id: int = 0) -> list[Command]:
        return self._select_commands("id > ?", (after_id,))

    def resolve_commands(self, outcomes: Sequence[tuple], events: Sequence[tuple] = ()) -> None:
        """Record command outcomes and their intervention events in one transaction.

        ``outcomes``: ``(command_id, status, applied_step, error)``; only pending commands
        change, so a command is resolved exactly once. ``events``: see :meth:`add_events`.
        """
        now = time.time()
        with self.transaction() as tx:
            tx.executemany("UPDATE commands SET status = ?, applied_step = ?, error = ?, "
                           "updated = ? WHERE id = ? AND status = 'pending'",
                           [(s, st, e, now, cid) for cid, s, st, e in outcomes])
            self._insert_events(tx, events)

    def record_command(self, kind: str, payload: dict, source: str, applied_step: int,
                       events: Sequence[tuple] = ()) -> int:
        """Record a command that was applied without passing through the table (API, replay),
        with its events linked to it; returns its id."""
        now = time.time()
        with self.transaction() as tx:
            command_id = self._insert_id(
                tx, "INSERT INTO commands(created, kind, payload, status, applied_step, source, "
                "updated) VALUES (?, ?, ?, 'applied', ?, ?, ?)",
                (now, kind, json.dumps(payload), applied_step, source, now))
            self._insert_events(tx, [(*e[:6], command_id, *e[7:]) for e in events])
        return command_id

    # --- events --------------------------------------------------------------------------------

    @staticmethod
    def _insert_events(tx: Any, events: Sequence[tuple]) -> None:
        tx.executemany("INSERT INTO events(step, wall, kind, knob, old, new, command_id, message)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events)

    def add_events(self, events: Sequence[tuple]) -> None:
        """Insert ``(step, wall, kind, knob, old, new, command_id, message)`` events."""
        with self.transaction() as tx:
            self._insert_events(tx, events)

    def events_since(self, after_id: int = 0) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM events WHERE id > ? ORDER BY id", (after_id,))

    # --- results -------------------------------------------------------------------------------

    def add_result(self, kind: str, payload: dict, *, status: str = "done") -> int:
        with self.transaction() as tx:
            return self._insert_id(tx, "INSERT INTO results(created, kind, status, payload) "
                                   "VALUES (?, ?, ?, ?)",
                                   (time.time(), kind, status, json.dumps(payload)))

    def update_result(self, result_id: int, payload: dict, *, status: str) -> None:
        with self.transaction() as tx:
            tx.execute("UPDATE results SET payload = ?, status = ? WHERE id = ?",
                       (json.dumps(payload), status, result_id))

    def results(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Stored results (newest last), payload decoded."""
        rows = (self._dicts("SELECT * FROM results ORDER BY id", ()) if kind is None else
                self._dicts("SELECT * FROM results WHERE kind = ? ORDER BY id", (kind,)))
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    # --- summary -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What ``panda status`` shows: state, step, epoch and current knob values."""
        meta = self.meta()
        last = self.last_metric() or {}
        knobs = meta.get("knobs", {})
        state = meta.get("status", "created")
        heartbeat = meta.get("heartbeat")
        if state in RUNNING_STATES and heartbeat is not None and _trainer_gone(
                heartbeat, meta.get("pid"), meta.get("host")):
            state = "interrupted"  # the trainer died without saying so (kill -9, power cut)
        return {
            "run": meta.get("name", self.name),
            "run_dir": str(self.run_dir),
            "address": self.shown_address,
            "store": self.backend,
            "state": state,
            "step": meta.get("step", last.get("step", -1) + 1),
            "epoch": meta.get("epoch", last.get("epoch", 0)),
            "loss": last.get("loss"),
            "lr": knobs.get("lr", last.get("lr")),
            "momentum": knobs.get("momentum", last.get("momentum")),
            "weight_decay": knobs.get("weight_decay", last.get("weight_decay")),
            "schedule": meta.get("schedule"),
            "task": meta.get("task"),
            "optimizer": meta.get("optimizer"),
            "created": meta.get("created"),
            "heartbeat": heartbeat,
        }

    def _dicts(self, sql: str, params: tuple) -> list[dict[str, Any]]:
        cur = self._conn().execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK``) on one connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _trainer_gone(heartbeat: float, pid: Any, host: Any) -> bool:
    """A trainer is gone when its process is dead (same host) or, elsewhere, when its
    heartbeat is stale. A live process with a stale heartbeat is busy, not gone."""
    if host == socket.gethostname() and isinstance(pid, int):
        return not pid_alive(pid)
    return time.time() - heartbeat > HEARTBEAT_STALE_S


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead, not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
