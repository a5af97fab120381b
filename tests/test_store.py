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
from helpers import HELPERS, REPO, subprocess_env

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


def test_metrics_refuses_unknown_columns(store):
    with pytest.raises(ValueError, match="unknown metric column"):
        store.metrics_since(columns=("step", "loss; DROP TABLE metrics"))


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
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    store.set_meta(heartbeat=time.time() - 3600, pid=int(dead.stdout))
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
