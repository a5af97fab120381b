"""Runs in PostgreSQL: what a server store adds to the store specification in test_store.py.

A trainer on one machine and a dashboard or CLI on another share runs through a database:
commands reach the trainer in commit order even when several writers commit at once, the run
survives its connections being cut, passwords never appear in messages, and every command of
the CLI works on a run that lives in PostgreSQL. A throw-away server (tests/pgserver.py) plays
the database; each test gets an empty database of its own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from helpers import REPO, panda_cmd, reaped, start_train, subprocess_env, wait_until

from trainer.store import StoreError
from trainer.store.address import list_runs, open_store, run_address, store_url

psycopg = pytest.importorskip("psycopg")
from trainer.store.postgres import connect, drop_run  # noqa: E402  (needs psycopg)

TIMEOUT_S = 90  # safety nets against a hung test, never performance assertions


@pytest.fixture
def url(pg_server) -> str:
    return pg_server.new_database()


def _run(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run(panda_cmd(*args), capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**subprocess_env(), **(env or {})})


# --- addresses, URLs and refusals -------------------------------------------------------------

def test_a_password_never_appears_in_an_error(pg_server):
    port = pg_server.port
    with pytest.raises(StoreError) as refused:
        connect(f"postgresql://panda:hunter2@127.0.0.1:{port}/no_such_database")
    assert "hunter2" not in str(refused.value) and "***" in str(refused.value)
    assert "no_such_database" in str(refused.value)


def test_an_unreachable_server_is_a_clear_store_error():
    with pytest.raises(StoreError, match=r"cannot reach the PostgreSQL store .*127\.0\.0\.1:1"):
        open_store("postgresql://panda@127.0.0.1:1/db#run")


@pytest.mark.parametrize("text", ["sqlite:///x.db", "runs/x", "http://host/db"])
def test_only_postgresql_urls_are_stores(text, monkeypatch):
    with pytest.raises(ValueError, match="postgresql://"):
        store_url(text)
    monkeypatch.setenv("PANDA_STORE", text)
    with pytest.raises(ValueError, match="postgresql://"):
        store_url()


@pytest.mark.parametrize(("store", "reason"), [
    ("sqlite:///runs.db", "must be a postgresql:// URL"),
    ("postgresql://panda:hunter2@127.0.0.1:1/db", "cannot reach the PostgreSQL store"),
])
def test_the_cli_refuses_a_bad_store_in_one_line(store, reason):
    for args in (("status", "run", "--store", store), ("runs", "--store", store),
                 ("set", "run", "--lr", "0.1", "--store", store)):
        done = _run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert reason in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert "hunter2" not in done.stderr + done.stdout


def test_store_url_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("PANDA_STORE", raising=False)
    assert store_url() is None
    monkeypatch.setenv("PANDA_STORE", "postgresql://a@h/db")
    assert store_url() == "postgresql://a@h/db"
    assert store_url("postgresql://b@h/db") == "postgresql://b@h/db"


def test_unsafe_run_names_are_refused_before_any_query(url):
    for name in ("../x", "a b", "x;DROP TABLE panda.runs"):
        with pytest.raises(ValueError, match="invalid run name"):
            open_store(f"{url}#{name}", create=True)
    assert list_runs(url) == []


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_submitters_never_make_an_incremental_reader_skip_a_command(url):
    """Ids come from a sequence, so without the run's write lock a command could commit after
    one with a higher id, and a poller reading "after the last id I saw" would skip it."""
    address = run_address(url, "busy")
    open_store(address, create=True).close()
    writers, per_writer = 6, 25
    seen: list[int] = []
    done = threading.Event()

    def submit(k: int) -> None:
        with open_store(address) as store:
            for i in range(per_writer):
                store.submit_command("set", {"lr": 0.001 * (k * per_writer + i + 1)})

    def poll() -> None:
        with open_store(address) as store:
            last = 0
            while True:
                finished = done.is_set()
                for command in store.pending_commands(last):
                    seen.append(command.id)
                    last = command.id
                if finished:
                    return

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=submit, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    done.set()
    poller.join(TIMEOUT_S)
    with open_store(address) as store:
        every = [c.id for c in store.commands()]
    assert len(every) == writers * per_writer
    assert seen == every  # each exactly once, in commit order


def test_creating_one_run_from_many_clients_at_once_makes_one_run(url):
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with open_store(run_address(url, "same"), create=True) as store:
                store.set_meta(name="same")
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert errors == []
    assert [r["run"] for r in list_runs(url)] == ["same"]


def test_drop_run_removes_the_run_and_its_rows(url):
    with open_store(run_address(url, "gone"), create=True) as store:
        store.append_metrics([(0, 0, 1.0, 1.0, 0.1, 0.9, 0.0)])
    open_store(run_address(url, "kept"), create=True).close()
    drop_run(url, "gone")
    assert [r["run"] for r in list_runs(url)] == ["kept"]
    with pytest.raises(StoreError, match="no run 'gone'"):
        open_store(run_address(url, "gone"))
    with pytest.raises(StoreError, match="no run 'gone'"):
        drop_run(url, "gone")


def test_listing_shows_a_run_it_cannot_read_beside_the_others(url):
    for name in ("old", "future"):
        with open_store(run_address(url, name), create=True) as store:
            store.set_meta(name=name, created=time.time(), status="finished")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE panda.runs SET version = version + 1 WHERE name = 'future'")
    listed = {r["run"]: r for r in list_runs(url)}
    assert listed["old"]["state"] == "finished"
    assert listed["future"]["state"] == "unreadable"
    assert "newer Panda" in listed["future"]["error"]


# --- a real trainer writing to PostgreSQL -----------------------------------------------------

def _summary(url: str, name: str) -> dict | None:
    try:
        with open_store(run_address(url, name)) as store:
            return store.summary()
    except StoreError:
        return None


@pytest.mark.slow
def test_cli_drives_a_trainer_whose_run_lives_in_postgresql(url, tmp_path):
    """`panda train --store` writes metrics to the database and checkpoints to --run-dir;
    `panda set / status / runs / export / checkpoints / stop` find the run by name there."""
    run_dir = tmp_path / "node" / "pg-run"
    env = {"PANDA_STORE": url}
    proc = start_train(run_dir, "--task", "digits", "--epochs", "200", "--step-delay", "0.005",
                       "--checkpoint-every", "50", "--store", url)
    with reaped(proc):
        wait_until(lambda: (_summary(url, "pg-run") or {}).get("step", 0) > 60,
                   timeout=TIMEOUT_S, what="the trainer to log steps to PostgreSQL")
        assert not (run_dir / "run.db").exists()  # metrics went to the server, not a file
        done = _run("set", "pg-run", "--lr", "0.003", "--json", env=env)
        assert done.returncode == 0, done.stderr
        applied = json.loads(done.stdout)
        assert applied["status"] == "applied"
        status = json.loads(_run("status", "pg-run", "--json", "--store", url).stdout)
        assert status["lr"] == pytest.approx(0.003) and status["store"] == "postgresql"
        listed = json.loads(_run("runs", "--json", env=env).stdout)
        assert [r["run"] for r in listed] == ["pg-run"]
        checkpoints = json.loads(_run("checkpoints", "pg-run", "--json", env=env).stdout)
        assert checkpoints and all(c["path"].startswith(str(run_dir)) for c in checkpoints)
        assert _run("stop", "pg-run", env=env).returncode == 0
        proc.wait(TIMEOUT_S)
    exported = json.loads(_run("export", "pg-run", env=env).stdout)
    changes = [(e["knob"], e["new"]) for e in exported["timeline"] if e["knob"] is not None]
    assert changes == [("lr", 0.003)]
    with open_store(run_address(url, "pg-run")) as store:
        steps = store.metrics_since(columns=("step", "lr"))
    assert steps["step"] == list(range(len(steps["step"])))  # every step, none twice
    first_new = steps["lr"].index(pytest.approx(0.003))
    assert first_new == applied["applied_step"]
    assert _summary(url, "pg-run")["state"] == "stopped"


@pytest.mark.slow
def test_a_trainer_outlives_its_database_connections_being_cut(url, tmp_path):
    """A restarted server or a dropped link must not kill training: the flusher keeps the rows
    queued, reconnects on its next tick, and no step is lost."""
    run_dir = tmp_path / "cut"
    proc = start_train(run_dir, "--task", "spirals", "--epochs", "100000", "--step-delay",
                       "0.002", "--store", url)
    with reaped(proc):
        wait_until(lambda: (_summary(url, "cut") or {}).get("step", 0) > 50, timeout=TIMEOUT_S,
                   what="the first steps")
        database = url.rsplit("/", 1)[1]
        with psycopg.connect(url, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()[0]
        assert cut >= 1
        before = _summary(url, "cut")["step"]
        wait_until(lambda: _summary(url, "cut")["step"] > before + 100, timeout=TIMEOUT_S,
                   what="steps logged after the connections were cut")
        assert proc.poll() is None, "the trainer died with its connection"
        assert _run("stop", "cut", "--store", url).returncode == 0
        proc.wait(TIMEOUT_S)
    with open_store(run_address(url, "cut")) as store:
        steps = store.metrics_since(columns=("step",))["step"]
    assert steps == list(range(len(steps)))


@pytest.mark.slow
def test_a_trainer_outlives_a_database_restart(pg_server, url, tmp_path):
    """The server goes away for a while (many flush and poll ticks), then comes back: the
    trainer keeps training, keeps every row queued, writes them all once it reconnects, and
    still takes commands."""
    run_dir = tmp_path / "restart"
    proc = start_train(run_dir, "--task", "spirals", "--epochs", "100000", "--step-delay",
                       "0.002", "--store", url)
    with reaped(proc):
        wait_until(lambda: (_summary(url, "restart") or {}).get("step", 0) > 50,
                   timeout=TIMEOUT_S, what="the first steps")
        pg_server.restart(down_s=1.5)
        before = _summary(url, "restart")["step"]
        wait_until(lambda: _summary(url, "restart")["step"] > before + 100, timeout=TIMEOUT_S,
                   what="steps logged after the restart")
        assert proc.poll() is None, "the trainer died with its database"
        done = _run("set", "restart", "--lr", "0.02", "--json", "--store", url)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "applied"
        assert _run("stop", "restart", "--store", url).returncode == 0
        proc.wait(TIMEOUT_S)
    with open_store(run_address(url, "restart")) as store:
        steps = store.metrics_since(columns=("step",))["step"]
        assert store.meta()["status"] == "stopped"
    assert steps == list(range(len(steps)))  # nothing lost while the server was down


def test_json_output_never_shows_a_password(pg_server, url):
    secret = url.replace("postgresql://panda@", "postgresql://panda:hunter2@")  # trust auth
    with open_store(run_address(secret, "r1"), create=True) as store:
        store.set_meta(name="r1", created=time.time(), status="finished")
    for args in (("status", "r1", "--json"), ("runs", "--json"), ("status", "r1")):
        done = _run(*args, "--store", secret)
        assert done.returncode == 0, done.stderr
        assert "hunter2" not in done.stdout + done.stderr and "r1" in done.stdout


def test_the_dashboard_lists_and_reads_a_run_in_postgresql(url, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app.controls import key

    app = str(REPO / "app" / "main.py")

    with open_store(run_address(url, "remote"), create=True) as store:
        now = time.time()
        store.set_meta(name="remote", created=now, status="running", heartbeat=now,
                       host=socket.gethostname(), pid=os.getpid(), task="digits",
                       optimizer="SGD",
                       supported_knobs=["lr", "momentum", "weight_decay"],
                       knobs={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
                       step=30, epoch=0, schedule={"shape": "constant"})
        store.append_metrics([(s, 0, now - 30 + s, 1.0 / (s + 1), 0.01, 0.9, 0.0)
                              for s in range(30)])
    monkeypatch.setenv("PANDA_STORE", url)
    at = AppTest.from_file(app, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="run_picker").value == "remote"
    assert any("runs in `postgresql://panda@" in c.value for c in at.sidebar.caption)
    at.select_slider(key=key("remote", "lr")).set_value(0.003).run()
    at.button(key=key("remote", "apply")).click().run()
    with open_store(run_address(url, "remote")) as store:
        (command,) = store.commands()
    assert (command.kind, json.loads(command.payload), command.source) == (
        "set", {"lr": 0.003}, "dashboard")
    # Refreshes reuse the session's connection: re-runs (each a new thread) open no more.
    held = _connections_to(url)
    for _ in range(5):
        at.run()
    assert not at.exception and _connections_to(url) == held and 1 <= held <= 2


def _connections_to(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid()").fetchone()[0]
