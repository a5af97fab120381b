"""Starting Panda's processes: background training runs and the Streamlit dashboard.

A training run started from the CLI or the dashboard is its own process in its own session,
so it outlives the page (and the terminal) that started it; its output goes to
``run_dir/train.log``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer import checkpoint_files
from trainer.config import TrainConfig, config_values
from trainer.knobs import validate_knobs
from trainer.store.address import child_env, is_server_url, run_exists, store_for
from trainer.store.base import StoreError, sanitize_run_name

LOG_NAME = "train.log"
# The demo trains charlm, the task worth babysitting, with its own defaults (AdamW, warm-up and
# cosine decay): no step delay, since a step takes tens of milliseconds on a CPU already, and the
# loss falls visibly within the first minute (README, "charlm").
DEMO_CONFIG = TrainConfig(**config_values("charlm"))


def launch_training(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                    meta: dict | None = None, store: str | None = None) -> subprocess.Popen:
    """Start ``panda train`` in the background and return its process.

    The run store (SQLite in ``run_dir``, or the run in PostgreSQL URL ``store``) is created
    (status ``starting``, plus ``meta``) before returning, so a dashboard can list the run at
    once. The URL reaches the trainer in its environment, so ``ps`` never shows a password.
    """
    cfg.validate()
    run_dir = Path(run_dir).resolve()
    sanitize_run_name(run_dir.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--run-dir", str(run_dir),
           "--config-json", json.dumps(asdict(cfg))]
    if resume:
        cmd.append("--resume")
    with store_for(run_dir, store, create=True) as run_store:
        if "created" not in run_store.meta():
            run_store.set_meta(name=run_dir.name, created=time.time(), config=asdict(cfg),
                               task=cfg.task, status="starting", run_dir=str(run_dir),
                               **(meta or {}))
    with open(run_dir / LOG_NAME, "ab") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env=child_env(store),
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_run(run_dir: str | os.PathLike, proc: subprocess.Popen, *, store: str | None = None,
             wait_s: float = 15.0) -> str:
    """Stop a background run this process started: a ``stop`` command first (a clean end,
    final checkpoint written), SIGTERM if it does not end within ``wait_s`` (the runner turns
    that into a clean stop too), SIGKILL as the last resort. Says which it took."""
    if proc.poll() is not None:
        return f"it had already ended, exit code {proc.returncode}"
    try:
        with store_for(run_dir, store) as run_store:
            run_store.submit_command("stop", {}, source="cli")
        proc.wait(wait_s)
        return "stop command"
    except (subprocess.TimeoutExpired, StoreError, OSError):
        proc.terminate()
    try:
        proc.wait(wait_s)
        return "SIGTERM"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "SIGKILL"


def new_run_name(prefix: str) -> str:
    """A fresh, sortable run name such as ``digits-20261123-204501``."""
    return sanitize_run_name(f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def start_demo_run(runs_dir: str | os.PathLike, store: str | None = None
                   ) -> tuple[Path, subprocess.Popen]:
    run_dir = Path(runs_dir) / new_run_name("demo")
    return run_dir, launch_training(DEMO_CONFIG, run_dir, store=store)


def stored_config(run_dir: str | os.PathLike, store: str | None = None) -> TrainConfig:
    """The TrainConfig a run was started with (for ``--resume``); ``store`` as in train()."""
    with store_for(run_dir, store) as run_store:
        meta = run_store.meta()
    try:
        return TrainConfig.of_run(meta)
    except ValueError as err:
        raise ValueError(f"cannot resume {run_dir} here: {err}") from None


def resume_hint(meta: Mapping[str, Any], address: str | os.PathLike = "") -> str:
    """How to continue a run whose trainer is gone (kill -9, out of memory, a machine that went
    down), from its meta and its store's ``address``: the command for a ``panda train`` run
    (``--store`` for a run kept in PostgreSQL), the Babysitter argument for a user's own loop;
    and from which checkpoint, when the run's directory is on this machine (checkpoints are
    files next to the trainer)."""
    run_dir = meta.get("run_dir")
    try:
        TrainConfig.of_run(dict(meta))
        store = " --store $PANDA_STORE" if is_server_url(address) else ""
        how = f"`panda train --resume --run-dir {run_dir}{store}`"
    except ValueError:  # not started by `panda train`
        how = ("`resume=True` where your loop makes its Babysitter (or its Lightning or Hugging "
               "Face PandaCallback)")
    where = ""
    if run_dir and meta.get("host") in (None, socket.gethostname()) and Path(run_dir).is_dir():
        found = checkpoint_files.find(run_dir)
        where = (f" from its checkpoint of step {found.step:,} (the steps after it are trained "
                 "again)" if found is not None else
                 " (it has no checkpoint yet, so it starts again from step 0)")
    return f"Resume it with {how}{where}."


def branch_run(parent_dir: str | os.PathLike, from_step: int, knobs: dict[str, float], *,
               name: str | None = None, store: str | None = None
               ) -> tuple[Path, subprocess.Popen]:
    """Start a "what if" run from a checkpoint of ``parent_dir`` with different knobs.

    The branch starts from the newest checkpoint at or before ``from_step``, applies ``knobs``
    before its first step (recorded as an intervention with source ``branch``), and is linked
    to its parent (meta ``parent``) so the dashboard can overlay the two. With a PostgreSQL
    ``store`` both runs live there (the checkpoints are files in ``parent_dir`` either way).
    """
    parent_dir = Path(parent_dir)
    knobs = validate_knobs(knobs)
    cfg = stored_config(parent_dir, store)
    found = checkpoint_files.find(parent_dir, at_or_before=from_step)
    if found is None:
        raise ValueError(f"{parent_dir.name} has no checkpoint at or before step {from_step}")
    child = parent_dir.parent / sanitize_run_name(name or new_run_name(
        f"{parent_dir.name}-b{found.step}"))
    folder = checkpoint_files.checkpoint_dir(child)
    if run_exists(store or child.parent, child.name) or folder.exists():
        raise ValueError(f"run {child.name} already exists; choose another --name")
    folder.mkdir(parents=True)
    shutil.copyfile(found.path, checkpoint_files.checkpoint_path(child, found.step, "branch",
                                                                 pinned=False))
    parent = {"run": parent_dir.name, "run_dir": str(parent_dir.resolve()), "step": found.step}
    return child, launch_training(cfg, child, resume=True, store=store,
                                  meta={"parent": parent, "branch_knobs": knobs})


def dashboard_cwd() -> Path | None:
    """The source checkout holding ``.streamlit/config.toml`` (the theme), if there is one.

    Streamlit reads its config from the working directory, so the dashboard starts there;
    runs_dir and the script are absolute paths, so nothing else depends on it.
    """
    spec = importlib.util.find_spec("app")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).resolve().parent.parent
    return root if (root / ".streamlit" / "config.toml").is_file() else None


def dashboard_command(runs_dir: str | os.PathLike, *, host: str = "127.0.0.1",
                      port: int = 8501) -> list[str]:
    """The command line that serves the dashboard for ``runs_dir``."""
    spec = importlib.util.find_spec("app.main")
    if spec is None or spec.origin is None:
        raise RuntimeError("the dashboard (package 'app') is not installed")
    static = ["--server.enableStaticServing", "true"] if _static_dir_ready(spec.origin) else []
    # runner.postScriptGC: Streamlit runs a full gc.collect() after every script run, also after
    # each refresh of a fragment: 0.1-0.4 s of CPU each time with plotly and numpy loaded, most
    # of an idle page's cost. Python's own generational GC still runs.
    return [sys.executable, "-m", "streamlit", "run", spec.origin,
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--runner.postScriptGC", "false", *static,
            "--", "--runs-dir", str(Path(runs_dir).resolve())]


def _static_dir_ready(main_script: str) -> bool:
    """Whether the dashboard can serve app/static/: plotly.js as a file the browser caches
    with its compiled code (see app.stream_chart; nothing else is there). It needs Streamlit's
    Starlette server (older Tornado ones serve a static .js file as text/plain, which a
    browser refuses to run) and the directory (created here, else Streamlit warns that it is
    missing). Checked on the file system: importing Streamlit here would cost this process
    a second."""
    streamlit = importlib.util.find_spec("streamlit")
    locations = streamlit.submodule_search_locations if streamlit is not None else None
    if not locations or not (Path(locations[0]) / "web" / "server" / "starlette").is_dir():
        return False
    try:
        (Path(main_script).parent / "static").mkdir(exist_ok=True)
    except OSError:
        return False
    return True


SERVE_WAIT_S = 60.0        # a dashboard starting on a busy machine answers within this
SERVE_POLL_S = 0.2


def browser_available(platform: str = sys.platform,
                      env: Mapping[str, str] = os.environ) -> bool:
    """Whether a browser can open a page here: always on macOS and Windows; elsewhere only
    with a display (X11 or Wayland) or a ``$BROWSER`` to run. (Without one, ``webbrowser``
    would start a text browser in the terminal, or nothing at all.)"""
    if platform == "darwin" or platform.startswith("win"):
        return True
    return any(env.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))


def serving(url: str) -> bool:
    """Whether the dashboard at ``url`` answers (Streamlit's health check)."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def open_when_serving(url: str, server: subprocess.Popen, *, timeout: float = SERVE_WAIT_S,
                      opener: Callable[[str], bool] = webbrowser.open) -> bool:
    """Open ``url`` in the browser once the dashboard answers, if there is a browser to open.
    Returns whether it was opened (False: no browser, the server ended or never answered)."""
    if not browser_available():
        return False
    deadline = time.monotonic() + timeout
    while not serving(url):
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(SERVE_POLL_S)
    return bool(opener(url))
