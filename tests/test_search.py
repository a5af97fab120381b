"""Caviar mode: ``panda search`` and ``trainer.search.search`` on Optuna.

Specification: sampled values obey the literature's scales (LR log-uniform: equal counts per
decade; momentum from a log-uniform 1−β); bad ranges exit 2 with one line and start nothing;
pruning happens and is recorded on the trial and in its run; a diverging or crashing trial is
a result and the study goes on; kill -9 of ``panda search`` then ``--resume`` keeps every
finished trial and re-runs exactly the cut ones; coarse to fine narrows the box around the
best; two workers on one study (SQLite file, PostgreSQL) never run the same trial twice; a
person's change to a trial is recorded on it; the best trial exports like any run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from helpers import REPO, panda, panda_cmd, reaped, stream_charts, subprocess_env, wait_until

from trainer import Babysitter, cli
from trainer.search import SearchSpace, SpaceError, search
from trainer.search import study as studies
from trainer.search.rounds import Scored, decades, next_box, plan, split_budget
from trainer.search.space import schedule_for
from trainer.store.address import list_runs, open_store, run_address
from trainer.store.sqlite import SqliteStore

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLES = 4000
TIMEOUT_S = 240  # safety nets against a hung test, never performance assertions


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def draws(space: SearchSpace, n: int = SAMPLES) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out


# --- the scales ---------------------------------------------------------------------------------

def test_lr_is_log_uniform_equal_counts_per_decade():
    samples = draws(SearchSpace(lr=(1e-4, 1.0)))
    lrs = [s["lr"] for s in samples]
    assert all(1e-4 <= lr <= 1.0 for lr in lrs)
    for exponent in (-4, -3, -2, -1):
        count = sum(10.0 ** exponent <= lr < 10.0 ** (exponent + 1) for lr in lrs)
        assert within_binomial(count, SAMPLES, 0.25), (exponent, count)


def test_momentum_is_sampled_as_one_minus_beta_on_a_log_scale():
    samples = draws(SearchSpace(lr=0.01, beta=(0.9, 0.999)))
    betas = [s["momentum"] for s in samples]
    assert all(0.9 <= b <= 0.999 for b in betas)
    # 1 − β in [1e-3, 1e-2) and [1e-2, 1e-1]: half each. Uniform β would put 91 % in the second.
    near_one = sum(1 - b < 1e-2 for b in betas)
    assert within_binomial(near_one, SAMPLES, 0.5), near_one


def test_weight_decay_is_log_uniform_with_an_explicit_zero():
    samples = draws(SearchSpace(lr=0.01, weight_decay=(1e-5, 1e-2)))
    values = [s["weight_decay"] for s in samples]
    zeros = sum(v == 0 for v in values)
    assert within_binomial(zeros, SAMPLES, 0.5), zeros
    nonzero = [v for v in values if v > 0]
    for exponent in (-5, -4, -3):
        count = sum(10.0 ** exponent <= v < 10.0 ** (exponent + 1) for v in nonzero)
        assert within_binomial(count, len(nonzero), 1 / 3), (exponent, count)
    no_zero = draws(SearchSpace(lr=0.01, weight_decay_zero=False), 200)
    assert all(s["weight_decay"] > 0 for s in no_zero)


def test_choices_and_fixed_values():
    samples = draws(SearchSpace(lr=0.03, beta=0.95, weight_decay=0.0, batch_size=(16, 64),
                                hidden=(32,), decay=("constant", "cosine")), 400)
    assert {s["batch_size"] for s in samples} == {16, 64}
    assert {s["decay"] for s in samples} == {"constant", "cosine"}
    assert {(s["lr"], s["momentum"], s["weight_decay"], s["hidden"]) for s in samples} == {
        (0.03, 0.95, 0.0, 32)}


def test_the_grid_baseline_has_exactly_the_budget():
    space = SearchSpace(lr=(1e-4, 1.0), beta=(0.9, 0.999), weight_decay=0.0, batch_size=(32,),
                        hidden=(64,), decay=("constant",))
    points = space.grid(16)
    assert len(points) == 16
    assert sorted({p["lr"] for p in points}) == pytest.approx([1e-4, 10 ** (-8 / 3),
                                                               10 ** (-4 / 3), 1.0])
    assert sorted({p["one_minus_beta"] for p in points}) == pytest.approx(
        [1e-3, 10 ** (-7 / 3), 10 ** (-5 / 3), 1e-1])
    with pytest.raises(SpaceError, match="cannot have exactly 10 trials"):
        space.grid(10)


def test_every_decay_shape_ends_near_a_tenth_of_the_lr():
    from trainer.schedules import schedule_from

    for shape in ("exponential", "inverse_time", "step"):
        factor = schedule_from(schedule_for(shape, 9)).factor(9.0 - 1e-9)  # the last step
        assert factor == pytest.approx(0.1, rel=1e-6), shape
    assert schedule_from(schedule_for("cosine", 9)).factor(9.0) == pytest.approx(0.0, abs=1e-9)
    assert schedule_for("constant", 9) is None


# --- bad input -----------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([os.fspath(a) for a in argv])
    except SystemExit as exit_:  # argparse: a malformed command line
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("args", "reason"), [
    (["--lr", "1:1e-4"], "low 1 must be below high 0.0001"),
    (["--lr", "1e-3:1e-3"], "must be below high"),
    (["--lr", "0:1"], "lr must be in (0"),
    (["--weight-decay", "0:1e-2"], "log scale: its bounds must be > 0"),
    (["--beta", "0.9:1"], "beta must be in [0, 1)"),
    (["--beta", "0.999:0.9"], "must be below high"),
    (["--lr", "1e-4:1:3"], "LOW:HIGH"),
    (["--lr", "fast"], "takes numbers"),
    (["--batch-size", "0,32"], "batch_size values must be whole numbers >= 1"),
    (["--decay", "cosine,wiggly"], "unknown decay shape 'wiggly'"),
    (["--trials", "3", "--rounds", "5"], "3 trials cannot fill 5 rounds"),
    (["--trials", "0"], "trials must be a whole number >= 1"),
    (["--sampler", "grid", "--lr", "1e-4:1", "--trials", "10"], "cannot have exactly 10"),
    (["--sampler", "grid", "--lr", "1e-4:1", "--rounds", "2"], "a grid has no rounds"),
    (["--depth", "1:3"], "unrecognized arguments: --depth"),
    (["--resume", "nothing-here"], "no study 'nothing-here'"),
    (["--resume", "x", "--trials", "3"], "--trials is fixed by the study"),
])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(capsys, tmp_path, args, reason):
    runs = tmp_path / "runs"
    task = [] if "--resume" in args else ["--task", "quadratic"]
    code, out, err = run_cli(capsys, "search", *task, "--runs-dir", runs, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("panda: error: "), err
    assert reason in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    result = panda("search", "--task", "quadratic", "--lr", "-1:1", "--runs-dir",
                   tmp_path / "runs")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert not (tmp_path / "runs").exists()


def test_an_unknown_parameter_in_the_api_is_refused():
    with pytest.raises(SpaceError, match="unknown parameter 'depth'"):
        SearchSpace.from_dict({"depth": (1, 3)})
    with pytest.raises(SpaceError, match="bounds must be > 0"):
        SearchSpace.from_dict({"weight_decay": (0.0, 1e-2)})


# --- coarse to fine ------------------------------------------------------------------------------

def test_the_lr_range_from_a_range_test_runs_no_suggestion_probes(monkeypatch):
    """A search seeds its LR range from ``max_stable_lr`` alone: the range test's suggestion
    probes (a third of the refinement's time again) are not run for it."""
    import trainer.lr_range.finder as finder
    from trainer.search.api import lr_range_from_test
    from trainer.search.config import SearchConfig

    def refuse(*args, **kwargs):
        raise AssertionError("suggestion probes run for a search's LR range")
    monkeypatch.setattr(finder, "_suggestion_probes", refuse)
    lr, note = lr_range_from_test(SearchConfig(task="quadratic").validate())
    assert note["max_stable_lr"] and lr[1] == pytest.approx(note["max_stable_lr"], rel=1e-3)
    assert lr[0] == pytest.approx(lr[1] / 100, rel=1e-3)


def test_coarse_to_fine_narrows_the_box_around_the_best():
    outer = {"lr": (1e-4, 1.0), "one_minus_beta": (1e-3, 1e-1)}
    scored = [Scored(i, True, loss, {"lr": lr, "one_minus_beta": omb}) for i, (loss, lr, omb) in
              enumerate([(0.10, 1e-2, 1e-2), (0.12, 2e-2, 3e-2), (0.5, 1e-4, 1e-3),
                         (0.9, 0.5, 0.09), (0.3, 3e-3, 2e-3), (2.0, 0.9, 0.05),
                         (0.8, 2e-4, 5e-3), (0.7, 0.2, 1e-3)])]
    record = plan(2, outer, outer, scored, top=0.25, margin=0.1)
    box = record["box"]
    assert record["from_trials"] == [0, 1]
    assert decades(box)["lr"] < decades(outer)["lr"] / 2
    assert box["lr"][0] <= 1e-2 and box["lr"][1] >= 2e-2     # contains the best
    assert box["lr"][0] >= 1e-4 and box["lr"][1] <= 1.0       # never outside the space
    assert "#0, #1" in record["why"]
    # pruned trials rank after complete ones; a parameter nobody drew keeps its range
    assert next_box({"weight_decay": (1e-5, 1e-2)}, {}, scored[:2]) == {
        "weight_decay": (1e-5, 1e-2)}
    assert split_budget(10, 3) == [4, 3, 3]


def test_rounds_are_recorded_and_later_rounds_sample_inside_their_box(tmp_path):
    result = search(task="quadratic", space={"lr": (1e-4, 1.0), "beta": 0.9,
                                             "weight_decay": 0.0, "batch_size": [32]},
                    trials=9, rounds=2, epochs=2, prune="none", seed=3, study="c2f",
                    runs_dir=tmp_path / "runs")
    first, second = result["rounds"]
    assert second["round"] == 2 and second["from_trials"] and second["why"]
    assert decades(second["box"])["lr"] < decades(first["box"])["lr"]
    study = load(tmp_path / "runs", "c2f")
    low, high = second["box"]["lr"]
    in_round_2 = [t for t in study.trials if t.user_attrs["round"] == 2]
    assert len(in_round_2) == 4
    assert all(low <= t.params["lr"] <= high for t in in_round_2)


# --- pruning, divergence, failures -----------------------------------------------------------

def load(runs: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=studies.open_storage(runs, name))


def test_pruning_happens_and_is_recorded_on_the_trial_and_in_its_run(tmp_path):
    runs = tmp_path / "runs"
    result = search(task="quadratic", space={"lr": (1e-4, 1e-1), "batch_size": [64]},
                    trials=8, epochs=3, prune="hyperband", seed=0, study="prune",
                    runs_dir=runs)
    assert result["done"]
    pruned = [t for t in load(runs, "prune").trials if t.state == optuna.trial.TrialState.PRUNED
              and t.user_attrs["outcome"] == "pruned"]
    assert pruned, result["outcomes"]
    trial = pruned[0]
    assert trial.user_attrs["reason"].startswith("pruned by hyperband at epoch ")
    assert 1 <= trial.user_attrs["pruned_at"] < 3
    with SqliteStore(runs / trial.user_attrs["run"]) as store:
        meta = store.meta()
        assert meta["study"] == "prune" and meta["trial"] == trial.number
        assert store.summary()["state"] == "stopped"
        events = [e["message"] for e in store.events_since(0)]
    assert any(m.startswith("stop at step") and "pruned by hyperband" in m for m in events)


def test_a_diverging_trial_is_a_result_and_the_study_goes_on(tmp_path):
    runs = tmp_path / "runs"
    result = search(task="quadratic", space={"lr": (1e-2, 30.0), "beta": 0.9},
                    trials=6, epochs=2, prune="none", seed=0, study="div", runs_dir=runs)
    assert result["done"]
    trials = load(runs, "div").trials
    diverged = [t for t in trials if t.user_attrs.get("outcome") == "diverged"]
    assert diverged and result["outcomes"].get("complete"), result["outcomes"]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in diverged)
    assert diverged[0].user_attrs["reason"].startswith("diverged: ")
    with SqliteStore(runs / diverged[0].user_attrs["run"]) as store:
        assert store.summary()["state"] == "stopped"  # not paused, waiting for a person
        assert any("diverged" in e["message"] for e in store.events_since(0))


def tiny_objective(settings, babysitter):
    """A user's own training function: a linear model on fixed data, two epochs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.ones(4, 1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"],
                                momentum=settings["momentum"])
    if settings["batch_size"] == 8:
        raise RuntimeError("out of memory (pretend)")
    with babysitter(optimizer, model=model) as bs:
        for _ in range(2):
            for start in range(0, 64, settings["batch_size"]):
                loss = torch.nn.functional.mse_loss(model(x[start:start + settings[
                    "batch_size"]]), y[start:start + settings["batch_size"]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bs.step(loss)
                if bs.should_stop:
                    return None
            with torch.no_grad():
                bs.log_validation(torch.nn.functional.mse_loss(model(x), y))
            if bs.should_stop:
                return None
    return None


def test_a_crashing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    runs = tmp_path / "runs"
    result = search(tiny_objective, {"lr": (1e-3, 1e-1), "batch_size": [8, 16]},
                    trials=6, epochs=2, prune="none", seed=0, study="crash", runs_dir=runs)
    trials = load(runs, "crash").trials
    failed = [t for t in trials if t.user_attrs.get("outcome") == "failed"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete and len(failed) + len(complete) == 6, result["outcomes"]
    assert failed[0].state == optuna.trial.TrialState.FAIL
    assert failed[0].user_attrs["reason"] == "RuntimeError: out of memory (pretend)"
    assert result["done"] and result["best"]["settings"]["batch_size"] == 16


def test_a_person_changing_a_trial_is_recorded_and_the_pruner_leaves_it_alone(tmp_path):
    runs = tmp_path / "runs"

    def objective(settings, babysitter):
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
        with babysitter(optimizer, model=model) as bs:
            for epoch in range(4):
                for _ in range(5):
                    loss = model(x).pow(2).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    bs.step(loss)
                if epoch == 0:  # what a person does from the dashboard, through the store
                    bs.store.submit_command("set", {"lr": 0.001}, source="dashboard")
                    last = float(loss.detach())
                    wait_until(lambda last=last: (bs.step(last), bs.lr == 0.001)[1], 10,
                               what="the change to land")
                bs.log_validation(10.0 + epoch)  # worse every epoch: the pruner would stop it
                if bs.should_stop:
                    break

    search(objective, {"lr": (1e-3, 1e-2)}, trials=3, epochs=4, prune="hyperband",
           study="manual", runs_dir=runs)
    trials = load(runs, "manual").trials
    assert all(t.user_attrs["manual"] for t in trials)
    interventions = trials[0].user_attrs["interventions"]
    assert interventions[0]["kind"] == "set" and interventions[0]["source"] == "dashboard"
    assert interventions[0]["status"] == "applied"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # never pruned


def test_babysitter_stop_and_on_diverge_stop(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Babysitter(optimizer, tmp_path / "stop", model=model) as bs:
        bs.step(1.0)
        bs.stop("enough")
        assert bs.should_stop
    with SqliteStore(tmp_path / "stop") as store:
        assert store.summary()["state"] == "stopped"
        assert [e["message"] for e in store.events_since(0)][-1] == "stop at step 1: enough"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Babysitter(optimizer, tmp_path / "div", model=model, on_diverge="stop") as bs:
        wait_until(lambda: (bs.step(float("nan")), bs.should_stop)[1], 10, what="the guard")
    with SqliteStore(tmp_path / "div") as store:
        assert store.summary()["state"] == "stopped"
        assert store.meta()["diverged"]["cause"]


# --- processes: kill -9 and resume, two workers, export ------------------------------------------

def start_search(*args, log: Path) -> subprocess.Popen:
    """``panda search ARGS`` in the background: stdout to ``log``, stderr to ``log``.err."""
    with open(log, "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(panda_cmd("search", *args), stdout=out, stderr=err,
                                env=subprocess_env(), cwd=REPO,
                                start_new_session=True)  # its own group: kill -9 reaches all


def trials_of(runs: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return load(runs, name).trials
    except (studies.StudyError, KeyError):
        return []


def test_kill_9_then_resume_keeps_finished_trials_and_reruns_the_cut_ones(tmp_path):
    runs = tmp_path / "runs"
    # A space in which no trial can diverge (the quadratic's minibatch SGD is unstable from an LR
    # of about 0.09 with β 0.9, and sooner with a larger β): the test counts outcomes, and a CI
    # run once drew a trial that diverged.
    proc = start_search("--task", "quadratic", "--lr", "1e-3:3e-2", "--beta", "0.9",
                        "--batch-size", "32", "--trials", "4", "--parallel", "2", "--epochs", "2",
                        "--prune", "none", "--step-delay", "0.04", "--study", "cut",
                        "--runs-dir", runs, log=tmp_path / "search.log")
    with reaped(proc):
        def one_done_one_running():
            states = [t.state for t in trials_of(runs, "cut")]
            return (optuna.trial.TrialState.COMPLETE in states
                    and optuna.trial.TrialState.RUNNING in states)

        wait_until(one_done_one_running, TIMEOUT_S, 0.05, "a finished and a running trial")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The study as the kill left it (read before the kill, a trial could still finish or start
    # in between, and the test would blame the resume for it).
    before = {t.number: t for t in trials_of(runs, "cut")}
    finished = {n: t.value for n, t in before.items()
                if t.state == optuna.trial.TrialState.COMPLETE}
    resumed = panda("search", "--resume", "cut", "--runs-dir", runs, "--json",
                    timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "re-queued" in resumed.stderr
    after = {t.number: t for t in trials_of(runs, "cut")}
    for number, value in finished.items():  # kept, not trained again
        assert after[number].value == value
        assert after[number].datetime_complete == before[number].datetime_complete
    cut = [n for n, t in after.items() if t.user_attrs.get("outcome") == "cut"]
    assert cut and all(before[n].state == optuna.trial.TrialState.RUNNING for n in cut)
    reruns = {t.user_attrs["rerun_of"]: t for t in after.values() if "rerun_of" in t.user_attrs}
    assert sorted(reruns) == sorted(cut)
    for number, rerun in reruns.items():
        assert rerun.state == optuna.trial.TrialState.COMPLETE
        # The rerun keeps what the cut trial had drawn; a kill between two of its draws left
        # only some (the rest are drawn anew).
        assert after[number].params.items() <= rerun.params.items()
    summary = json.loads(resumed.stdout)
    assert summary["done"] and summary["outcomes"] == {"complete": 4, "cut": len(cut)}


def check_each_trial_ran_once(trials, runs_root, expected: int) -> set[int]:
    """Every slot held by one trial that finished, every run belongs to one trial; returns the
    worker pids that ran trials."""
    holders = [t for t in trials if not studies.is_cut(t) and not studies.is_surplus(t)]
    slots = [t.user_attrs["slot"] for t in holders]
    assert len(slots) == len(set(slots)) == expected, slots
    assert all(t.state in studies.FINISHED for t in holders)
    run_names = [t.user_attrs["run"] for t in trials if "run" in t.user_attrs]
    assert len(run_names) == len(set(run_names))
    listed = [r["run"] for r in list_runs(runs_root)]
    assert sorted(listed) == sorted(run_names)
    for trial in holders:
        with open_store(run_address(runs_root, trial.user_attrs["run"])) as store:
            meta = store.meta()
        assert meta["trial"] == trial.number and meta["pid"] == trial.user_attrs["worker"]["pid"]
    return {t.user_attrs["worker"]["pid"] for t in holders}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_and_a_joined_one_never_run_the_same_trial_twice(tmp_path, backend,
                                                                     request):
    runs = tmp_path / "runs"
    where = [] if backend == "sqlite" else ["--store",
                                             request.getfixturevalue("pg_server").new_database()]
    root = runs if backend == "sqlite" else where[1]
    first = start_search("--task", "quadratic", "--lr", "1e-3:1e-1", "--trials", "6",
                         "--parallel", "2", "--epochs", "2", "--prune", "none",
                         "--step-delay", "0.02", "--study", "two", "--runs-dir", runs, "--json",
                         *where, log=tmp_path / "first.log")
    with reaped(first):
        wait_until(lambda: studies.study_names(root), TIMEOUT_S, 0.1, "the study")
        joined = panda("search", "--join", "two", "--parallel", "1", "--runs-dir", runs, *where,
                       timeout=TIMEOUT_S)
        assert joined.returncode == 0, joined.stderr
        assert first.wait(TIMEOUT_S) == 0, (tmp_path / "first.err").read_text()
    storage = studies.open_storage(root, "two")
    trials = optuna.load_study(study_name="two", storage=storage).trials
    pids = check_each_trial_ran_once(trials, root, 6)
    assert len(pids) >= 2
    best = json.loads((tmp_path / "first.log").read_text())["best"]
    exported = panda("export", best["run"], "--runs-dir", runs, *where)
    assert exported.returncode == 0, exported.stderr
    initial = json.loads(exported.stdout)["initial"]
    assert initial["lr"] == best["settings"]["lr"]
    assert initial["batch_size"] == best["settings"]["batch_size"]


# --- the study view ------------------------------------------------------------------------------

def fake_study(runs: Path, name: str, count: int) -> None:
    """A finished study of ``count`` trials (random settings and curves), without training."""
    import random

    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from trainer.search.config import SearchConfig
    from trainer.search.rounds import first_plan

    cfg = SearchConfig(task="digits", trials=count, study=name,
                       space=SearchSpace(lr=(1e-4, 1.0))).validate()
    study = optuna.create_study(study_name=name,
                                storage=studies.open_storage(runs, name, create=True))
    study.set_user_attr(studies.CONFIG_ATTR, cfg.to_dict())
    study.set_user_attr("round_1", first_plan(cfg.space.outer_box()))
    rng = random.Random(0)
    distributions = {"lr": FloatDistribution(1e-4, 1.0, log=True),
                     "one_minus_beta": FloatDistribution(1e-3, 1e-1, log=True),
                     "batch_size": CategoricalDistribution((16, 32, 64, 128))}
    made = []
    for number in range(count):
        params = {"lr": 10 ** rng.uniform(-4, 0), "one_minus_beta": 10 ** rng.uniform(-3, -1),
                  "batch_size": rng.choice((16, 32, 64, 128))}
        epochs = rng.choice((1, 3, 10))
        curve = {e: 2.0 / e + abs(math.log10(params["lr"]) + 2) for e in range(1, epochs + 1)}
        best = min(curve.values())
        settings = {"lr": params["lr"], "momentum": 1 - params["one_minus_beta"],
                    "weight_decay": 0.0, "batch_size": params["batch_size"], "hidden": 64,
                    "decay": "cosine"}
        complete = epochs == 10
        made.append(optuna.trial.create_trial(
            params=params, distributions=distributions, value=best if complete else None,
            intermediate_values=curve,
            state=optuna.trial.TrialState.COMPLETE if complete else
            optuna.trial.TrialState.PRUNED,
            user_attrs={"slot": f"1.{number}", "round": 1, "run": f"{name}-{number}",
                        "settings": settings, "epoch": epochs, "best": best,
                        "outcome": "complete" if complete else "pruned",
                        "reason": None if complete else f"pruned by hyperband at epoch "
                        f"{epochs}", "pruned_at": None if complete else epochs}))
    study.add_trials(made)


def test_the_study_view_shows_200_trials_and_picking_a_trial_opens_it(make_run, tmp_path,
                                                               monkeypatch):
    from streamlit.testing.v1 import AppTest

    fake_study(tmp_path / "runs", "big", 200)
    for number in (0, 1):
        run_dir = make_run(f"big-{number}")
        with SqliteStore(run_dir) as store:
            store.set_meta(study="big", trial=number)
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    app = str(REPO / "app" / "main.py")
    at = AppTest.from_file(app, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any(m.value == "#### Study big" for m in at.markdown)
    (table,) = [d for d in at.dataframe if len(d.value) == 200]
    assert list(table.value["trial"][:2]) == [199, 198]  # newest first
    # The run's chart and the study's three, each the chart component that keeps a zoom.
    assert {"training_chart", "study_lr", "study_coords", "study_curves"} <= set(
        stream_charts(at))
    # What a click on a row does (app.study._open_selected sets the picker), then the page
    # opens that trial's run. The browser test clicks for real.
    picked = at.sidebar.selectbox(key="run_picker").value
    other = "big-1" if picked == "big-0" else "big-0"
    at.session_state["study_open_run"] = other
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="run_picker").value == other


POP_SCRIPT = """
import sys, optuna
from trainer.search import study as studies
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="pop", storage=studies.open_storage(sys.argv[1], "pop"))
def objective(trial):
    print(trial.number, flush=True)
    return 0.0
while any(t.state == optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False)):
    study.optimize(objective, n_trials=1)
"""


def test_waiting_trials_go_to_one_worker_each_on_sqlite(tmp_path):
    """Optuna's hand-over of a waiting trial relies on SELECT … FOR UPDATE, which SQLite
    ignores; the study's SQLite storage takes the write lock at BEGIN instead."""
    runs = tmp_path / "runs"
    study = optuna.create_study(study_name="pop",
                                storage=studies.open_storage(runs, "pop", create=True))
    for _ in range(60):
        study.enqueue_trial({})
    procs = [subprocess.Popen([sys.executable, "-c", POP_SCRIPT, str(runs)],
                              stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
             for _ in range(4)]
    numbers = []
    for proc in procs:
        with reaped(proc):
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        numbers += [int(n) for n in out.split()]
    assert len(numbers) == len(set(numbers)), sorted(numbers)  # no trial ran twice
    assert set(range(60)) <= set(numbers)  # (a worker that found none left made a new one)


OPEN_SCRIPT = """
import sys
from trainer.search import study as studies
studies.open_storage(sys.argv[1], "race", create=sys.argv[2] == "create").engine.dispose()
"""


def test_processes_opening_a_new_postgresql_study_storage_at_once_all_succeed(pg_server):
    """A search creating Optuna's tables while readers (a dashboard, a joining worker) open
    the same storage: Optuna's table creation and schema stamping raced in PostgreSQL's
    catalog (pg_type's unique index) and the search died. Each process opens it once, all at
    the same moment; every one that creates must succeed, and no reader may fail otherwise
    than with the one-line 'no tables yet' StudyError."""
    for _ in range(3):  # a race: a few fresh databases
        url = pg_server.new_database()
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_SCRIPT, url,
                                   "create" if i % 2 == 0 else "read"],
                                  stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                                  cwd=REPO) for i in range(6)]
        for i, proc in enumerate(procs):
            _, err = proc.communicate(timeout=TIMEOUT_S)
            assert "pg_type_typname_nsp_index" not in err and "UniqueViolation" not in err, err
            if i % 2 == 0:
                assert proc.returncode == 0, err
        # The tables are there, whole (a query over them works), and hold no study yet.
        assert optuna.get_all_study_names(studies.open_storage(url, "race")) == []
