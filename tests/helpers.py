"""Shared helpers for the foundation tests (store, babysitter, CLI, real processes).

Also runnable as a script: ``python tests/helpers.py ROLE RUN_DIR ...`` plays one part in the
multi-process store test (``writer``, ``reader``, ``commander``), so those tests use real,
separate processes rather than threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve()
APP = str(REPO / "app" / "main.py")   # the dashboard, for Streamlit's AppTest
APP_TIMEOUT_S = 60  # a safety net for a slow CI machine, not a performance assertion


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one BLAS/OpenMP thread (2-core CI, deterministic)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def panda_cmd(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *map(os.fspath, args)]


def panda(*args: str | os.PathLike, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``panda`` CLI as a real subprocess and capture its output."""
    return subprocess.run(panda_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=REPO)


def start_train(run_dir: Path, *args: str | os.PathLike, log_name: str = "test-train.log"
                ) -> subprocess.Popen:
    """Start ``panda train --run-dir RUN_DIR ARGS`` in the background (output to a log file)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}-{log_name}", "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(panda_cmd("train", "--run-dir", run_dir, *args), stdout=log,
                                stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    finally:
        log.close()  # the child holds its own descriptor


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kill and reap ``proc`` on the way out if the test left it running, and every process
    it started (a demo's trainer and dashboard), so a failed test leaves nothing behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            children = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (from /proc: Linux, as the suite is)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_log(run_dir: Path, log_name: str = "test-train.log") -> str:
    path = run_dir.parent / f"{run_dir.name}-{log_name}"
    return path.read_text(errors="replace") if path.exists() else ""


def stream_charts(at) -> dict[str, dict]:
    """The stream_chart components on an AppTest page: key → their arguments (figure parsed)."""
    charts = {}
    for element in at.get("component_instance"):
        if element.proto.component_name != "app.stream_chart.stream_chart":
            continue
        args = json.loads(element.proto.json_args)
        charts[args["key"]] = {**args, "figure": json.loads(args["figure"])}
    return charts


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    The timeout is only a safety net against a hung test, never a performance assertion.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def holds_for(predicate: Callable[[], Any], seconds: float, interval: float = 0.02,
              what: str = "condition") -> None:
    """Check that ``predicate`` keeps holding for ``seconds`` (a paused run stays paused),
    failing at the first moment it does not. Proving that nothing happens takes a while by
    nature; this watches the whole while instead of sleeping and reading once."""
    deadline = time.monotonic() + seconds
    while True:
        assert predicate(), f"{what} stopped holding"
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


def knob_widget(at: Any, name: str, run: str = "live") -> Any:
    """The dashboard's widget showing knob ``name`` (``lr``, ``momentum``, ``weight_decay``, or
    ``exact``: the exact-LR field) in AppTest ``at``. The page replaces a widget it moves by a
    new one with the next key (``knob:RUN:NAME``, ``…#2``, …; see app.controls)."""
    base = f"knob:{run}:{name}"
    widgets = at.text_input if name == "exact" else at.select_slider
    return next(w for w in widgets if w.key == base or (w.key or "").startswith(base + "#"))


def open_panels(at: Any, *keys: str) -> Any:
    """Open the page's folding panels (:mod:`app.folding`) named by their state's keys, as a
    click on each would (its state, then a run); returns ``at``."""
    for name in keys:
        at.session_state[name] = True
    return at.run()


def square_loss_steps(bs: Any, model: Any, opt: Any, x: Any, n: int) -> list[Any]:
    """``n`` plain steps of ``opt`` on the mean square of ``model(x)``, each logged by
    Babysitter ``bs``; returns the losses, detached (on a device they stay there: reading them
    here would wait for it). Torch-free itself: this module also runs as a script."""
    losses = []
    for _ in range(n):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bs.step(loss)
        losses.append(loss.detach())
    return losses


def click_panel(at: Any, label: str, opened: bool) -> Any:
    """Open or close the panel whose header starts with ``label`` the way the browser does: the
    expander's own state sent with a run, so its callback (:mod:`app.folding`) runs. AppTest
    has no public call for it; ``_run`` with widget states is what its widgets' ``run`` use."""
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    panel = next(e for e in at.expander if e.label.startswith(label))
    states = at._tree.get_widget_states()
    states.widgets.append(WidgetState(id=panel.proto.id, bool_value=opened))
    return at._run(states)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()   # the name may contain spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def summary_of(run_dir: Path) -> dict[str, Any] | None:
    """The store's summary, or None while the store does not exist yet."""
    from trainer.store import SqliteStore, StoreError

    if not (run_dir / "run.db").exists():
        return None
    try:
        with SqliteStore(run_dir) as store:
            return store.summary()
    except StoreError:
        return None


# --- roles for the multi-process store test ---------------------------------------------------

def _writer(address: str, total: int, batch: int) -> dict:
    from trainer.store.address import open_store

    with open_store(address) as store:
        for first in range(0, total, batch):
            rows = [(s, 0, time.time(), 1.0 / (s + 1), 0.01, 0.9, 0.0)
                    for s in range(first, min(total, first + batch))]
            store.append_metrics(rows, meta={"heartbeat": time.time(), "step": rows[-1][0] + 1})
            time.sleep(0.002)
        store.set_meta(status="finished")
    return {"written": total}


def _reader(address: str, total: int) -> dict:
    from trainer.store.address import open_store

    seen: list[int] = []
    reads = 0
    deadline = time.monotonic() + 120
    with open_store(address) as store:
        last = -1
        while last < total - 1 and time.monotonic() < deadline:
            new = store.metrics_since(last, columns=("step", "loss"))
            reads += 1
            steps = new["step"]
            if steps:
                # Incremental reads are monotone: every step is new, contiguous, increasing.
                if steps != list(range(last + 1, last + 1 + len(steps))):
                    return {"error": f"non-contiguous read after {last}: {steps[:5]}..."}
                if any(abs(loss - 1.0 / (s + 1)) > 1e-12 for s, loss in zip(steps, new["loss"])):
                    return {"error": "a row came back with the wrong loss"}
                seen.extend(steps)
                last = steps[-1]
            store.summary()  # the dashboard's other query, interleaved
            time.sleep(0.001)
    return {"seen": len(seen), "last": last, "reads": reads}


def _commander(address: str, count: int) -> dict:
    from trainer.store.address import open_store

    ids = []
    with open_store(address) as store:
        for i in range(count):
            ids.append(store.submit_command("set", {"lr": 0.001 * (i + 1)}, source="test"))
            time.sleep(0.005)
    return {"ids": ids}


def _main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    role, address, *numbers = argv
    ints = [int(n) for n in numbers]
    try:
        result = {"writer": _writer, "reader": _reader, "commander": _commander}[role](
            address, *ints)
    except Exception as err:  # report, do not hide: the test asserts on this
        result = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


SCREENSHOTS_ENV = "PANDA_SCREENSHOTS"   # set by `make screenshots`: the README's pictures


def screenshot(target: Any, path: Path) -> Path:
    """Screenshot ``target`` (a Playwright page or locator) to ``path``, a file under the
    test's temporary directory: a test leaves the tree as it was. With $PANDA_SCREENSHOTS set
    (``make screenshots``) the picture is also written there under the same name, so the
    README's pictures are taken by the tests that check what they show."""
    target.screenshot(path=str(path))
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / path.name)
    return path


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped): a trainer that is gone."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)
