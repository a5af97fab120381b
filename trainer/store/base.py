"""The run store interface: the only bridge between Panda's processes.

Trainers, dashboards and the CLI never talk to each other directly; they read and write a run
store. :class:`RunStore` is the interface both backends implement, and it holds every query:
the SQL below is written in the dialect SQLite and PostgreSQL share, so a backend supplies
only connections, transactions, the schema (:mod:`trainer.store.schema`), how an insert
returns its id and how a batch of metric rows is sent:

* :class:`~trainer.store.sqlite.SqliteStore`: one file per run (``runs/<run>/run.db``), the
  default;
* :class:`~trainer.store.postgres.PostgresStore`: runs in a PostgreSQL database, shared by
  trainers and dashboards on different machines.

Every read method is incremental ("everything after X"), so a dashboard fetches only new rows;
a long run's history is read at a level of detail the store keeps up to date
(:meth:`RunStore.metrics_view`). Rows are the named types of :mod:`trainer.store.records`.
"""

from __future__ import annotations

import abc
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.store.records import Event, MetricRow, ValidationRow, Verdict
from trainer.store.schema import (
    LEVEL_COLUMNS,
    LEVEL_FANOUT,
    LEVEL_SIZES,
    LEVELS,
    LEVELS_SINCE,
    METRIC_COLUMNS,
    table_statements,
)

HEARTBEAT_STALE_S = 3.0   # a live trainer updates its heartbeat every flush (0.25 s)

# A diverged run is alive: its trainer waits (paused) for a rollback or a resume.
RUNNING_STATES = ("starting", "running", "paused", "diverged")
FINAL_STATES = ("stopped", "finished", "failed")

# Upserts in the SQL both backends speak (SQLite ≥ 3.24 and PostgreSQL ≥ 9.5).
UPSERT_META = ("INSERT INTO meta(key, value) VALUES (?, ?) "
               "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
_LOSS = MetricRow._fields.index("loss")

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# --- levels of detail (the ``levels`` table, see trainer.store.schema) ---------------------------
#
# One statement per level recomputes the buckets covering a range of steps from their children
# (level 1 from the raw rows, level k from level k − 1), inside the write transaction that
# changed the rows: SQL does the aggregation, Python only sends one statement per level. A
# bucket is recomputed, never merged, so rewritten steps (upserts, retried batches) and
# truncations stay exact. Steps are non-negative, so ``/`` (integer division, truncating in
# both dialects) is floor division.
VIEW_BUCKETS = 8192        # a view reads at most this many buckets (so at least 1,024: about
                           # one per pixel column of a chart, see LEVEL_SIZES) …
RAW_VIEW_STEPS = 32_768    # … and raw rows when its range spans at most this many steps
LOSS_SUM_CAP = 1e300       # losses are clipped to ±this in loss_sum: a sum of 10^8 of them
                           # stays finite (PostgreSQL raises on a float8 overflow)
UNSET = -1.0               # stands for NULL in knob comparisons (knob values are ≥ 0)

# A child of a level-1 bucket is a raw row: its summary columns, from the metrics columns
# ({a} is the table alias and its dot, or nothing).
_RAW_CHILD = {
    "key": "{a}step", "first_step": "{a}step", "last_step": "{a}step", "steps": "1",
    "nonfinite": "CASE WHEN {a}loss IS NULL THEN 1 ELSE 0 END",
    "nonfinite_step": "CASE WHEN {a}loss IS NULL THEN {a}step END",
    "first_loss": "{a}loss", "last_loss": "{a}loss", "min_loss": "{a}loss",
    "min_loss_step": "{a}step", "max_loss": "{a}loss", "max_loss_step": "{a}step",
    "loss_sum": (f"CASE WHEN {{a}}loss > {LOSS_SUM_CAP!r} THEN {LOSS_SUM_CAP!r} "
                 f"WHEN {{a}}loss < {-LOSS_SUM_CAP!r} THEN {-LOSS_SUM_CAP!r} ELSE {{a}}loss END"),
    "lr_first": "{a}lr", "lr_last": "{a}lr", "lr_since": "{a}step",
    "user_lr_first": "{a}user_lr", "user_lr_last": "{a}user_lr", "user_lr_since": "{a}step",
    "wall": "{a}wall"}
_LEVEL_CHILD = {"key": "{a}bucket", **{c: "{a}" + c for c in LEVEL_COLUMNS[2:]}}


def _since(knob: str, child, last, children: str) -> str:
    """The step where the bucket's last ``knob`` value began: after the latest child that
    ends on another value, or at the latest child's own ``since`` where the value changed
    inside it; the bucket's first step when the value never changed in it. (Skipping this
    lookup for buckets whose knob held still, via MIN = MAX aggregates, saved nothing at a
    constant LR and cost 10 % under a per-step schedule: measured, not kept.)"""
    value = f"COALESCE({last(knob + '_last')}, {UNSET!r})"
    return (f"COALESCE((SELECT MAX(CASE WHEN COALESCE({child(knob + '_last')}, {UNSET!r}) "
            f"<> {value} THEN {child('last_step')} + 1 "
            f"WHEN COALESCE({child(knob + '_first')}, {UNSET!r}) <> {value} "
            f"OR {child(knob + '_since')} > {child('first_step')} "
            f"THEN {child(knob + '_since')} END) {children}), g.first_step)")


def _level_sql(level: int) -> str:
    """The statement that recomputes level ``level``'s buckets from their children whose key
    (step, or bucket of the level below) lies in [?, ?): an upsert of one row per bucket.

    Per bucket: aggregates of the children (first/last step, counts, min, max, sums), the first
    and the last child (joined by key: first/last loss, knob values, wall), and four lookups
    among the bucket's children (the steps of the min and of the max, where each knob's last
    value began). Every lookup is a range of the children's primary key."""
    raw = level == 1
    table = "metrics" if raw else "levels"
    exprs = _RAW_CHILD if raw else _LEVEL_CHILD
    where = "" if raw else f"{{a}}level = {level - 1} AND "
    divisor = LEVEL_SIZES[0] if raw else LEVEL_FANOUT

    def col(alias: str):
        return lambda name: exprs[name].format(a=alias)

    g, c, f, last = col(""), col("c."), col("f."), col("l.")
    children = (f"FROM {table} c WHERE {where.format(a='c.')}{c('key')} "
                "BETWEEN g.k0 AND g.k1")
    group = (f"SELECT {g('key')} / {divisor} AS bucket, MIN({g('key')}) AS k0, "
             f"MAX({g('key')}) AS k1, MIN({g('first_step')}) AS first_step, "
             f"MAX({g('last_step')}) AS last_step, SUM({g('steps')}) AS steps, "
             f"SUM({g('nonfinite')}) AS nonfinite, MIN({g('nonfinite_step')}) AS nonfinite_step, "
             f"MIN({g('min_loss')}) AS min_loss, MAX({g('max_loss')}) AS max_loss, "
             f"SUM({g('loss_sum')}) AS loss_sum FROM {table} "
             f"WHERE {where.format(a='')}{g('key')} >= ? AND {g('key')} < ? "
             f"GROUP BY {g('key')} / {divisor}")
    values = {
        "level": str(level), "bucket": "g.bucket", "first_step": "g.first_step",
        "last_step": "g.last_step", "steps": "g.steps", "nonfinite": "g.nonfinite",
        "nonfinite_step": "g.nonfinite_step", "first_loss": f("first_loss"),
        "last_loss": last("last_loss"), "min_loss": "g.min_loss",
        "min_loss_step": f"(SELECT MIN({c('min_loss_step')}) {children} "
                         f"AND {c('min_loss')} = g.min_loss)",
        "max_loss": "g.max_loss",
        "max_loss_step": f"(SELECT MIN({c('max_loss_step')}) {children} "
                         f"AND {c('max_loss')} = g.max_loss)",
        "loss_sum": "g.loss_sum", "wall": last("wall"),
        **{f"{knob}_{part}": expr for knob in ("lr", "user_lr") for part, expr in (
            ("first", f(f"{knob}_first")), ("last", last(f"{knob}_last")),
            ("since", _since(knob, c, last, children)))},
    }
    join = "" if raw else f"f.level = {level - 1} AND "
    updates = ", ".join(f"{n} = excluded.{n}" for n in LEVEL_COLUMNS[2:])
    # "WHERE true": SQLite's parser needs a WHERE before ON CONFLICT after a join
    # (https://sqlite.org/lang_upsert.html, "Parsing Ambiguity").
    return (f"INSERT INTO levels({', '.join(LEVEL_COLUMNS)}) "
            f"SELECT {', '.join(values[n] for n in LEVEL_COLUMNS)} FROM ({group}) g "
            f"JOIN {table} f ON {join}{f('key')} = g.k0 "
            f"JOIN {table} l ON {join.replace('f.', 'l.')}{last('key')} = g.k1 "
            f"WHERE true ON CONFLICT(level, bucket) DO UPDATE SET {updates}")


LEVEL_UPSERTS = tuple(_level_sql(k) for k in range(1, len(LEVEL_SIZES) + 1))
RAW_VIEW_COLUMNS = ("step", "wall", "loss", "lr", "user_lr")
LOSS_COLUMNS = frozenset({"loss", "first_loss", "last_loss", "min_loss", "max_loss", "loss_sum"})
# Two subqueries, not MIN and MAX in one: SQLite reads a lone MIN or MAX off the index, but
# both in one SELECT scan the table (https://sqlite.org/optoverview.html#minmax).
EXTENT = "SELECT (SELECT MIN(step) FROM metrics), (SELECT MAX(step) FROM metrics)"


class StoreError(RuntimeError):
    """A run store that cannot be used (missing, corrupt, or from a newer Panda)."""


class RunBusy(StoreError):
    """Another live trainer holds the run (one trainer per run)."""


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


def _all_finite(values: Sequence[float]) -> bool:
    """Whether every value is finite, in C: ``fsum`` propagates a NaN or an inf, and raises on
    +inf with -inf or on finite values whose sum overflows (a diverging run's 1e308s), which
    are read value by value like the rest."""
    try:
        return math.isfinite(math.fsum(values))
    except (ValueError, OverflowError):
        return False


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class RunStore(abc.ABC):
    """Read and write one run. Safe to share between the threads of one process; each
    process opens its own store.

    Attributes: ``name`` (the run's name), ``address`` (what
    :func:`trainer.store.address.open_store` opens it by), ``shown_address`` (the same with any
    password hidden), ``run_dir`` (where its checkpoints live), ``backend`` (``sqlite`` or
    ``postgresql``), ``url`` (a server store's URL, else None) and ``errors`` (the driver's
    exceptions for a store that is briefly unreachable: background threads retry on them).
    """

    backend: str = ""
    url: str | None = None
    errors: tuple[type[Exception], ...] = ()

    def __init__(self, *, name: str, address: str, shown_address: str,
                 run_dir: str | os.PathLike):
        self.name = name
        self.address = address
        self.shown_address = shown_address
        self.run_dir = Path(run_dir)

    # --- what a backend supplies ---------------------------------------------------------------

    @abc.abstractmethod
    def _conn(self) -> Any:
        """This thread's connection (``execute`` / ``executemany`` with ``?`` placeholders)."""

    @abc.abstractmethod
    def transaction(self) -> Any:
        """Context manager: one write transaction (writers of a run are serialized)."""

    @staticmethod
    @abc.abstractmethod
    def _insert_id(tx: Any, sql: str, params: tuple) -> int:
        """Run one INSERT and return the id it gave its row."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection this store opened (from any thread)."""

    @staticmethod
    @abc.abstractmethod
    def _insert_metrics(tx: Any, columns: Sequence[Sequence[Any]]) -> None:
        """Upsert a batch of metric rows given as columns (one sequence per ``MetricRow``
        field), in as few statements as the backend allows: each statement is a hand-over of
        the GIL to the training thread (see :func:`trainer.workers.to_floats`)."""

    def lock_trainer(self) -> Any:
        """A lock only one trainer process can hold (released with the returned handle, see
        :func:`release`); None where the store has no such lock (the lease of :meth:`claim`
        does the job alone)."""
        return None

    def wait_for_commands(self, timeout: float, stop: threading.Event) -> None:
        """Block until new commands may be pending: ``timeout`` seconds, or until ``stop`` is
        set. A store that cannot notify is polled; a server store returns as soon as a
        command is committed."""
        stop.wait(timeout)

    def wake_command_waiters(self) -> None:  # noqa: B027 (a hook: no-op unless overridden)
        """Make :meth:`wait_for_commands` return now in every process (no-op by default)."""

    def _notify_commands(self, tx: Any) -> None:  # noqa: B027 (a hook, like the above)
        """Called inside the transaction that adds a pending command (no-op by default)."""

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- meta ----------------------------------------------------------------------------------

    def set_meta(self, **values: Any) -> None:
        """Store JSON-serializable metadata values (run name, config, status, …)."""
        rows = [(key, json.dumps(value)) for key, value in values.items()]
        with self.transaction() as tx:
            tx.executemany(UPSERT_META, rows)

    def meta(self) -> dict[str, Any]:
        rows = self._conn().execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    # --- metrics -------------------------------------------------------------------------------

    def append_metrics(self, rows: Sequence[MetricRow], *, meta: dict | None = None) -> None:
        """Upsert metric rows (losses as numbers) in one commit; see
        :meth:`append_metric_columns`. A row may leave out ``user_lr``."""
        full = [MetricRow(*r) for r in rows]
        self.append_metric_columns(list(zip(*full)) if full else [], meta=meta)

    def append_metric_columns(self, columns: Sequence[Sequence[Any]], *,
                              meta: dict | None = None) -> None:
        """Upsert a batch given as columns, one sequence per :class:`MetricRow` field (what
        the flusher holds: the transpose of its rows, made in C by ``zip(*rows)``, so no
        per-row Python work runs while it holds the GIL the training loop needs).

        Non-finite losses are stored as NULL (SQLite has no NaN) and read back as NaN. ``meta``
        values (e.g. the heartbeat) are written in the same transaction.
        """
        columns = list(columns)
        if columns and not _all_finite(columns[_LOSS]):
            columns[_LOSS] = [_finite_or_none(v) for v in columns[_LOSS]]
        with self.transaction() as tx:
            if columns and columns[0]:
                self._insert_metrics(tx, columns)
                # The levels of the steps written: their range by min and max, in C.
                self._refresh_levels(tx, min(columns[0]), max(columns[0]))
            if meta:
                tx.executemany(UPSERT_META, [(k, json.dumps(v)) for k, v in meta.items()])

    def metrics_since(self, after_step: int = -1, *,
                      columns: Iterable[str] = METRIC_COLUMNS) -> dict[str, list]:
        """Metric columns for every step after ``after_step``, as ``{column: list}``."""
        cols = list(columns)
        if not set(cols) <= set(METRIC_COLUMNS):
            raise ValueError(f"unknown metric column in {cols}")
        rows = self._conn().execute(
            f"SELECT {', '.join(cols)} FROM metrics WHERE step > ? ORDER BY step",
            (after_step,)).fetchall()
        return _columns(rows, cols)

    def last_metric(self) -> dict[str, Any] | None:
        """The newest metrics row, or None before the first step."""
        cur = self._conn().execute("SELECT * FROM metrics ORDER BY step DESC LIMIT 1")
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def truncate_after(self, step: int) -> None:
        """Forget metrics, validation and events logged at or after ``step``: a resume trains
        those steps again, so what happened in them (the lost future) is logged anew. The
        commands table keeps every command sent, as history."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM metrics WHERE step >= ?", (step,))
            tx.execute("DELETE FROM validation WHERE step >= ?", (step,))
            tx.execute("DELETE FROM events WHERE step >= ?", (step,))
            # Every bucket holding a forgotten step goes (a range of the primary key per
            # level); the one cut in two is rebuilt from the steps it keeps.
            tx.executemany("DELETE FROM levels WHERE level = ? AND bucket >= ?",
                           [(level, step // size)
                            for level, size in enumerate(LEVEL_SIZES, start=1)])
            if step > 0:
                self._refresh_levels(tx, step - 1, step - 1)

    # --- levels of detail ------------------------------------------------------------------------

    @staticmethod
    def _refresh_levels(tx: Any, first: int, last: int) -> None:
        """Inside a write transaction: recompute, level by level, every bucket that holds a
        step in [first, last] (see LEVEL_UPSERTS)."""
        for level, (size, sql) in enumerate(zip(LEVEL_SIZES, LEVEL_UPSERTS), start=1):
            per_bucket = size if level == 1 else LEVEL_FANOUT  # children's keys per bucket
            tx.execute(sql, ((first // size) * per_bucket, (last // size + 1) * per_bucket))

    def _migrated(self, tx: Any, version: int) -> None:
        """Inside the transaction that brought a store from ``version`` to the current schema:
        build what the new tables hold (the levels of a run that had none)."""
        if version < LEVELS_SINCE:
            self._build_levels(tx)

    def _add_levels(self, tx: Any) -> None:
        """Inside a write transaction: create and fill the levels of a run written by a
        development build of schema 2 that had no levels yet."""
        for statement in table_statements(LEVELS, self.backend):
            tx.execute(statement)
        self._build_levels(tx)

    @classmethod
    def _build_levels(cls, tx: Any) -> None:
        """Inside a write transaction: (re)build every level from the raw rows (a run written
        before the levels existed; benchmarks that fill a store with SQL)."""
        tx.execute("DELETE FROM levels")
        first, last = tx.execute(EXTENT).fetchone()
        if first is not None:
            cls._refresh_levels(tx, first, last)

    def metrics_extent(self) -> tuple[int, int] | None:
        """The first and the last step logged, or None before the first."""
        first, last = self._conn().execute(EXTENT).fetchone()
        return None if first is None else (first, last)

    def metrics_view(self, first: int | None = None, last: int | None = None, *,
                     max_buckets: int = VIEW_BUCKETS, raw_steps: int = RAW_VIEW_STEPS,
                     level: int | None = None) -> dict[str, Any]:
        """The metrics of steps ``first`` … ``last`` (inclusive; None: the run's own ends) at
        the finest level of detail that fits: ``{"level": k, "size": steps per bucket, column:
        list, …}``.

        A range of at most ``raw_steps`` steps is read raw (level 0, size 1: the columns
        ``step``, ``wall``, ``loss``, ``lr``, ``user_lr``, one row per step); a longer one from
        the finest level with at most ``max_buckets`` buckets over it (the columns of
        :data:`~trainer.store.schema.LEVELS` but ``level`` and ``bucket``, one row per bucket,
        in step order; the buckets at the ends may reach outside the range). ``level`` reads
        that level (0: raw) whatever the range. Non-finite losses read back as NaN, and a
        bucket counts them in ``nonfinite``, first at ``nonfinite_step``.
        """
        extent = self.metrics_extent()
        low = extent and max(extent[0], extent[0] if first is None else first)
        high = extent and min(extent[1], extent[1] if last is None else last)
        if extent is None or high < low:
            return {"level": 0, "size": 1, **{c: [] for c in RAW_VIEW_COLUMNS}}
        span = high - low + 1
        if level is None:
            level = 0 if span <= raw_steps else next(
                (k for k, size in enumerate(LEVEL_SIZES, start=1)
                 if -(-span // size) <= max_buckets), len(LEVEL_SIZES))
        if level == 0:
            rows = self._conn().execute(
                f"SELECT {', '.join(RAW_VIEW_COLUMNS)} FROM metrics WHERE step >= ? AND "
                "step <= ? ORDER BY step", (low, high)).fetchall()
            size, columns = 1, RAW_VIEW_COLUMNS
        else:
            size, columns = LEVEL_SIZES[level - 1], LEVEL_COLUMNS[2:]
            rows = self._conn().execute(
                f"SELECT {', '.join(columns)} FROM levels WHERE level = ? AND bucket >= ? "
                "AND bucket <= ? ORDER BY bucket", (level, low // size, high // size)).fetchall()
        return {"level": level, "size": size, **_columns(rows, columns)}

    # --- validation ----------------------------------------------------------------------------

    @staticmethod
    def _first_time(tx: Any, batch: str | None) -> bool:
        """Inside a write transaction: whether batch ``batch`` is new (and now recorded). A
        retried batch whose first attempt did commit is then skipped, not written twice."""
        if batch is None:
            return True
        if tx.execute("SELECT 1 FROM batches WHERE id = ?", (batch,)).fetchone() is not None:
            return False
        tx.execute("INSERT INTO batches(id, wall) VALUES (?, ?)", (batch, time.time()))
        return True

    def append_validation(self, rows: Sequence[ValidationRow], *,
                          batch: str | None = None) -> None:
        """Insert validation rows (values as numbers); ``batch``: see :meth:`_first_time`."""
        clean = [r._replace(value=_finite_or_none(r.value))
                 for r in map(ValidationRow._make, rows)]
        with self.transaction() as tx:
            if not self._first_time(tx, batch):
                return
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

    def resolve_commands(self, verdicts: Sequence[Verdict], events: Sequence[Event] = (), *,
                         batch: str | None = None) -> None:
        """Record command verdicts and their intervention events in one transaction.

        Only pending commands change, so a command is resolved exactly once.
        """
        now = time.time()
        with self.transaction() as tx:
            if not self._first_time(tx, batch):
                return
            tx.executemany("UPDATE commands SET status = ?, applied_step = ?, error = ?, "
                           "updated = ? WHERE id = ? AND status = 'pending'",
                           [(v.status, v.applied_step, v.error, now, v.command_id)
                            for v in map(Verdict._make, verdicts)])
            self._insert_events(tx, events)

    def record_command(self, kind: str, payload: dict, source: str, applied_step: int,
                       events: Sequence[Event] = (), *, status: str = "applied",
                       error: str | None = None, batch: str | None = None) -> int | None:
        """Record a command that did not pass through the table (API, replay, a branch's
        knobs), with its verdict and its events linked to it; returns its id (None when this
        batch was recorded already)."""
        now = time.time()
        with self.transaction() as tx:
            if not self._first_time(tx, batch):
                return None
            command_id = self._insert_id(
                tx, "INSERT INTO commands(created, kind, payload, status, applied_step, error, "
                "source, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, kind, json.dumps(payload), status,
                 applied_step if status == "applied" else None, error, source, now))
            self._insert_events(tx, [e._replace(command_id=command_id)
                                     for e in map(Event._make, events)])
        return command_id

    # --- events --------------------------------------------------------------------------------

    @staticmethod
    def _insert_events(tx: Any, events: Sequence[Event]) -> None:
        tx.executemany("INSERT INTO events(step, wall, kind, knob, old, new, command_id, message)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events)

    def add_events(self, events: Sequence[Event], *, batch: str | None = None) -> None:
        """Insert intervention events; ``batch``: see :meth:`_first_time`."""
        with self.transaction() as tx:
            if self._first_time(tx, batch):
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

    # --- one trainer per run ---------------------------------------------------------------------

    def claim(self, pid: int, host: str) -> dict[str, Any]:
        """Make process ``pid`` on ``host`` the run's only trainer, in one write transaction
        (writers are serialized, so two trainers starting at once cannot both win).

        A run whose trainer is alive (its status live, and its process running on this host
        or, on another host, its heartbeat fresh) raises :class:`RunBusy` naming it. A stale
        holder (a dead process, a heartbeat older than ``HEARTBEAT_STALE_S`` elsewhere) is
        taken over. Returns what the run said before (``status``, ``pid``, ``host``,
        ``heartbeat``), so a takeover can be recorded and a start that fails put back.
        """
        now = time.time()
        with self.transaction() as tx:
            rows = tx.execute("SELECT key, value FROM meta WHERE key IN "
                              "('status', 'pid', 'host', 'heartbeat', 'name')").fetchall()
            meta = {key: json.loads(value) for key, value in rows}
            holder = {k: meta.get(k) for k in ("pid", "host", "heartbeat")}
            if (meta.get("status") in RUNNING_STATES and holder["heartbeat"] is not None
                    and (holder["pid"], holder["host"]) != (pid, host)
                    and not _trainer_gone(holder["heartbeat"], holder["pid"],
                                          holder["host"])):
                raise RunBusy(f"run {meta.get('name', self.name)} is being trained by pid "
                              f"{holder['pid']} on {holder['host']} (heartbeat "
                              f"{max(0.0, now - holder['heartbeat']):.1f} s ago): stop it "
                              f"first (panda stop {meta.get('name', self.name)})")
            tx.executemany(UPSERT_META, [("pid", json.dumps(pid)), ("host", json.dumps(host)),
                                         ("heartbeat", json.dumps(now)),
                                         ("status", json.dumps("running"))])
        return {"status": meta.get("status"), **holder}

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
            # Why a failed run failed (the exception's one line, as its trainer wrote it).
            "failure": meta.get("error") if state == "failed" else None,
        }

    def _dicts(self, sql: str, params: tuple) -> list[dict[str, Any]]:
        cur = self._conn().execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]



def _columns(rows: list[tuple], names: Sequence[str]) -> dict[str, list]:
    """Rows as ``{column: list}`` (transposed by ``zip``, in C); NULL losses become NaN."""
    columns = list(zip(*rows)) if rows else [()] * len(names)
    return {name: ([math.nan if v is None else v for v in values] if name in LOSS_COLUMNS
                   else list(values)) for name, values in zip(names, columns)}


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
