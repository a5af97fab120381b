"""DDP: a Babysitter on every rank of a real 2-process ``torchrun`` job (CPU, gloo).

Specification: under ``torch.distributed`` with world size > 1, only rank 0 writes the run store
(and runs the flusher and poller threads); a knob change sent with ``panda set`` reaches every
rank at the same step, so the replicas keep identical parameters; the logged loss is the mean
over ranks; pause, resume and stop reach every rank at the same step; losses buffered after
the last meeting are still averaged and logged when the run ends; resume and rollback restore
rank 0's state on every rank, also when the other ranks' disks hold no checkpoint, except the
random generators: each rank gets back its own, so a resumed run draws what the uninterrupted
one drew; the close returns once the process group holds none of Panda's tensors, so a script
may end right after it (a barrier, ``destroy_process_group``, exit), also when a peer is gone.

Also runnable as the worker itself:
``python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py RUN_DIR REPORTS``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
OLD_LR, NEW_LR = 0.01, 0.05
SYNC_EVERY = 10  # the default, spelled out for the worker


# --- the worker (one per rank, started by torchrun) ----------------------------------------------

def _params_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def worker(argv: list[str]) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import Babysitter

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("reports")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--sync-every", type=int, default=SYNC_EVERY)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--checkpoint-on-rank-0-only", action="store_true",
                        help="the other ranks pass no checkpoint_every (a mistake)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--private-dirs", action="store_true",
                        help="ranks > 0 get a run directory of their own (another node)")
    parser.add_argument("--draw", action="store_true",
                        help="each rank seeds its generator apart and draws a number a step "
                        "(as dropout would)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights (DDP broadcasts rank 0's anyway)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=OLD_LR, momentum=0.9)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    x, y = torch.randn(512, 16, generator=data), torch.randint(0, 4, (512,), generator=data)
    if args.draw:
        torch.manual_seed(100 + rank)  # a resume must put this back, not rank 0's

    losses, lr_changes, draws = [], [], []
    slowest = {"wall": 0.0, "cpu": 0.0, "step": -1}
    last_lr = optimizer.param_groups[0]["lr"]
    wall0, cpu0 = time.monotonic(), time.process_time()
    run_dir = args.run_dir if rank == 0 or not args.private_dirs else f"{args.run_dir}-r{rank}"
    every = None if args.checkpoint_on_rank_0_only and rank else args.checkpoint_every
    with Babysitter(optimizer, run_dir, model=model, sync_every=args.sync_every,
                    checkpoint_every=every, resume=args.resume) as bs:
        start_step = bs.step_count
        while bs.step_count < args.max_steps and not bs.should_stop:
            i = (bs.step_count * 32) % 512
            loss = F.cross_entropy(ddp(x[i:i + 32]), y[i:i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if args.draw:
                draws.append([bs.step_count, torch.rand(()).item()])
            t, c = time.monotonic(), time.process_time()
            bs.step(loss)
            t, c = time.monotonic() - t, time.process_time() - c
            if t > slowest["wall"]:
                slowest = {"wall": t, "cpu": c, "step": bs.step_count}
            lr = bs.composition.used_lr  # what the update just taken used
            if not math.isclose(lr, last_lr, rel_tol=1e-12):
                lr_changes.append([bs.step_count - 1, lr])
                last_lr = lr
            if args.step_delay:
                time.sleep(args.step_delay)
        report = {
            "rank": rank, "pid": os.getpid(), "steps": bs.step_count,
            "start_step": start_step,
            "should_stop": bs.should_stop, "lr_changes": lr_changes, "final_lr": bs.lr,
            "applied": bs.coordinator.applied, "losses": losses, "slowest_step": slowest,
            "draws": draws,
            "store": type(bs.store).__name__,
            "threads": sorted(t.name for t in threading.enumerate()),
        }
    report["wall"] = time.monotonic() - wall0
    report["cpu"] = time.process_time() - cpu0
    report["params"] = _params_digest(model)
    # A usual ending, right after the close: meet, then leave. Before the close waited for gloo
    # to let go of Panda's tensors (DistributedCoordinator.retire), this died now and then at
    # exit (SIGABRT, "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    out = Path(args.reports)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json.tmp").write_text(json.dumps(report))
    (out / f"rank{rank}.json.tmp").rename(out / f"rank{rank}.json")


# --- the tests -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, reports: Path, *args: str) -> subprocess.Popen:
    sys.path.insert(0, str(HERE.parent))
    from helpers import subprocess_env

    log = open(run_dir.parent / f"{run_dir.name}-torchrun.log", "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
             "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), str(HERE), str(run_dir), str(reports), *args],
            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    finally:
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop torchrun and the ranks it started. SIGTERM: torchrun stops its ranks (each in a
    session of its own, out of reach of a signal to torchrun's group), where a SIGKILL to
    torchrun leaves ranks that hang in a collective running after the test."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _finish(proc: subprocess.Popen, run_dir: Path, reports: Path) -> list[dict]:
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _stop(proc)
        rc = "timeout"
    log = (run_dir.parent / f"{run_dir.name}-torchrun.log").read_text(errors="replace")
    assert rc == 0, f"torchrun ended with {rc}:\n{log[-4000:]}"
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]


def _cli_json(*args: str | Path) -> dict:
    from helpers import panda

    result = panda(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _rows(store) -> list[dict]:
    columns = store.metrics_since(-1)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@pytest.fixture(scope="module")
def ddp_session(tmp_path_factory):
    """One 2-rank job, steered from outside: set the LR, pause, resume, stop."""
    sys.path.insert(0, str(HERE.parent))
    from helpers import holds_for, summary_of, wait_until

    from trainer.store import SqliteStore

    base = tmp_path_factory.mktemp("ddp")
    run_dir, reports = base / "ddp-run", base / "reports"
    proc = _launch(run_dir, reports, "--step-delay", "0.01")
    try:
        wait_until(lambda: (summary_of(run_dir) or {}).get("step", 0) >= 25, timeout=60,
                   what="the DDP run to log 25 steps")
        cli = {"set": _cli_json("set", run_dir, "--lr", str(NEW_LR))}
        wait_until(lambda: summary_of(run_dir)["step"] >= cli["set"]["applied_step"] + 15,
                   what="steps after the LR change")
        cli["pause"] = _cli_json("pause", run_dir)
        paused_at = cli["pause"]["applied_step"]
        wait_until(lambda: summary_of(run_dir)["step"] == paused_at, what="the paused step")
        # A paused job stays paused: both ranks wait inside step().
        holds_for(lambda: summary_of(run_dir)["step"] == paused_at, 1.0, what="the pause")
        cli["paused_step"] = paused_at
        cli["resume"] = _cli_json("resume", run_dir)
        wait_until(lambda: summary_of(run_dir)["step"] >= cli["resume"]["applied_step"] + 15,
                   what="steps after resume")
        cli["stop"] = _cli_json("stop", run_dir)
        ranks = _finish(proc, run_dir, reports)
    finally:
        _stop(proc)
    with SqliteStore(run_dir) as store:
        stored = {"metrics": _rows(store), "events": store.events_since(0),
                  "commands": store.commands(0), "meta": store.meta()}
    return {"cli": cli, "ranks": ranks, "store": stored, "run_dir": run_dir}


@pytest.mark.slow
def test_lr_change_lands_on_every_rank_at_the_same_step(ddp_session):
    cli, ranks, metrics = ddp_session["cli"], ddp_session["ranks"], ddp_session["store"]["metrics"]
    step = cli["set"]["applied_step"]
    assert cli["set"]["status"] == "applied"
    assert step % SYNC_EVERY == 0  # a meeting boundary, known to every rank in advance
    for rank in ranks:
        assert rank["lr_changes"] == [[step, NEW_LR]]  # the landing update: exactly NEW_LR
        assert rank["final_lr"] == pytest.approx(NEW_LR, rel=1e-12)
    # The replicas stayed identical: same LR at every step, so the same optimizer steps.
    assert ranks[0]["params"] == ranks[1]["params"]
    # The store's per-step LR: the old one before the reported step, the new one from it on.
    assert [m["lr"] for m in metrics] == pytest.approx(
        [OLD_LR if m["step"] < step else NEW_LR for m in metrics], rel=1e-12)


@pytest.mark.slow
def test_logged_loss_is_the_mean_over_ranks(ddp_session):
    ranks, metrics = ddp_session["ranks"], ddp_session["store"]["metrics"]
    assert [m["step"] for m in metrics] == list(range(ranks[0]["steps"]))
    expected = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert [m["loss"] for m in metrics] == pytest.approx(expected, rel=1e-9)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different shards: the mean is a real mean


@pytest.mark.slow
def test_only_rank_0_writes_the_run(ddp_session):
    ranks, stored = ddp_session["ranks"], ddp_session["store"]
    assert ranks[0]["store"] == "SqliteStore" and ranks[1]["store"] == "NoneType"
    assert {"panda-flusher", "panda-poller"} <= set(ranks[0]["threads"])
    assert not {"panda-flusher", "panda-poller"} & set(ranks[1]["threads"])
    assert stored["meta"]["pid"] == ranks[0]["pid"]
    assert stored["meta"]["distributed"] == {"world_size": 2, "backend": "gloo",
                                             "sync_every": SYNC_EVERY}
    # One record per intervention (a second writer would have duplicated them) ...
    assert [e["kind"] for e in stored["events"]] == ["set", "pause", "resume", "stop"]
    assert [c.source for c in stored["commands"]] == ["cli"] * 4
    # ... and nothing but rank 0's store and checkpoints in the run directory.
    names = {p.name for p in ddp_session["run_dir"].iterdir()}
    assert names <= {"run.db", "run.db-wal", "run.db-shm", "checkpoints", "trainer.lock"}, names


@pytest.mark.slow
def test_pause_resume_and_stop_reach_every_rank_at_the_same_step(ddp_session):
    cli, ranks, stored = ddp_session["cli"], ddp_session["ranks"], ddp_session["store"]
    pause, resume, stop = (cli[k]["applied_step"] for k in ("pause", "resume", "stop"))
    assert pause == resume == cli["paused_step"]  # no step while paused
    expected = [[cli["set"]["applied_step"], "set"], [pause, "pause"], [resume, "resume"],
                [stop, "stop"]]
    for rank in ranks:
        assert rank["applied"] == expected
        assert rank["should_stop"] and rank["steps"] == stop
        # Both ranks waited inside the step() that met the pause, asleep rather than spinning:
        # relative to their own CPU use per second while training.
        slowest = rank["slowest_step"]
        assert slowest["step"] == pause
        running_rate = (rank["cpu"] - slowest["cpu"]) / (rank["wall"] - slowest["wall"])
        assert slowest["cpu"] / slowest["wall"] < 0.5 * running_rate, (slowest, running_rate)
    assert [(c.kind, c.status, c.applied_step) for c in stored["commands"]] == [
        ("set", "applied", cli["set"]["applied_step"]), ("pause", "applied", pause),
        ("resume", "applied", resume), ("stop", "applied", stop)]
    assert stored["meta"]["status"] == "stopped"


@pytest.mark.slow
def test_losses_after_the_last_meeting_are_averaged_at_the_end(tmp_path):
    """A run whose length is not a multiple of the cadence: the tail is averaged by close()."""
    from trainer.store import SqliteStore

    run_dir, reports = tmp_path / "tail-run", tmp_path / "reports"
    ranks = _finish(_launch(run_dir, reports, "--max-steps", "53", "--sync-every", "7"),
                    run_dir, reports)
    with SqliteStore(run_dir) as store:
        metrics, meta = _rows(store), store.meta()
    assert meta["status"] == "finished"
    assert [m["step"] for m in metrics] == list(range(53))
    expected = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert [m["loss"] for m in metrics] == pytest.approx(expected, rel=1e-9)
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.slow
def test_resume_and_rollback_restore_rank_0s_state_on_every_rank(tmp_path):
    """Rank 1 runs "on another node": its run directory holds no checkpoint (only rank 0
    writes them). Resuming and rolling back to a checkpoint that exists only on rank 0's disk
    must still give both replicas rank 0's state, or they would silently drift apart."""
    sys.path.insert(0, str(HERE.parent))
    from helpers import summary_of, wait_until

    from trainer.store import SqliteStore

    run_dir = tmp_path / "resumed"
    first = _finish(_launch(run_dir, tmp_path / "first", "--max-steps", "60", "--private-dirs",
                            "--checkpoint-every", "20"), run_dir, tmp_path / "first")
    assert [r["steps"] for r in first] == [60, 60]
    assert not (tmp_path / "resumed-r1" / "checkpoints").exists()

    reports = tmp_path / "second"
    # Sparse checkpoints from here on, so the ring keeps step 60 however fast this machine is.
    proc = _launch(run_dir, reports, "--resume", "--max-steps", "3000", "--step-delay", "0.01",
                   "--private-dirs", "--checkpoint-every", "1000")
    try:
        wait_until(lambda: (summary_of(run_dir) or {}).get("step", 0) >= 150, timeout=60,
                   what="the resumed run to pass step 150")
        rollback = _cli_json("rollback", run_dir, "--to", "70")
        wait_until(lambda: summary_of(run_dir)["step"] >= rollback["applied_step"] + 20,
                   what="steps after the rollback")
        _cli_json("stop", run_dir)
        ranks = _finish(proc, run_dir, reports)
    finally:
        _stop(proc)
    assert [r["start_step"] for r in ranks] == [60, 60]
    for rank in ranks:
        assert [kind for _, kind in rank["applied"]] == ["rollback", "stop"]
    assert ranks[0]["applied"] == ranks[1]["applied"]
    assert ranks[0]["params"] == ranks[1]["params"]
    with SqliteStore(run_dir) as store:
        (event,) = [e for e in store.events_since(0) if e["kind"] == "rollback"]
    assert "checkpoint of step 60" in event["message"]  # on rank 0's disk only


def uninterrupted_draws(steps: int) -> list[dict[int, float]]:
    """Each rank's draws, step by step, in a run that nothing interrupts: the worker seeds each
    rank with 100 + rank before its first step and draws once a step, and nothing else in the
    loop (Panda included) draws from torch's generator."""
    draws = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        draws.append({step: torch.rand(()).item() for step in range(steps)})
    return draws


@pytest.mark.slow
@pytest.mark.parametrize("resumed_from", ["final", "periodic"])
def test_a_resume_puts_back_each_ranks_own_random_generators(tmp_path, resumed_from):
    """Rank 0 writes the checkpoints, yet every rank draws its own numbers (dropout masks):
    resumed, each rank must draw what it drew in the uninterrupted run, not rank 0's numbers.
    From the final checkpoint (step 30) or, that one removed, the periodic one (step 20)."""
    from trainer.checkpoint_files import list_checkpoints

    run_dir = tmp_path / "draws"
    first = _finish(_launch(run_dir, tmp_path / "first", "--max-steps", "30",
                            "--checkpoint-every", "20", "--draw"), run_dir, tmp_path / "first")
    whole = uninterrupted_draws(60)
    assert whole[0] != whole[1]  # the ranks draw different numbers: a real test
    for rank, report in enumerate(first):  # and the expectation is the run's own
        assert dict(map(tuple, report["draws"])) == {
            step: whole[rank][step] for step in range(30)}, f"rank {rank}"
    if resumed_from == "periodic":
        for old in list_checkpoints(run_dir):
            if old.reason == "final":
                old.path.unlink()
    ranks = _finish(_launch(run_dir, tmp_path / "second", "--resume", "--max-steps", "60",
                            "--draw"), run_dir, tmp_path / "second")
    start = {"final": 30, "periodic": 20}[resumed_from]
    assert [r["start_step"] for r in ranks] == [start, start]
    for rank, report in enumerate(ranks):
        assert dict(map(tuple, report["draws"])) == {
            step: whole[rank][step] for step in range(start, 60)}, f"rank {rank}"


@pytest.mark.slow
def test_ranks_that_checkpoint_at_different_steps_gather_nothing_and_never_hang(tmp_path):
    """Rank 0 checkpoints every 5 steps, rank 1 never (a mistake): a gather at rank 0's
    checkpoints would wait for rank 1 forever. The ranks find out once, when the Babysitter is
    built, say so, and keep rank 0's generators only."""
    from trainer import checkpoint
    from trainer.checkpoint_files import list_checkpoints
    from trainer.rng import RANKS

    run_dir = tmp_path / "apart"
    _finish(_launch(run_dir, tmp_path / "reports", "--max-steps", "12", "--checkpoint-every",
                    "5", "--checkpoint-on-rank-0-only"), run_dir, tmp_path / "reports")
    found = {(f.step, f.reason) for f in list_checkpoints(run_dir)}
    assert {(5, "periodic"), (10, "periodic"), (12, "final")} <= found, found
    assert all(RANKS not in checkpoint.load(f.path) for f in list_checkpoints(run_dir))
    log = (tmp_path / "apart-torchrun.log").read_text()
    assert "checkpoint_every, model or replay differ between ranks" in log


def test_a_checkpoint_keeps_every_ranks_generators_and_each_rank_takes_its_own(tmp_path, caplog):
    """The gathered states travel in a file that loads with weights_only=True; a rank takes
    its own, and a job of another size takes rank 0's (the top-level keys), as before."""
    from trainer import checkpoint
    from trainer.rng import rng_state

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    torch.set_rng_state(states[0]["rng"])
    checkpoint.write_atomic(tmp_path / "ckpt.pt", checkpoint.snapshot(
        model, optimizer, {"step": 0}, states))
    state = checkpoint.load(tmp_path / "ckpt.pt")  # weights_only=True
    for rank, world_size, expected in [(1, 2, states[1]), (0, 2, states[0]), (0, 3, states[0])]:
        torch.manual_seed(99)
        checkpoint.restore(state, model, optimizer, rank=rank, world_size=world_size)
        assert torch.equal(torch.get_rng_state(), expected["rng"]), (rank, world_size)
    assert "saved by 2 ranks and this job has 3" in caplog.text


@pytest.fixture
def one_rank_job(tmp_path):
    """A real gloo process group of one rank, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class SlowBackend:
    """gloo's collectives, each call's tensors then held by the backend (views: C++ references,
    as a work keeps them) until ``release_after`` seconds have passed, or until :meth:`let_go`
    (None); ``fail``: each call raises once it holds them, as one whose peer is gone."""

    def __init__(self, monkeypatch, release_after: float | None = None, fail: bool = False):
        from trainer import distributed

        self.held: list[torch.Tensor] = []
        self.released: list[threading.Event] = []
        self.release_after, self.fail = release_after, fail
        for name in ("all_gather", "broadcast"):
            monkeypatch.setattr(distributed.dist, name, self._holding(getattr(distributed.dist,
                                                                              name)))

    def _holding(self, collective):
        def call(*args, **kwargs):
            if not self.fail:
                collective(*args, **kwargs)
            views = [t[:] for a in args for t in (a if isinstance(a, list) else [a])
                     if isinstance(t, torch.Tensor)]
            if self.release_after is None:
                self.held.extend(views)
                views = []  # held by self.held alone (a traceback keeps this frame)
            else:
                done = threading.Event()
                self.released.append(done)

                def release():
                    done.set()
                    views.clear()
                threading.Timer(self.release_after, release).start()
            if self.fail:
                raise RuntimeError("Connection closed by peer")
        return call

    def let_go(self) -> None:
        self.held.clear()


class NoLoop:
    step_count, paused, should_stop = 0, False, False


def test_every_tensor_given_to_a_collective_is_waited_for(one_rank_job, monkeypatch, caplog):
    """gloo's worker thread lets go of a collective's work a moment after ``wait()`` returned,
    taking the GIL to do so; if the interpreter is exiting then, the process aborts (SIGABRT).
    So every tensor Panda gives a collective is kept until the backend lets go of it, and
    ``retire()`` (the end of ``close``) waits for that: here a backend that holds on, so
    ``retire`` gives up and says how many it still holds: the last meeting's, a shared
    checkpoint's (rank 0's state to every rank) and the final checkpoint's gather."""
    from trainer import distributed

    backend = SlowBackend(monkeypatch)
    coordinator = distributed.DistributedCoordinator()
    coordinator.close(NoLoop(), collective=True)  # the last losses: one all_gather
    state = {"weights": torch.arange(6.0), "step": 7}
    assert coordinator.share(lambda: state)["step"] == 7  # two broadcasts
    gathered = coordinator.gather(lambda: {"rng": torch.get_rng_state()})  # two all_gathers
    assert torch.equal(gathered[0]["rng"], torch.get_rng_state())
    assert len(backend.held) == 8  # 2 + 2 + 4 tensors
    with caplog.at_level("WARNING", logger="trainer.distributed"):
        coordinator.retire(timeout_s=0.2)
    assert "still holds 8 of Panda's tensors" in caplog.text
    caplog.clear()
    threading.Timer(0.3, backend.let_go).start()
    coordinator.retire()
    assert not backend.held and not caplog.text


def test_a_babysitters_close_returns_once_the_backend_has_let_go(one_rank_job, monkeypatch,
                                                                  tmp_path):
    """The whole run, meetings and checkpoints (which gather every rank's generators): when
    the ``with`` block ends, the backend holds none of Panda's tensors, so the script may exit
    at once (here each collective's tensors are let go of 0.3 s late)."""
    from trainer import Babysitter, distributed

    backend = SlowBackend(monkeypatch, release_after=0.3)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Babysitter(optimizer, tmp_path / "run", model=model, checkpoint_every=5,
                    coordinator=distributed.DistributedCoordinator()) as bs:
        for _ in range(12):
            loss = model(torch.ones(4, 2)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bs.step(loss)
    assert len(backend.released) > 8 and all(e.is_set() for e in backend.released)


def test_a_collective_that_raised_is_waited_for_but_not_its_traceback(one_rank_job,
                                                                     monkeypatch, caplog):
    """A peer gone at the last meeting: the backend may still hold the tensors (waited for),
    and the logged traceback keeps them too, which is not the backend (not waited for)."""
    from trainer import distributed

    backend = SlowBackend(monkeypatch, fail=True)
    coordinator = distributed.DistributedCoordinator()
    with caplog.at_level("WARNING"):  # the record keeps the traceback, and so the tensors
        coordinator.close(NoLoop(), collective=True)
        assert "could not average the last losses" in caplog.text
        coordinator.retire(timeout_s=0.3)
        assert "still holds 2 of Panda's tensors" in caplog.text
        backend.let_go()
        caplog.clear()
        coordinator.retire()
        assert not caplog.text  # no 5 s wait for the traceback's references, no warning


def test_a_shared_checkpoints_bytes_are_not_kept_past_the_backend(one_rank_job, monkeypatch):
    """``share`` (resume, rollback) carries a whole checkpoint: it returns once the backend has
    let go of the bytes, rather than keeping them until the next meeting."""
    from trainer import distributed

    backend = SlowBackend(monkeypatch, release_after=0.05)
    coordinator = distributed.DistributedCoordinator()
    assert coordinator.share(lambda: {"weights": torch.zeros(1000)})["weights"].shape == (1000,)
    assert len(backend.released) == 2 and all(e.is_set() for e in backend.released)


def test_a_tensor_is_still_held_while_a_view_or_a_pending_release_refers_to_it():
    """What ``retire()`` waits on: a tensor is let go of once nothing besides its list holds
    it, in C++ (a work's reference, here a view) or in Python (torch keeps a reference to the
    Python object while C++ holds the tensor; the releasing thread drops it under the GIL)."""
    from trainer.distributed import _still_held

    by_view, by_reference, alone = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    view, reference = by_view[:], [by_reference]
    handed = [by_view, by_reference, alone]
    del by_view, by_reference, alone
    assert [id(t) for t in _still_held(handed)] == [id(handed[0]), id(handed[1])]
    del view, reference
    assert _still_held(handed) == []


def test_a_single_process_has_no_distributed_sync(tmp_path):
    """Outside torch.distributed (or with world size 1) nothing changes: no meetings."""
    from trainer import Babysitter
    from trainer.coordinator import Coordinator
    from trainer.distributed import DistributedCoordinator
    from trainer.store import SqliteStore

    assert DistributedCoordinator.detect() is None
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Babysitter(optimizer, tmp_path / "single", sync_every=3) as bs:
        for _ in range(5):
            bs.step(torch.tensor(1.0))
        assert type(bs.coordinator) is Coordinator and bs.coordinator.meet_every == 0
    with SqliteStore(tmp_path / "single") as store:
        assert len(_rows(store)) == 5


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(sys.argv[1:])
