"""Starting Panda's processes: background training runs and the Streamlit dashboard.

A training run started from the CLI or the dashboard is its own process in its own session,
so it outlives the page (and the terminal) that started it; its output goes to
``run_dir/train.log``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from trainer.runner import TrainConfig
from trainer.store import RunStore, sanitize_run_name

LOG_NAME = "train.log"
# The demo trains digits slowly enough to watch: ~45 steps per epoch at ~50 steps/s.
DEMO_CONFIG = TrainConfig(task="digits", epochs=400, step_delay=0.02)


def launch_training(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False
                    ) -> subprocess.Popen:
    """Start ``panda train`` in the background and return its process.

    The run store is created (status ``starting``) before returning, so a dashboard can list
    the run at once.
    """
    cfg.validate()
    run_dir = Path(run_dir).resolve()
    sanitize_run_name(run_dir.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--run-dir", str(run_dir),
           "--config-json", json.dumps(asdict(cfg))]
    if resume:
        cmd.append("--resume")
    with RunStore(run_dir, create=True) as store:
        if "created" not in store.meta():
            store.set_meta(name=run_dir.name, created=time.time(), config=asdict(cfg),
                           task=cfg.task, status="starting")
    with open(run_dir / LOG_NAME, "ab") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def new_run_name(prefix: str) -> str:
    """A fresh, sortable run name such as ``digits-20261123-204501``."""
    return sanitize_run_name(f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def start_demo_run(runs_dir: str | os.PathLike) -> tuple[Path, subprocess.Popen]:
    run_dir = Path(runs_dir) / new_run_name("demo")
    return run_dir, launch_training(DEMO_CONFIG, run_dir)


def dashboard_command(runs_dir: str | os.PathLike, *, host: str = "127.0.0.1",
                      port: int = 8501) -> list[str]:
    """The command line that serves the dashboard for ``runs_dir``."""
    spec = importlib.util.find_spec("app.main")
    if spec is None or spec.origin is None:
        raise RuntimeError("the dashboard (package 'app') is not installed")
    return [sys.executable, "-m", "streamlit", "run", spec.origin,
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--", "--runs-dir", str(Path(runs_dir).resolve())]
