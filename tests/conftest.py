"""Shared fixtures. Keep this file small: helpers for one test module belong in that module."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pgserver
import pytest
from helpers import APP, APP_TIMEOUT_S

from trainer.store import SqliteStore

DEFAULT_KNOBS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a run store under ``tmp_path/runs`` that looks like a live Babysitter's:
    status, heartbeat and pid (this process, so it counts as alive, unless ``pid`` is given),
    knobs, supported knobs and ``steps`` metric rows, one a second, the newest
    ``last_step_age`` seconds ago. No trainer is needed; returns the run directory."""

    def make(name: str = "live", *, status: str = "running", steps: int = 20,
             knobs: dict[str, Any] | None = None,
             supported: tuple[str, ...] = ("lr", "momentum", "weight_decay"),
             last_step_age: float = 1.0, pid: int | None = None) -> Path:
        run_dir = tmp_path / "runs" / name
        knobs = {**DEFAULT_KNOBS, **(knobs or {})}
        now = time.time()
        with SqliteStore(run_dir, create=True) as store:
            store.set_meta(name=name, created=now - steps, status=status, heartbeat=now,
                           pid=pid or os.getpid(), host=socket.gethostname(), task="digits",
                           optimizer="SGD", supported_knobs=list(supported), knobs=knobs,
                           step=steps, epoch=0, schedule={"shape": "constant"})
            store.append_metrics([(s, 0, now - last_step_age - (steps - 1) + s, 1.0 / (s + 1),
                                   knobs["lr"],
                                   knobs["momentum"], knobs["weight_decay"])
                                  for s in range(steps)])
        return run_dir

    return make


@pytest.fixture
def open_page(make_run, tmp_path, monkeypatch):
    """Factory: prepare a run (``make_run``'s arguments), open the dashboard (Streamlit's
    AppTest) on its runs directory without a token; returns (AppTest, run_dir)."""
    from streamlit.testing.v1 import AppTest

    def open_(**run_args):
        run_dir = make_run(**run_args)
        monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
        monkeypatch.delenv("PANDA_TOKEN", raising=False)
        at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
        assert not at.exception, at.exception
        return at, run_dir

    return open_


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch):
    """A developer's own $PANDA_STORE must never receive test runs."""
    monkeypatch.delenv("PANDA_STORE", raising=False)


@pytest.fixture(scope="session")
def pg_server():
    """A throw-away PostgreSQL server for the whole session. Where none can be started the
    tests that need it are skipped with the reason, except in CI, where that is a failure."""
    try:
        server = pgserver.start()
    except pgserver.Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {err}")
        pytest.skip(f"no PostgreSQL server: {err}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_root(request, tmp_path: Path) -> str:
    """Where runs live, once per backend: a runs directory, then an empty PostgreSQL database.
    Tests that take it are the store specification both backends must meet."""
    if request.param == "sqlite":
        return str(tmp_path / "runs")
    return request.getfixturevalue("pg_server").new_database()
