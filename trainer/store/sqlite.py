"""The default run store: one SQLite file per run (``runs/<run>/run.db``).

SQLite in WAL mode allows one writer and many concurrent readers, and a committed transaction
survives ``kill -9`` of the writer (https://sqlite.org/wal.html). ``synchronous=NORMAL`` in WAL
mode keeps every commit safe from process crashes; only an OS crash or power cut can lose the
last transactions, never corrupt the file. The schema version is ``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import sqlite3

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None
import functools
import itertools
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from trainer.store.base import RunBusy, RunStore, StoreError
from trainer.store.schema import (
    METRIC_COLUMNS,
    SCHEMA_VERSION,
    create_statements,
    migration_statements,
    upsert_metrics_tail,
)

DB_NAME = "run.db"
LOCK_NAME = "trainer.lock"  # held (flock) by the one process training the run
BUSY_TIMEOUT_MS = 10_000  # writers wait this long for the lock instead of failing
SCHEMA_WAIT_S = 2.0       # how long a reader waits for a store that is being created
ROWS_PER_INSERT = 256     # metric rows per INSERT statement, at most (see _insert_metrics)
VARIABLE_LIMIT = 999      # parameters a statement may bind where the library cannot tell
# (SQLITE_MAX_VARIABLE_NUMBER: 999 before SQLite 3.32, 32,766 since; Connection.getlimit
# needs Python 3.11)


@functools.cache
def _upsert_rows(rows: int) -> str:
    """``INSERT INTO metrics … VALUES (…), (…) … ON CONFLICT …`` for ``rows`` rows (each row
    in turn: a step repeated within the statement updates the row inserted before it)."""
    row = "(" + ", ".join("?" for _ in METRIC_COLUMNS) + ")"
    return (f"INSERT INTO metrics({', '.join(METRIC_COLUMNS)}) VALUES "
            + ", ".join([row] * rows) + " " + upsert_metrics_tail())


class SqliteStore(RunStore):
    """One run's ``run.db``. Each thread gets its own SQLite connection (a connection must not
    be used from two threads at once)."""

    backend = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, run_dir: str | os.PathLike, *, create: bool = False):
        run_dir = Path(run_dir)
        super().__init__(name=run_dir.name, address=str(run_dir), shown_address=str(run_dir),
                         run_dir=run_dir)
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
        if 0 < version < SCHEMA_VERSION:
            with self.transaction() as tx:  # an older run: add what this version needs
                if tx.execute("PRAGMA user_version").fetchone()[0] == version:
                    for statement in migration_statements(version, "sqlite"):
                        tx.execute(statement)
                    self._migrated(tx, version)
                    tx.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version == SCHEMA_VERSION and not self._has_levels(conn):
            with self.transaction() as tx:  # checked again under the write lock
                if not self._has_levels(tx):
                    self._add_levels(tx)
        if version == 0:
            if not create:
                raise StoreError(f"{self.path} is not a Panda run store (no schema)")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"cannot switch {self.path} to WAL mode")
            with self.transaction() as tx:
                # Statement by statement: executescript() would COMMIT the open transaction.
                for statement in create_statements("sqlite"):
                    tx.execute(statement)
                tx.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _has_levels(conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'levels'").fetchone() is not None

    def lock_trainer(self) -> int | None:
        """An exclusive ``flock`` on ``run_dir/trainer.lock``, held while this process trains
        the run: the kernel releases it when the process ends, kill -9 included, so a stale
        lock cannot exist on this host (https://man7.org/linux/man-pages/man2/flock.2.html).
        Returns the file descriptor (close it to release), or raises RunBusy."""
        if fcntl is None:  # no flock on this platform: the store's lease alone
            return None
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            meta = self.meta()
            raise RunBusy(f"run {meta.get('name', self.name)} is being trained by pid "
                          f"{meta.get('pid')} on {meta.get('host')} (it holds {path}): stop "
                          f"it first (panda stop {meta.get('name', self.name)})") from None
        return fd

    def transaction(self) -> _Transaction:
        """One IMMEDIATE transaction on this thread's connection."""
        return _Transaction(self._conn())

    @staticmethod
    def _insert_metrics(tx: sqlite3.Connection, columns: Sequence[Sequence]) -> None:
        """Multi-row ``INSERT … VALUES`` statements rather than ``executemany``: the sqlite3
        module releases the GIL around every row's ``sqlite3_step``, so ``executemany`` hands
        the GIL to the training thread and takes it back once per row (a futex wake and a
        context switch each), where a statement of 256 rows binds them in one C loop and
        releases it once. Chunks are 256 rows, then powers of two, so at most nine
        statements are ever prepared (the module caches them by text)."""
        rows = list(zip(*columns))
        getlimit = getattr(tx, "getlimit", None)
        limit = VARIABLE_LIMIT if getlimit is None else \
            getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        most = max(1, min(ROWS_PER_INSERT, limit // len(METRIC_COLUMNS)))
        start = 0
        while start < len(rows):
            left = len(rows) - start
            count = most if left >= most else 1 << (left.bit_length() - 1)
            tx.execute(_upsert_rows(count),
                       list(itertools.chain.from_iterable(rows[start:start + count])))
            start += count

    @staticmethod
    def _insert_id(tx: sqlite3.Connection, sql: str, params: tuple) -> int:
        return int(tx.execute(sql, params).lastrowid)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK``) on one connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
