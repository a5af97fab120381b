"""The run store's tables, defined once and rendered for SQLite and PostgreSQL.

A run holds these tables (the same in both backends, so every query in
:class:`~trainer.store.base.RunStore` runs unchanged on either):

* ``meta``       key → JSON value: name, task, optimizer, config, created, status, heartbeat …
* ``metrics``    one row per optimizer step: step, epoch, wall, loss, and the lr, momentum and
  weight_decay the update used (user_lr: the LR the user's own code or scheduler had set)
* ``validation`` one row per named metric per evaluation: step, epoch, wall, name, value
* ``commands``   id, created, kind, payload (JSON), status, applied_step, error, source
* ``events``     intervention events, drawn as chart markers: step, wall, kind, knob, old, new
* ``results``    JSON results attached to the run (e.g. LR range tests)
* ``batches``    ids of write batches already applied (idempotent retries)
* ``levels``     the metrics' levels of detail: a pyramid of per-bucket summaries (see
  :data:`LEVEL_SIZES`), kept up to date by every metrics write, so a chart of a long run reads
  thousands of rows instead of millions

Column types are abstract (``int``, ``real``, ``text``, ``id``) and each backend maps them to
its own: SQLite's REAL is 8 bytes while PostgreSQL's is 4, so ``real`` is DOUBLE PRECISION
there; ``id`` is an AUTOINCREMENT key in SQLite and an identity column in PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2   # 2: metrics.user_lr (the user's own LR), batches (idempotent retries),
                     #    levels (the metrics' levels of detail)


@dataclass(frozen=True)
class Column:
    name: str
    type: str               # int | real | text | id
    constraint: str = ""    # e.g. "PRIMARY KEY", "NOT NULL", "NOT NULL DEFAULT 'pending'"


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    indexes: tuple[tuple[str, str], ...] = ()   # (index name, column list)
    primary_key: tuple[str, ...] = ()           # a key of several columns
    # SQLite only: store the rows in the primary key's B-tree (no rowid), so a range of the key
    # is read from adjacent pages (https://sqlite.org/withoutrowid.html).
    without_rowid: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _c(name: str, type_: str, constraint: str = "") -> Column:
    return Column(name, type_, constraint)


META = Table("meta", (_c("key", "text", "PRIMARY KEY"), _c("value", "text", "NOT NULL")))
METRICS = Table("metrics", (
    _c("step", "int", "PRIMARY KEY"), _c("epoch", "int", "NOT NULL"),
    _c("wall", "real", "NOT NULL"), _c("loss", "real"), _c("lr", "real"),
    _c("momentum", "real"), _c("weight_decay", "real"), _c("user_lr", "real")))
VALIDATION = Table("validation", (
    _c("id", "id"), _c("step", "int", "NOT NULL"), _c("epoch", "int", "NOT NULL"),
    _c("wall", "real", "NOT NULL"), _c("name", "text", "NOT NULL"), _c("value", "real")))
COMMANDS = Table("commands", (
    _c("id", "id"), _c("created", "real", "NOT NULL"), _c("kind", "text", "NOT NULL"),
    _c("payload", "text", "NOT NULL DEFAULT '{}'"),
    _c("status", "text", "NOT NULL DEFAULT 'pending'"), _c("applied_step", "int"),
    _c("error", "text"), _c("source", "text", "NOT NULL DEFAULT 'api'"), _c("updated", "real")),
    indexes=(("commands_status", "status, id"),))
EVENTS = Table("events", (
    _c("id", "id"), _c("step", "int", "NOT NULL"), _c("wall", "real", "NOT NULL"),
    _c("kind", "text", "NOT NULL"), _c("knob", "text"), _c("old", "real"), _c("new", "real"),
    _c("command_id", "int"), _c("message", "text")))
RESULTS = Table("results", (
    _c("id", "id"), _c("created", "real", "NOT NULL"), _c("kind", "text", "NOT NULL"),
    _c("status", "text", "NOT NULL"), _c("payload", "text", "NOT NULL DEFAULT '{}'")))

# Ids of the write batches already applied: a batch retried after a dropped connection (the
# commit may have landed before the error) is recognised and not written twice.
BATCHES = Table("batches", (_c("id", "text", "PRIMARY KEY"), _c("wall", "real", "NOT NULL")))

# Levels of detail of the metrics (a pyramid, as in image mip-maps: Williams, "Pyramidal
# parametrics", SIGGRAPH 1983). Level k cuts the steps into buckets of LEVEL_SIZES[k - 1] steps
# (bucket b holds steps b·size … (b+1)·size − 1); a level-1 bucket summarizes 32 raw rows, a
# level-k bucket LEVEL_FANOUT buckets of level k − 1. A chart reads the finest level with at
# most VIEW_BUCKETS (8,192) buckets over its range (trainer.store.base), so between 1/8 of that
# budget and all of it. Level 1 is what every logged row pays for (benchmarks/append_cost.py):
# with 32 rows a bucket the levels cost 1.1 ms of SQLite time per 1,000 rows, with 8 rows
# 1.7 ms (measured side by side while choosing); a range just too long to read raw
# (RAW_VIEW_STEPS = 32 × 1,024) still gets 1,024 buckets.
LEVEL_FANOUT = 8
LEVEL_SIZES = tuple(32 * LEVEL_FANOUT ** k for k in range(6))  # 32 … 1,048,576 steps a bucket
# What a bucket holds: the M4 summary (first, last, min and max of the loss, with the steps of
# the extremes: Jugel et al., "M4: A Visualization-Oriented Time Series Data Aggregation",
# VLDB 2014, which draws a line chart without error from these four per pixel column), the
# count and first step of non-finite losses (stored NULL: they stay visible as spikes at every
# level), the sum of the finite losses (for the mean the smoothed curve is drawn from), and
# the lr and user_lr at the bucket's first and last step with the step where the last value
# began (``*_since``), so a change of LR is drawn at its own step, not at a bucket's edge.
LEVELS = Table("levels", (
    _c("level", "int", "NOT NULL"), _c("bucket", "int", "NOT NULL"),
    _c("first_step", "int", "NOT NULL"), _c("last_step", "int", "NOT NULL"),
    _c("steps", "int", "NOT NULL"), _c("nonfinite", "int", "NOT NULL"),
    _c("nonfinite_step", "int"), _c("first_loss", "real"), _c("last_loss", "real"),
    _c("min_loss", "real"), _c("min_loss_step", "int"), _c("max_loss", "real"),
    _c("max_loss_step", "int"), _c("loss_sum", "real"),
    _c("lr_first", "real"), _c("lr_last", "real"), _c("lr_since", "int"),
    _c("user_lr_first", "real"), _c("user_lr_last", "real"), _c("user_lr_since", "int"),
    _c("wall", "real")),
    primary_key=("level", "bucket"), without_rowid=True)

LEVELS_SINCE = 2          # the schema version that added LEVELS

TABLES = (META, METRICS, VALIDATION, COMMANDS, EVENTS, RESULTS, BATCHES, LEVELS)
METRIC_COLUMNS = METRICS.column_names
LEVEL_COLUMNS = LEVELS.column_names

TYPES = {
    "sqlite": {"int": "INTEGER", "real": "REAL", "text": "TEXT",
               "id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"int": "BIGINT", "real": "DOUBLE PRECISION", "text": "TEXT",
                   "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"},
}


def table_statements(table: Table, dialect: str) -> list[str]:
    """``CREATE TABLE`` / ``CREATE INDEX`` statements for ``table``, in ``dialect``."""
    types = TYPES[dialect]
    columns = [f"{c.name} {types[c.type]} {c.constraint}".rstrip() for c in table.columns]
    if table.primary_key:
        columns.append(f"PRIMARY KEY ({', '.join(table.primary_key)})")
    options = " WITHOUT ROWID" if table.without_rowid and dialect == "sqlite" else ""
    return [f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(columns)}){options}",
            *(f"CREATE INDEX IF NOT EXISTS {name} ON {table.name}({cols})"
              for name, cols in table.indexes)]


def create_statements(dialect: str) -> list[str]:
    """``CREATE TABLE`` / ``CREATE INDEX`` statements for every table, in ``dialect``."""
    return [sql for table in TABLES for sql in table_statements(table, dialect)]


# Statements that bring a store from version v − 1 to v (older runs still open): SQL with the
# abstract types as {placeholders}, or a Table to create. A migrated store's levels are then
# built from its rows (RunStore._migrated).
MIGRATIONS: dict[int, list[str | Table]] = {
    2: ["ALTER TABLE metrics ADD COLUMN user_lr {real}",
        "CREATE TABLE IF NOT EXISTS batches (id {text} PRIMARY KEY, wall {real} NOT NULL)",
        LEVELS]}


def migration_statements(version: int, dialect: str) -> list[str]:
    """Statements that bring a store at ``version`` to :data:`SCHEMA_VERSION`."""
    types = TYPES[dialect]
    return [sql for v in range(version + 1, SCHEMA_VERSION + 1) for step in MIGRATIONS.get(v, [])
            for sql in (table_statements(step, dialect) if isinstance(step, Table)
                        else [step.format(**types)])]


def upsert_metrics_tail() -> str:
    """The ``ON CONFLICT`` clause that makes a metrics insert an upsert (both dialects)."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in METRIC_COLUMNS if c != "step")
    return f"ON CONFLICT(step) DO UPDATE SET {updates}"
