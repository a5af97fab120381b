"""The run store: the only channel between trainer, dashboard and CLI.

Specification, for both backends (tests taking ``store`` or ``store_root`` run once against
SQLite files and once against a throw-away PostgreSQL server): the schema version is recorded;
a store from a newer Panda is refused with a StoreError (never a raw traceback); every read is
incremental; run names cannot escape the runs directory; one writer, many readers and a command
submitter can use one store from separate processes at once without losing a row. SQLite only:
WAL mode, and files that are not stores are refused.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from helpers import HELPERS, REPO, dead_pid, subprocess_env

from trainer.store import sqlite as store_mod
from trainer.store.address import list_runs, open_store, resolve_run, run_address
from trainer.store.base import StoreError, sanitize_run_name
from trainer.store.schema import SCHEMA_VERSION
from trainer.store.sqlite import DB_NAME, SqliteStore

torch.set_num_threads(1)


def row(step: int, *, epoch: int = 0, loss: float = 1.0, lr: float = 0.01) -> tuple:
    return (step, epoch, 1000.0 + step, loss, lr, 0.9, 0.0)


@pytest.fixture
def store(store_root):
    with open_store(run_address(store_root, "run"), create=True) as s:
        yield s


def _bump_schema(store_root: str, name: str, version: int) -> None:
    """Make run ``name`` look as if a newer Panda wrote it."""
    if store_root.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store_root, autocommit=True) as conn:
            conn.execute("UPDATE panda.runs SET version = %s WHERE name = %s", (version, name))
        return
    conn = sqlite3.connect(os.path.join(store_root, name, DB_NAME))
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()


# --- schema and refusal of foreign files ------------------------------------------------------

def test_new_sqlite_store_records_its_schema_version_and_uses_wal(tmp_path):
    store = SqliteStore(tmp_path / "run", create=True)
    store.close()
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        conn.close()


def test_reopening_an_existing_store_keeps_its_data(store_root):
    address = run_address(store_root, "run")
    with open_store(address, create=True) as s:
        s.set_meta(name="run", config={"batch_size": 32})
        s.append_metrics([row(0), row(1)])
    with open_store(address, create=True) as s:  # create=True on an existing run: no reset
        assert s.metrics_since()["step"] == [0, 1]
    with open_store(address) as s:
        assert s.meta()["config"] == {"batch_size": 32}
        assert s.metrics_since()["step"] == [0, 1]
        assert (s.name, s.address) == ("run", address)


def test_store_from_a_newer_panda_is_refused_with_a_clear_message(store_root):
    address = run_address(store_root, "run")
    open_store(address, create=True).close()
    _bump_schema(store_root, "run", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=r"newer Panda.*upgrade"):
        open_store(address)
    with pytest.raises(StoreError, match="newer Panda"):  # create=True must not "repair" it
        open_store(address, create=True)


@pytest.mark.parametrize("content", [
    b"this is not a database, just text\n" * 200,
    b"SQLite format 3\x00" + bytes(range(256)) * 16,   # right magic, garbage after it
])
def test_a_corrupt_or_foreign_file_is_a_store_error_not_a_traceback(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / DB_NAME).write_bytes(content)
    with pytest.raises(StoreError, match="not a"):
        SqliteStore(tmp_path / "run")


def test_a_sqlite_file_without_panda_schema_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SCHEMA_WAIT_S", 0.1)
    (tmp_path / "run").mkdir()
    conn = sqlite3.connect(tmp_path / "run" / DB_NAME)
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a Panda run store"):
        SqliteStore(tmp_path / "run")


def test_missing_run_is_a_store_error(store_root):
    with pytest.raises(StoreError, match="no run"):
        open_store(run_address(store_root, "nothing-here"))
    assert list_runs(store_root) == []  # opening for reading creates nothing
    open_store(run_address(store_root, "other"), create=True).close()
    with pytest.raises(StoreError, match="no run"):
        open_store(run_address(store_root, "nothing-here"))


# --- round trips and incremental reads --------------------------------------------------------

def test_meta_round_trip_keeps_json_types(store):
    store.set_meta(name="r", config={"a": [1, 2.5, None]}, flag=True)
    store.set_meta(flag=False)  # later values replace earlier ones
    assert store.meta() == {"name": "r", "config": {"a": [1, 2.5, None]}, "flag": False}


def test_metrics_since_returns_only_newer_steps_in_order(store):
    store.append_metrics([row(s, loss=10.0 - s) for s in (2, 0, 1)])
    assert store.metrics_since()["step"] == [0, 1, 2]
    store.append_metrics([row(3), row(4)])
    newer = store.metrics_since(2)
    assert newer["step"] == [3, 4]
    assert set(newer) == {"step", "epoch", "wall", "loss", "lr", "momentum", "weight_decay",
                          "user_lr"}
    assert store.metrics_since(4) == {c: [] for c in newer}
    assert store.metrics_since(0, columns=("step", "loss")) == {"step": [1, 2, 3, 4],
                                                                "loss": [9.0, 8.0, 1.0, 1.0]}


def test_metric_values_round_trip_exactly(store):
    awkward = [1 / 3, 1e-300, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, -2.5e-7]
    store.append_metrics([(2**40 + i, 2**33, 1.7e9 + i / 7, v, v, 0.9, 0.0)
                          for i, v in enumerate(awkward)])
    rows = store.metrics_since()
    assert rows["step"] == [2**40 + i for i in range(len(awkward))]
    assert rows["epoch"] == [2**33] * len(awkward)
    assert rows["loss"] == awkward and rows["lr"] == awkward  # bit for bit, not approx
    assert rows["wall"] == [1.7e9 + i / 7 for i in range(len(awkward))]


@pytest.mark.parametrize("size", [1, 7, 255, 256, 257, 1000])
def test_a_batch_of_any_size_is_written_whole_and_exactly(store, size):
    """SQLite writes a batch as multi-row statements (256 rows, then powers of two): every
    size ends up with every row, in order, bit for bit."""
    store.append_metrics([row(s, loss=1 / (s + 3)) for s in range(size)])
    store.append_metrics([row(size + s, loss=1 / (size + s + 3)) for s in range(size)])
    rows = store.metrics_since(columns=("step", "loss"))
    assert rows == {"step": list(range(2 * size)), "loss": [1 / (s + 3) for s in range(2 * size)]}


def test_sqlite_batches_fit_an_old_library_limit_and_a_repeated_step_keeps_the_last_row(
        tmp_path):
    """Where the sqlite3 module cannot tell SQLite's parameter limit (Python 3.10), statements
    stay under the 999 of SQLite before 3.32; a step repeated within one batch ends up as its
    last row, as one upsert per row would leave it."""

    class OldConnection:  # a connection without Connection.getlimit
        def __init__(self, conn):
            self.conn, self.parameters = conn, []

        def execute(self, sql, params=()):
            self.parameters.append(len(params))
            return self.conn.execute(sql, params)

    with SqliteStore(tmp_path / "r", create=True) as s:
        rows = [row(i % 50, loss=float(i)) for i in range(1000)]  # each step 20 times
        with s.transaction() as tx:
            old = OldConnection(tx)
            SqliteStore._insert_metrics(old, list(zip(*[(*r, None) for r in rows])))
        assert max(old.parameters) <= store_mod.VARIABLE_LIMIT
        assert sum(old.parameters) == 1000 * 8
        got = s.metrics_since(columns=("step", "loss"))
        assert got["step"] == list(range(50))
        assert got["loss"] == [float(950 + i) for i in range(50)]  # the last of each step


def test_metrics_refuses_unknown_columns(store):
    with pytest.raises(ValueError, match="unknown metric column"):
        store.metrics_since(columns=("step", "loss; DROP TABLE metrics"))


@pytest.mark.parametrize("losses", [[1e308, 1e308, 0.5], [math.inf, -math.inf, 0.5]])
def test_a_batch_whose_sum_cannot_be_taken_is_written(store, losses):
    """A diverging run's huge finite losses (their sum overflows) or +inf beside -inf in one
    batch are written like any other (they once failed the flusher, and with it the run)."""
    store.append_metrics([row(s, loss=v) for s, v in enumerate(losses)])
    got = store.metrics_since()["loss"]
    assert got[0] == losses[0] if math.isfinite(losses[0]) else math.isnan(got[0])
    assert got[2] == 0.5 and len(got) == 3


def test_non_finite_losses_are_stored_and_read_back_as_nan(store):
    store.append_metrics([row(0, loss=math.nan), row(1, loss=math.inf), row(2, loss=0.5)])
    losses = store.metrics_since()["loss"]
    assert math.isnan(losses[0]) and math.isnan(losses[1]) and losses[2] == 0.5
    assert store.last_metric()["step"] == 2


def test_last_metric_before_and_after_the_first_step(store):
    assert store.last_metric() is None
    store.append_metrics([row(0), row(1, lr=0.5)])
    assert store.last_metric()["lr"] == 0.5


def test_validation_since_is_incremental_by_id(store):
    store.append_validation([(10, 0, 1.0, "loss", 0.5), (10, 0, 1.0, "accuracy", 0.8)])
    first = store.validation_since()
    assert [(r["name"], r["value"], r["step"]) for r in first] == [
        ("loss", 0.5, 10), ("accuracy", 0.8, 10)]
    store.append_validation([(20, 1, 2.0, "loss", math.nan)])
    newer = store.validation_since(first[-1]["id"])
    assert len(newer) == 1 and newer[0]["step"] == 20 and newer[0]["value"] is None
    assert store.validation_since(newer[-1]["id"]) == []


def test_events_since_is_incremental_by_id(store):
    store.add_events([(5, 1.0, "set", "lr", 0.01, 0.1, None, "lr up")])
    first = store.events_since()
    assert [(e["step"], e["knob"], e["old"], e["new"]) for e in first] == [(5, "lr", 0.01, 0.1)]
    store.add_events([(9, 2.0, "pause", None, None, None, None, "pause")])
    assert [e["kind"] for e in store.events_since(first[0]["id"])] == ["pause"]
    assert store.events_since(10**9) == []


def test_commands_are_resolved_exactly_once_with_their_events(store):
    first = store.submit_command("set", {"lr": 0.1}, source="cli")
    second = store.submit_command("pause")
    assert [c.id for c in store.pending_commands()] == [first, second]
    assert [c.id for c in store.pending_commands(first)] == [second]
    assert json.loads(store.command(first).payload) == {"lr": 0.1}
    assert store.command(first).source == "cli"

    store.resolve_commands([(first, "applied", 7, None)],
                           [(7, 1.0, "set", "lr", 0.01, 0.1, first, "lr")])
    # A second verdict on the same command changes nothing (and adds only its own events).
    store.resolve_commands([(first, "rejected", None, "late")])
    cmd = store.command(first)
    assert (cmd.status, cmd.applied_step, cmd.error) == ("applied", 7, None)
    assert [c.id for c in store.pending_commands()] == [second]
    assert [e["command_id"] for e in store.events_since()] == [first]
    assert [c.id for c in store.commands(first)] == [second]
    assert store.command(10**6) is None


def test_raw_commands_are_stored_verbatim(store):
    cid = store.submit_raw_command("set", "{not json")
    assert store.command(cid).payload == "{not json"
    assert store.command(cid).status == "pending"


def test_record_command_links_its_events(store):
    cid = store.record_command("set", {"lr": 0.2}, "api", 12,
                               [(12, 1.0, "set", "lr", 0.1, 0.2, None, "lr")])
    assert store.command(cid).status == "applied" and store.command(cid).applied_step == 12
    assert store.events_since()[0]["command_id"] == cid


def test_results_round_trip(store):
    rid = store.add_result("lr_find", {"lrs": [1e-3]}, status="running")
    store.update_result(rid, {"lrs": [1e-3, 1e-2]}, status="done")
    store.add_result("other", {})
    results = store.results("lr_find")
    assert len(results) == 1 and results[0]["payload"] == {"lrs": [1e-3, 1e-2]}
    assert results[0]["status"] == "done"
    assert [r["kind"] for r in store.results()] == ["lr_find", "other"]


def test_truncate_after_forgets_rows_from_a_step_on(store):
    store.append_metrics([row(s) for s in range(10)])
    store.append_validation([(5, 0, 1.0, "loss", 1.0), (10, 1, 2.0, "loss", 0.5)])
    store.truncate_after(6)
    assert store.metrics_since()["step"] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in store.validation_since()] == [5]


def test_summary_reports_knobs_and_notices_a_dead_trainer(store):
    assert store.summary()["state"] == "created" and store.summary()["step"] == 0
    store.append_metrics([row(0), row(1)])
    store.set_meta(name="r", status="running", heartbeat=time.time(), pid=os.getpid(),
                   knobs={"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0})
    s = store.summary()
    assert (s["run"], s["state"], s["step"], s["lr"]) == ("r", "running", 2, 0.02)
    # A heartbeat long gone and a pid that does not exist: the trainer was killed.
    store.set_meta(heartbeat=time.time() - 3600, pid=dead_pid())
    assert store.summary()["state"] == "interrupted"


# --- run names --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run-1", "mnist_2.v3", "A", "x" * 100, "1.5e-3"])
def test_safe_run_names_are_accepted(name):
    assert sanitize_run_name(name) == name


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/abs", "a\\b", ".hidden", "",
                                  "x" * 101, "-flag", "a b", "ü", "run\n", None, 3])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid run name"):
        sanitize_run_name(name)


def test_resolve_run_names_and_paths(tmp_path):
    SqliteStore(tmp_path / "runs" / "good", create=True).close()
    assert resolve_run("good", tmp_path / "runs") == tmp_path / "runs" / "good"
    assert resolve_run(str(tmp_path / "runs" / "good")) == tmp_path / "runs" / "good"
    with pytest.raises(ValueError):
        resolve_run(".hidden", tmp_path / "runs")
    with pytest.raises(StoreError):
        resolve_run("../good", tmp_path / "runs" / "sub")  # a path, and no run there
    with pytest.raises(StoreError):
        resolve_run("missing", tmp_path / "runs")


def test_list_runs_newest_first(store_root):
    assert list_runs(store_root) == []
    for i, name in enumerate(["old", "new"]):
        with open_store(run_address(store_root, name), create=True) as s:
            s.set_meta(name=name, created=1000.0 + i, status="finished")
    listed = list_runs(store_root)
    assert [r["run"] for r in listed] == ["new", "old"]
    assert listed[0]["state"] == "finished"
    assert listed[0]["address"] == run_address(store_root, "new")


def test_list_runs_lists_unreadable_sqlite_runs(tmp_path):
    runs = tmp_path / "runs"
    for i, name in enumerate(["old", "new"]):
        with SqliteStore(runs / name, create=True) as s:
            s.set_meta(name=name, created=1000.0 + i, status="finished")
    (runs / "broken").mkdir()
    (runs / "broken" / DB_NAME).write_bytes(b"garbage" * 1000)
    (runs / "not-a-run").mkdir()  # no run.db: not listed
    listed = list_runs(runs)
    assert [r["run"] for r in listed] == ["new", "old", "broken"]
    assert listed[0]["state"] == "finished"
    assert listed[2]["state"] == "unreadable" and listed[2]["error"]


# --- real processes at once -------------------------------------------------------------------

def _role(role: str, address: str, *numbers: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPERS), role, address,
                             *map(str, numbers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)


@pytest.mark.slow
def test_one_writer_two_readers_and_a_commander_in_separate_processes(store_root):
    total, batch, n_commands = 3000, 7, 40
    address = run_address(store_root, "shared")
    open_store(address, create=True).close()
    procs = {"reader1": _role("reader", address, total), "reader2": _role("reader", address, total),
             "commander": _role("commander", address, n_commands),
             "writer": _role("writer", address, total, batch)}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, f"{name} crashed: {err}"
        results[name] = json.loads(out.strip().splitlines()[-1])
        assert "error" not in results[name], f"{name}: {results[name]['error']}\n{err}"

    for reader in ("reader1", "reader2"):
        assert results[reader]["seen"] == total and results[reader]["last"] == total - 1
    ids = results["commander"]["ids"]
    assert len(ids) == n_commands and ids == sorted(ids)
    with open_store(address) as s:
        assert s.metrics_since(columns=("step",))["step"] == list(range(total))
        assert [c.id for c in s.commands()] == ids
        assert [json.loads(c.payload)["lr"] for c in s.commands()] == pytest.approx(
            [0.001 * (i + 1) for i in range(n_commands)])
        assert s.meta()["status"] == "finished"
    if store_root.startswith("postgresql://"):
        return
    conn = sqlite3.connect(os.path.join(address, DB_NAME))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


# --- retried writes and older runs -----------------------------------------------------------

def test_a_retried_batch_is_written_once(store):
    """A write retried after a dropped connection (its first attempt may have committed) is
    recognised by its batch id."""
    from trainer.store.records import Event, ValidationRow, Verdict

    for _ in range(2):
        store.append_validation([ValidationRow(3, 0, 1.0, "loss", 0.5)], batch="v1")
        store.add_events([Event(3, 1.0, "diverged", message="x")], batch="e1")
        store.record_command("set", {"lr": 0.1}, "api", 3, [Event(3, 1.0, "set", "lr")],
                             batch="c1")
    command = store.submit_command("pause")
    for _ in range(2):
        store.resolve_commands([Verdict(command, "applied", 4)],
                               [Event(4, 1.0, "pause")], batch="r1")
    assert len(store.validation_since(0)) == 1
    assert [e["kind"] for e in store.events_since(0)] == ["diverged", "set", "pause"]
    assert len(store.commands()) == 2


def _make_version_1(store_root: str, name: str) -> None:
    """Turn run ``name`` into one an older Panda (schema 1) wrote: no user_lr, no batches."""
    if store_root.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store_root, autocommit=True) as conn:
            (run_id,) = conn.execute("SELECT id FROM panda.runs WHERE name = %s",
                                     (name,)).fetchone()
            conn.execute(f"ALTER TABLE panda_run_{run_id}.metrics DROP COLUMN user_lr")
            conn.execute(f"DROP TABLE panda_run_{run_id}.batches")
            conn.execute("UPDATE panda.runs SET version = 1 WHERE name = %s", (name,))
        return
    conn = sqlite3.connect(os.path.join(store_root, name, DB_NAME))
    conn.execute("ALTER TABLE metrics DROP COLUMN user_lr")
    conn.execute("DROP TABLE batches")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()


def test_a_run_written_by_schema_1_opens_and_is_migrated(store_root):
    address = run_address(store_root, "old")
    with open_store(address, create=True) as store:
        store.append_metrics([(0, 0, 1.0, 0.5, 0.01, 0.9, 0.0)])
    _make_version_1(store_root, "old")
    with open_store(address) as store:
        assert store.metrics_since(-1)["user_lr"] == [None]
        store.append_metrics([(1, 0, 2.0, 0.4, 0.01, 0.9, 0.0, 0.02)])
        store.add_events([], batch="b")
        assert store.metrics_since(-1, columns=("step", "user_lr")) == {
            "step": [0, 1], "user_lr": [None, 0.02]}


# --- levels of detail ---------------------------------------------------------------------------

def _reference_buckets(steps, loss, lr, user_lr, size: int) -> list[dict]:
    """The buckets of ``size`` steps of a series, computed in plain Python (the specification
    of the ``levels`` table: trainer.store.schema.LEVELS)."""
    buckets: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        buckets.setdefault(s // size, []).append(i)
    out = []
    for _, rows in sorted(buckets.items()):
        finite = [i for i in rows if math.isfinite(loss[i])]
        low = min((loss[i] for i in finite), default=None)
        high = max((loss[i] for i in finite), default=None)
        bad = [steps[i] for i in rows if not math.isfinite(loss[i])]

        def since(values, rows=rows):  # where the last value's run began inside the bucket
            start = rows[-1]
            while start > rows[0] and values[start - 1] == values[rows[-1]]:
                start -= 1
            return steps[start]

        out.append({
            "first_step": steps[rows[0]], "last_step": steps[rows[-1]], "steps": len(rows),
            "nonfinite": len(bad), "nonfinite_step": min(bad, default=None),
            "min_loss": low, "max_loss": high,
            "min_loss_step": min((steps[i] for i in finite if loss[i] == low), default=None),
            "max_loss_step": min((steps[i] for i in finite if loss[i] == high), default=None),
            "first_loss": loss[rows[0]] if math.isfinite(loss[rows[0]]) else None,
            "last_loss": loss[rows[-1]] if math.isfinite(loss[rows[-1]]) else None,
            "lr_first": lr[rows[0]], "lr_last": lr[rows[-1]], "lr_since": since(lr),
            "user_lr_first": user_lr[rows[0]], "user_lr_last": user_lr[rows[-1]],
            "user_lr_since": since(user_lr), "wall": 1000.0 + steps[rows[-1]]})
    return out


def _view_buckets(view: dict) -> list[dict]:
    keys = [k for k in view if k not in ("level", "size", "loss_sum")]
    rows = [dict(zip(keys, values)) for values in zip(*(view[k] for k in keys))]
    for row in rows:  # the view reads NULL losses back as NaN; the reference says None
        for key in ("first_loss", "last_loss", "min_loss", "max_loss"):
            if isinstance(row[key], float) and math.isnan(row[key]):
                row[key] = None
    return rows


def _series(n: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """A known series: a sawtooth loss with a NaN, an inf, a finite spike and a NaN at a bucket's
    first step; an LR that changes at steps that are no bucket's edge (and back), a user LR
    that changes every step for a while (a schedule)."""
    steps = list(range(n))
    loss = [1.0 + (s * 7919 % 101) / 100 for s in steps]
    loss[1234], loss[20_000], loss[47_777], loss[32 * 900] = math.nan, math.inf, 1e9, math.nan
    lr = [0.1 if s < 5_003 else 0.05 if s < 40_001 else 0.1 for s in steps]
    user_lr = [1e-3 * (1 + min(s, 3000) / 3000) for s in steps]
    return steps, loss, lr, user_lr


@pytest.mark.parametrize("batch", [997, 60_000])
def test_every_level_equals_a_reference_computed_in_python(store, batch):
    """Written in flusher-sized batches (each recomputes the buckets it touches) or at once,
    every level holds exactly the reference buckets, spikes and LR change points included."""
    from trainer.store.schema import LEVEL_SIZES

    steps, loss, lr, user_lr = _series(60_000)
    for start in range(0, len(steps), batch):
        store.append_metrics([(s, 0, 1000.0 + s, loss[s], lr[s], 0.9, 0.0, user_lr[s])
                              for s in steps[start:start + batch]])
    for level, size in enumerate(LEVEL_SIZES, start=1):
        view = store.metrics_view(level=level)
        assert view["size"] == size
        assert _view_buckets(view) == _reference_buckets(steps, loss, lr, user_lr, size)
        finite = [v for v in loss if math.isfinite(v)]
        assert sum(view["loss_sum"]) == pytest.approx(sum(finite), rel=1e-12)


def test_spikes_survive_every_level(store):
    """NaN, inf and one bad finite step among 300,000 flat steps: every level shows each at
    its own step (hand-made data, exact assertions)."""
    from trainer.store.schema import LEVEL_SIZES

    n = 300_007
    # A flat run, written with SQL (fast), its levels built once, then the three bad steps
    # written the way the flusher writes them.
    with store.transaction() as tx:
        tx.execute("INSERT INTO metrics(step, epoch, wall, loss, lr, momentum, weight_decay) "
                   "SELECT s, 0, s, 0.5, 0.01, 0.9, 0.0 FROM (" + _numbers(n) + ") t")
        store._build_levels(tx)
    store.append_metrics([(123_457, 0, 1.0, math.nan, 0.01, 0.9, 0.0)])
    store.append_metrics([(254_321, 0, 1.0, math.inf, 0.01, 0.9, 0.0),
                          (299_999, 0, 1.0, 1e6, 0.01, 0.9, 0.0)])
    for level, size in enumerate(LEVEL_SIZES, start=1):
        view = store.metrics_view(level=level)
        assert view["size"] == size and sum(view["steps"]) == n
        bad = [(s, k) for s, k in zip(view["nonfinite_step"], view["nonfinite"]) if k]
        if 123_457 // size != 254_321 // size:
            assert bad == [(123_457, 1), (254_321, 1)]
        else:  # both in one bucket: counted, the first one's step kept
            assert bad == [(123_457, 2)]
        spike = max(range(len(view["max_loss"])), key=view["max_loss"].__getitem__)
        assert (view["max_loss"][spike], view["max_loss_step"][spike]) == (1e6, 299_999)
        assert set(view["min_loss"]) == {0.5}
    coarse = store.metrics_view()  # what the chart reads first: a few thousand buckets
    assert (coarse["size"], len(coarse["first_step"])) == (256, 1172)
    assert sum(coarse["nonfinite"]) == 2 and max(coarse["max_loss"]) == 1e6


def _numbers(n: int) -> str:
    """SQL for the rows 0 … n − 1 of one column ``s`` (a recursive CTE, in both dialects)."""
    return (f"WITH RECURSIVE t(s) AS (SELECT 0 UNION ALL SELECT s + 1 FROM t WHERE s < {n - 1})"
            " SELECT s FROM t")


def test_a_view_reads_raw_rows_for_a_short_range_and_the_finest_level_that_fits(store):
    steps, loss, lr, user_lr = _series(60_000)
    store.append_metrics([(s, 0, 1000.0 + s, loss[s], lr[s], 0.9, 0.0, user_lr[s])
                          for s in steps])
    zoom = store.metrics_view(20_000 - 100, 20_000 + 100)  # full detail: one row a step
    assert zoom["level"] == 0 and zoom["step"] == list(range(19_900, 20_101))
    assert zoom["loss"][:100] == loss[19_900:20_000] and math.isnan(zoom["loss"][100])
    assert zoom["lr"] == lr[19_900:20_101] and zoom["user_lr"] == user_lr[19_900:20_101]
    assert zoom["wall"] == [1000.0 + s for s in range(19_900, 20_101)]
    wide = store.metrics_view(10_000, 50_000)  # 40,001 steps: too many raw, 32 a bucket
    assert (wide["level"], wide["size"]) == (1, 32)
    assert wide["first_step"][0] == 9_984 and wide["last_step"][-1] == 50_015
    assert store.metrics_view()["size"] == 32  # 60,000 steps: 1,875 buckets
    assert store.metrics_view(max_buckets=1000)["size"] == 256
    assert store.metrics_view(max_buckets=1)["size"] == 131_072  # the coarsest that fits
    assert store.metrics_view(200_000, 300_000) == store.metrics_view(5, 4) == {
        "level": 0, "size": 1, "step": [], "wall": [], "loss": [], "lr": [], "user_lr": []}


def test_levels_follow_rewrites_and_truncation(store):
    """An upsert that rewrites steps, and a resume that forgets steps: each bucket is
    recomputed from the rows that remain."""
    from trainer.store.schema import LEVEL_SIZES

    def write(steps, loss):
        store.append_metrics([(s, 0, 1000.0 + s, loss, 0.01, 0.9, 0.0) for s in steps])

    def reference():
        rows = store.metrics_since()
        return [_reference_buckets(rows["step"], rows["loss"], rows["lr"], rows["user_lr"],
                                   size) for size in LEVEL_SIZES]

    def levels():
        return [_view_buckets(store.metrics_view(level=k))
                for k in range(1, len(LEVEL_SIZES) + 1)]

    write(range(5_000), 1.0)
    write([70, 71, 4_000], 9.0)             # rewritten steps: a retry, an upsert
    write([4_999, 2_500], math.nan)         # out of order
    assert levels() == reference()
    store.truncate_after(2_050)             # cuts level-1, -2 and -3 buckets in two
    assert levels() == reference()
    assert store.metrics_view(level=len(LEVEL_SIZES))["last_step"] == [2_049]
    write(range(2_050, 2_100), 0.5)         # the resumed run goes on
    assert levels() == reference()
    store.truncate_after(0)
    assert store.metrics_extent() is None
    assert store._conn().execute("SELECT COUNT(*) FROM levels").fetchone()[0] == 0


def test_a_schema_1_run_gets_its_levels_built_when_opened(store_root):
    address = run_address(store_root, "old")
    with open_store(address, create=True) as store:
        store.append_metrics([(s, 0, 1000.0 + s, 1.0 / (s + 1), 0.01, 0.9, 0.0)
                              for s in range(20_000)])
    _make_version_1(store_root, "old")
    with open_store(address) as store:
        view = store.metrics_view(level=1)
        assert view["size"] == 32 and sum(view["steps"]) == 20_000
        assert view["max_loss"][0] == 1.0 and view["min_loss"][-1] == 1.0 / 20_000


def test_a_run_without_levels_at_this_schema_gets_them_when_opened(store_root):
    """Development builds of schema 2 wrote runs without the levels table."""
    address = run_address(store_root, "dev")
    with open_store(address, create=True) as store:
        store.append_metrics([(s, 0, 1000.0 + s, 2.0, 0.01, 0.9, 0.0) for s in range(20_000)])
        with store.transaction() as tx:
            tx.execute("DROP TABLE levels")
    with open_store(address) as store:
        view = store.metrics_view(level=2)
        assert view["size"] == 256 and sum(view["steps"]) == 20_000
        store.append_metrics([(20_000, 0, 1.0, math.nan, 0.01, 0.9, 0.0)])
        assert sum(store.metrics_view(level=2)["nonfinite"]) == 1
