"""LR range tests beside a live run (``trainer.lr_range.job``, ``panda lr-find``) and the panel's
pure helpers (``app.lr_panel``)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.helpers import panda, panda_cmd, start_train, subprocess_env, train_log, wait_until
from trainer import checkpoint_files
from trainer.cli import main as cli_main
from trainer.lr_range import job as lr_job
from trainer.lr_range.finder import CHECK_EVERY, lr_find
from trainer.lr_range.results import LRFindResult
from trainer.lr_range.suggestions import RULES
from trainer.store import SqliteStore
from trainer.tasks import make_task

torch.set_num_threads(1)

CLOSED_FORM_TOLERANCE = 1.5


# --- standalone -----------------------------------------------------------------------------------

def test_standalone_quadratic_matches_closed_form():
    out = panda("lr-find", "--task", "quadratic", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # `panda train` defaults: SGD with momentum 0.9; the standalone quadratic test uses the full
    # batch, the setting of the closed form 2(1+β)/λmax.
    closed_form = make_task("quadratic").max_stable_lr(0.9)
    ratio = result["max_stable_lr"] / closed_form
    assert 1 / CLOSED_FORM_TOLERANCE <= ratio <= CLOSED_FORM_TOLERANCE


def test_lr_find_for_task_api_and_text_output(capsys):
    result = lr_job.lr_find_for_task("quadratic", num_iter=30, refine=False)
    assert isinstance(result, LRFindResult) and len(result.lrs) <= 30
    assert result.purpose == "start"   # a fresh model: the LR to start training with
    with pytest.raises(lr_job.LRJobError, match="unknown task"):
        lr_job.lr_find_for_task("imagenet")
    assert cli_main(["lr-find", "--task", "quadratic", "--num-iter", "30", "--no-refine"]) == 0
    text = capsys.readouterr().out
    assert "suggested LR" in text and "max stable LR" in text and "stopped" in text


def test_purpose_defaults_to_continue_beside_a_run_and_is_checked():
    assert lr_job.check_options()["purpose"] == "continue"
    assert lr_job.check_options(purpose="start")["purpose"] == "start"
    with pytest.raises(lr_job.LRJobError, match="unknown purpose"):
        lr_job.check_options(purpose="later")
    assert cli_main(["lr-find", "--task", "quadratic", "--purpose", "sometime"]) == 2


def test_json_output_says_the_rule_and_the_purpose(capsys):
    """`panda lr-find --task … --json`: a fresh model's suggestion is for starting, made by a
    named rule from probes that are in the output; asked to continue, it compares with the
    task's LR and says so."""
    assert cli_main(["lr-find", "--task", "quadratic", "--num-iter", "60", "--json"]) == 0
    start = json.loads(capsys.readouterr().out)
    assert start["purpose"] == "start"
    assert start["suggestion_rule"] in RULES
    assert start["suggestion_probes"]
    assert cli_main(["lr-find", "--task", "quadratic", "--num-iter", "60", "--json",
                     "--purpose", "continue"]) == 0
    more = json.loads(capsys.readouterr().out)
    assert more["purpose"] == "continue"
    assert more["suggestion_rule"] in ("keep_current", "continue_probes")
    assert more["current_lr"] == pytest.approx(0.01)        # `panda train`'s default LR
    assert more["current_lr"] in [p["lr"] for p in more["suggestion_probes"]]


def test_text_output_names_the_rule_and_what_the_suggestion_is_for(capsys):
    assert cli_main(["lr-find", "--task", "quadratic", "--num-iter", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rule = next(line.split(None, 1)[1] for line in lines if line.strip().startswith("rule "))
    assert rule.split(":")[0] in RULES
    assert any(line.split() == ["for", "starting", "training", "from", "these", "weights"]
               for line in lines), lines


# --- the progress callback ------------------------------------------------------------------------

def test_progress_is_reported_per_chunk_and_ends_at_one():
    task = make_task("quadratic")
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01, momentum=0.9)
    calls: list[float] = []
    result = lr_find(task.model, optimizer, task.loss_fn, [(task.train_x, task.train_y)],
                     num_iter=50, progress=calls.append)
    probes = result.refine_probes + result.suggestion_probes
    assert result.suggestion_probes
    steps = len(result.lrs) + sum(p.steps for p in probes)
    assert calls[-1] == 1.0
    assert all(0 <= a <= b <= 1 for a, b in itertools.pairwise(calls))
    # Once per chunk of CHECK_EVERY steps (each probe ends with a short chunk), never per step.
    chunks = math.ceil(len(result.lrs) / CHECK_EVERY) + sum(
        math.ceil(p.steps / CHECK_EVERY) for p in probes)
    assert len(calls) == chunks + 1 < steps


# --- the panel's pure helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored_payload():
    task = make_task("quadratic")
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01, momentum=0.9)
    result = lr_find(task.model, optimizer, task.loss_fn, [(task.train_x, task.train_y)],
                     start_lr=1e-5, num_iter=60)
    # As read back from the results table: JSON-decoded, non-finite numbers as strings.
    return json.loads(json.dumps({**result.to_dict(), "checkpoint_step": 40}))


def test_figure_draws_curves_band_marker_and_limit(stored_payload):
    from app.lr_panel import lr_find_figure

    p = stored_payload
    fig = lr_find_figure(p)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"raw loss", "smoothed loss", "suggested range", "suggested lr",
                           "max stable lr"}
    assert fig.layout.xaxis.type == "log"
    assert list(traces["raw loss"].x) == p["lrs"]
    assert traces["raw loss"].opacity < 1 and traces["smoothed loss"].opacity in (None, 1)
    assert list(traces["suggested lr"].x) == [p["suggested_lr"]]
    # On the smoothed curve, interpolated in log LR (a suggestion from probes is between the
    # ramp's LRs).
    k = int(np.searchsorted(p["lrs"], p["suggested_lr"]))
    (x0, x1), (y0, y1) = p["lrs"][k - 1:k + 1], p["smoothed_losses"][k - 1:k + 1]
    t = math.log(p["suggested_lr"] / x0) / math.log(x1 / x0)
    assert 0 <= t <= 1
    assert traces["suggested lr"].y[0] == pytest.approx(y0 + t * (y1 - y0))
    low, high = p["suggestion_range"]
    assert min(traces["suggested range"].x) == low and max(traces["suggested range"].x) == high
    assert set(traces["max stable lr"].x) == {p["max_stable_lr"]}
    y0, y1 = fig.layout.yaxis.range
    assert tuple(traces["max stable lr"].y) == (y0, y1)
    finite = [v for v in p["smoothed_losses"] if isinstance(v, float)]
    assert y0 < min(finite) and max(finite) < y1


def test_summary_names_the_rule_the_purpose_and_a_flat_curve(stored_payload):
    from app.lr_panel import lr_find_summary

    text = lr_find_summary(stored_payload)
    rule = stored_payload["suggestion_rule"]
    assert f"**rule** {rule}: {RULES[rule]}" in text
    assert "**for** starting training" in text
    flat = {**stored_payload, "purpose": "continue", "current_lr": 0.1, "flat": True}
    text = lr_find_summary(flat)
    assert "**for** continuing the run from its checkpoint, compared with its LR 1e-01" in text
    assert "**curve** flat" in text


def test_the_flat_note_says_how_the_curve_is_flat_and_where_the_suggestion_comes_from():
    """A ramp that only rose until it diverged is flat too, but not "barely changed"; and a
    suggestion from the probes does not rest on the flat curve (both said on the page and by
    the CLI, from this one note)."""
    lrs = list(np.geomspace(1e-6, 1.0, 40))
    level = {"lrs": lrs, "losses": [1.0] * 40, "flat": True, "diverged_at": None,
             "suggestion_rule": "steepest"}
    assert lr_job.flat_note({**level, "flat": False}) is None
    assert lr_job.flat_note(level) == ("the loss barely changed over the whole ramp, so the "
                                       "curve says little about the LR.")
    rising = {**level, "losses": [1.0 + i / 10 for i in range(39)] + ["inf"],
              "flat": None, "diverged_at": lrs[-1], "suggestion_rule": "continue_probes"}
    assert lr_job.flat_note(rising) == (
        "the loss barely fell before the ramp diverged, so the curve says little about the LR."
        " The suggestion comes from the probes, which trained at each LR.")
    assert dict(lr_job.describe_result(rising))["curve"] == f"flat: {lr_job.flat_note(rising)}"


def test_results_stored_before_rules_and_purposes_are_still_described():
    old = {"lrs": list(np.geomspace(1e-6, 1.0, 40)), "losses": [1.0] * 40,
           "smoothed_losses": [1.0] * 40, "stop_reason": "completed 40 steps",
           "suggested_lr": 1e-3, "suggestion_method": "steepest",
           "suggestion_range": [3e-4, 3e-3], "max_stable_lr": None, "diverged_at": None}
    lines = dict(lr_job.describe_result(old))
    assert lines["suggested LR"].startswith("1e-03 (steepest; range")
    assert lines["rule"].startswith("steepest: steepest descent")
    assert "for" not in lines                       # nobody asked it for a purpose then
    assert lines["curve"].startswith("flat")        # computed from the stored curve
    assert lr_job.curve_is_flat(old) and not lr_job.curve_is_flat({**old, "flat": False})


def test_panel_policy_stale_confirm_and_factor():
    from app.lr_panel import (
        CONFIRM_FACTOR,
        STALE_STEPS,
        format_factor,
        lr_factor,
        needs_confirmation,
        stale_age,
    )

    # The case: measured at step 26,800, still offered at 52,000.
    assert stale_age(26_800, 52_000) == 25_200
    assert stale_age(26_800, 26_800 + STALE_STEPS) is None      # fresh: not STALE_STEPS yet
    assert stale_age(40_000, 48_000) is None                    # < a quarter more training
    assert stale_age(200, 1_500) == 1_300                       # early on, 1,300 steps matter
    assert stale_age(None, 5_000) is None and stale_age(100, None) is None
    assert lr_factor(8.3, 0.1) == pytest.approx(83) and lr_factor(1.0, None) is None
    assert needs_confirmation(8.3, 0.1)                         # 83×
    assert not needs_confirmation(CONFIRM_FACTOR * 0.1, 0.1)    # exactly the factor: one click
    assert not needs_confirmation(0.01, 0.1)                    # lowering never asks
    assert needs_confirmation(0.01, None)                       # factor unknown: ask
    assert (format_factor(83.0), format_factor(2.5), format_factor(0.25)) == \
        ("83×", "2.5×", "0.25×")
    assert format_factor(1234.0) == "1,234×"


def test_figure_and_summary_without_suggestion_or_limit():
    from app.lr_panel import lr_find_figure, lr_find_summary

    payload = {"lrs": [1e-3, 1e-2, 1e-1], "losses": [1.0, "nan", "inf"],
               "smoothed_losses": [1.0, "nan", "inf"], "stop_reason": "non-finite loss",
               "suggested_lr": None, "suggestion_range": None, "max_stable_lr": None,
               "diverged_at": 1e-2, "suggestion_reason": "only 1 finite loss points, need 5"}
    names = {t.name for t in lr_find_figure(payload).data}
    assert names == {"raw loss", "smoothed loss"}
    text = lr_find_summary(payload)
    assert "**suggested LR** none: only 1 finite" in text and "not found" in text


def test_summary_states_the_numbers(stored_payload):
    from app.lr_panel import lr_find_summary
    from trainer.knobs import format_sci

    text = lr_find_summary(stored_payload)
    assert format_sci(stored_payload["suggested_lr"]) in text
    assert format_sci(stored_payload["max_stable_lr"]) in text
    assert "step 40" in text


# --- a real `panda train` run, shared by the live-run tests (last: it trains only then) --

@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lrjob") / "live"
    proc = start_train(run_dir, "--task", "digits", "--epochs", "200", "--step-delay", "0.01",
                       "--checkpoint-every", "20")
    try:
        wait_until(lambda: checkpoint_files.find(run_dir) is not None or proc.poll() is not None,
                   what="the first checkpoint")
        assert proc.poll() is None, train_log(run_dir)
        yield run_dir, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _step(run_dir) -> int:
    with SqliteStore(run_dir) as store:
        return store.summary()["step"]


def _run_files(run_dir) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


def test_lr_find_beside_a_live_run(live_run):
    run_dir, _ = live_run
    files_before = _run_files(run_dir)
    step_at_start = _step(run_dir)
    finder = subprocess.Popen(panda_cmd("lr-find", run_dir, "--json", "--num-iter", "60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env())
    steps_during = []
    while finder.poll() is None:
        steps_during.append(_step(run_dir))
        time.sleep(0.05)
    out, err = finder.communicate()
    assert finder.returncode == 0, err
    result = json.loads(out)
    for name in ("suggested_lr", "max_stable_lr"):
        assert isinstance(result[name], float) and math.isfinite(result[name]), result[name]
    low, high = result["suggestion_range"]
    assert low <= result["suggested_lr"] <= high
    assert 0 < result["checkpoint_step"] <= max([*steps_during, step_at_start])
    # The run trained during the test and goes on after it.
    assert max(steps_during) > step_at_start
    step_after = _step(run_dir)
    wait_until(lambda: _step(run_dir) > step_after, what="the run to keep training")
    with SqliteStore(run_dir) as store:
        assert store.summary()["state"] == "running"
        row = lr_job.latest_lr_find(store)
    assert row["id"] == result["id"] and row["status"] == "done"
    stored = LRFindResult.from_dict(row["payload"])
    assert stored.suggested_lr == result["suggested_lr"]
    assert row["payload"]["checkpoint_step"] == result["checkpoint_step"]
    assert row["payload"]["progress"] == 1.0
    # By default the curve is the loss on fixed training samples, not mini-batch noise.
    assert row["payload"]["options"]["measure"] == "train" and row["payload"]["validation"]
    # Beside a live run the suggestion is what to continue with, compared with its LR now.
    assert result["purpose"] == "continue" and result["current_lr"] == 0.01
    assert result["suggestion_rule"] in ("keep_current", "continue_probes")
    assert result["suggestion_probes"] and stored.suggestion_probes
    assert _run_files(run_dir) <= files_before | {"run.db-shm", "run.db-wal"}


def _background_result(run_dir, *args: str) -> dict:
    """Start ``panda lr-find RUN --background`` and return its finished result's payload."""
    out = panda("lr-find", run_dir, "--background", "--json", "--num-iter", "40",
                "--no-refine", *args)
    assert out.returncode == 0, out.stderr
    result_id = json.loads(out.stdout)["id"]

    def finished():
        with SqliteStore(run_dir) as store:
            row = lr_job.latest_lr_find(store)
        return row if row["id"] == result_id and row["status"] != "running" else None

    row = wait_until(finished, what="the background LR range test")
    assert row["status"] == "done", row["payload"].get("error")
    return row["payload"]


def test_background_job_reports_progress_and_result(live_run):
    run_dir, _ = live_run
    payload = _background_result(run_dir)
    assert payload["options"]["refine"] is False and payload["refine_probes"] == []
    assert len(payload["lrs"]) <= 40 and payload["progress"] == 1.0
    with SqliteStore(run_dir) as store:
        assert store.summary()["state"] == "running"


def test_a_background_job_asked_what_to_start_with_says_so(live_run):
    """`--purpose start` beside a run reaches the detached job (its default is "continue")."""
    run_dir, _ = live_run
    payload = _background_result(run_dir, "--purpose", "start")
    assert payload["options"]["purpose"] == "start" and payload["purpose"] == "start"
    # Without refinement there are no probes: the ramp's own rule, named.
    assert payload["suggestion_probes"] == [] and payload["suggestion_rule"] in RULES
    lines = dict(lr_job.describe_result(payload))
    assert lines["for"] == "starting training from these weights"


def test_second_job_refused_while_one_runs(live_run, capsys):
    run_dir, _ = live_run
    with SqliteStore(run_dir) as store:
        # A running row owned by a live process (this one) blocks a second test.
        result_id = store.add_result("lr_find", {"progress": 0.3, "pid": os.getpid()},
                                     status="running")
        try:
            assert "already running" in lr_job.readiness(store)
            with pytest.raises(lr_job.LRJobError, match="already running"):
                lr_job.start_lr_find_job(run_dir)
            assert cli_main(["lr-find", str(run_dir), "--background"]) == 2
            assert "already running" in capsys.readouterr().err
        finally:
            store.update_result(result_id, {"error": "test row"}, status="failed")


def test_bad_inputs_exit_2_and_change_nothing(live_run, tmp_path, capsys):
    run_dir, _ = live_run
    with SqliteStore(run_dir) as store:
        rows_before = len(store.results())
    out = panda("lr-find", tmp_path / "no-such-run", "--json")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no run" in out.stderr
    for args, message in ((["--num-iter", "1"], "num_iter must be"),
                          (["--start-lr", "-1"], "start_lr must be"),
                          (["--start-lr", "1", "--end-lr", "0.1"], "below end_lr"),
                          (["--end-lr", "nan"], "end_lr must be")):
        assert cli_main(["lr-find", str(run_dir), *args]) == 2, args
        assert message in capsys.readouterr().err
    assert cli_main(["lr-find", "--task", "digits", "--num-iter", "1"]) == 2
    assert cli_main(["lr-find"]) == 2                  # neither RUN nor --task
    assert cli_main(["lr-find", str(run_dir), "--task", "digits"]) == 2
    assert cli_main(["lr-find", str(run_dir), "--measure", "sometimes"]) == 2  # argparse
    with SqliteStore(run_dir) as store:
        assert len(store.results()) == rows_before


def test_run_without_a_builtin_config_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "own-loop"
    with SqliteStore(run_dir, create=True) as store:
        store.set_meta(name="own-loop", config={"batch_size": 32}, status="running")
        assert "not started by `panda train`" in lr_job.readiness(store)
    assert cli_main(["lr-find", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not started by `panda train`" in err
    with pytest.raises(lr_job.LRJobError):
        lr_job.start_lr_find_job(run_dir)
    with SqliteStore(run_dir) as store:
        assert store.results() == []


def test_run_without_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "fresh"
    with SqliteStore(run_dir, create=True) as store:
        store.set_meta(name="fresh", config={"task": "digits"}, status="starting")
        assert "no checkpoint yet" in lr_job.readiness(store)
    with pytest.raises(lr_job.LRJobError, match="no checkpoint yet"):
        lr_job.run_lr_find_for_run(run_dir)


def test_dead_job_reads_as_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with SqliteStore(tmp_path / "r", create=True) as store:
        store.add_result("lr_find", {"progress": 0.5, "pid": dead.pid}, status="running")
        row = lr_job.latest_lr_find(store)
    assert row["status"] == "failed" and "exited without a result" in row["payload"]["error"]
    never = {"status": "running", "created": time.time() - 2 * lr_job.START_GRACE_S,
             "payload": {"progress": 0.0}}
    assert lr_job.effective_status(never)[0] == "failed"
    assert lr_job.effective_status({**never, "created": time.time()})[0] == "running"
