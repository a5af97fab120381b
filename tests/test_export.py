"""Export and replay: what a babysitting session leaves behind must reproduce the run exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from helpers import wait_until

from trainer import Babysitter, cli
from trainer.config import TrainConfig
from trainer.export import ExportError, build_export, load_export, render, replay_commands
from trainer.runner import train
from trainer.store import RunStore, SqliteStore

torch.set_num_threads(1)

CFG = TrainConfig(task="digits", epochs=8, step_delay=0.003, checkpoint_every=10_000)


def _wait_for_step(run_dir, step: int) -> RunStore:
    wait_until(lambda: (run_dir / "run.db").exists(), what="the run store")
    store = SqliteStore(run_dir)
    wait_until(lambda: store.summary()["step"] >= step, what=f"step {step}")
    return store


def _wait_applied(store: RunStore, command_id: int) -> None:
    wait_until(lambda: store.command(command_id).status != "pending", what="the verdict")
    assert store.command(command_id).status == "applied"


def _babysit(run_dir, failures: list) -> None:
    """Turn knobs during the run the way a person would: LR up, momentum and decay, a schedule."""
    try:
        store = _wait_for_step(run_dir, 40)
        _wait_applied(store, store.submit_command("set", {"lr": 0.05}, source="test"))
        wait_until(lambda: store.summary()["step"] >= 120, what="step 120")
        _wait_applied(store, store.submit_command("set", {"momentum": 0.5,
                                                          "weight_decay": 1e-3}, source="test"))
        wait_until(lambda: store.summary()["step"] >= 200, what="step 200")
        _wait_applied(store, store.submit_command("schedule", {"shape": "exponential",
                                                               "rate": 0.7}, source="test"))
        store.close()
    except BaseException as err:  # surfaced by the fixture
        failures.append(err)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A digits run with three live interventions, and its JSON export."""
    run_dir = tmp_path_factory.mktemp("export") / "orig"
    failures: list[BaseException] = []
    person = threading.Thread(target=_babysit, args=(run_dir, failures), daemon=True)
    person.start()
    assert train(CFG, run_dir) == "finished"
    person.join(timeout=60)
    assert not person.is_alive() and not failures, failures
    with SqliteStore(run_dir) as store:
        export = build_export(store)
    return run_dir, export


def test_export_holds_settings_and_the_full_timeline(original):
    _, export = original
    knobs = [(item["knob"], item["old"], item["new"]) for item in export["timeline"]]
    assert knobs[:3] == [("lr", 0.01, 0.05), ("momentum", 0.9, 0.5), ("weight_decay", 0.0, 1e-3)]
    assert export["timeline"][3]["kind"] == "schedule"
    assert {item["source"] for item in export["timeline"]} == {"test"}
    assert export["final"]["momentum"] == 0.5
    assert export["final"]["schedule"]["shape"] == "exponential"
    assert export["initial"]["lr"] == 0.01 and export["final"]["batch_size"] == 32
    assert export["optimizer"] == "SGD" and export["task"]["name"] == "digits"


def test_json_and_yaml_renderings_round_trip(original, tmp_path):
    _, export = original
    for fmt in ("json", "yaml"):
        path = tmp_path / f"export.{fmt}"
        path.write_text(render(export, fmt))
        assert load_export(path) == json.loads(json.dumps(export))


def test_replay_reproduces_the_loss_curve_exactly(original, tmp_path):
    run_dir, export = original
    path = tmp_path / "export.json"
    path.write_text(render(export, "json"))
    replay = replay_commands(load_export(path))
    assert [kind for _, kind, _ in replay] == ["set", "set", "schedule"]
    train(TrainConfig.from_dict(load_export(path)["initial"]), tmp_path / "replay",
          replay=replay)
    with SqliteStore(run_dir) as a, SqliteStore(tmp_path / "replay") as b:
        first, second = a.metrics_since(), b.metrics_since()
        assert len(first["step"]) == CFG.epochs * 45
        for column in ("loss", "lr", "momentum", "weight_decay"):
            assert first[column] == second[column], column
        # The replayed interventions are part of the new run's own timeline.
        assert [e["step"] for e in a.events_since()] == [e["step"] for e in b.events_since()]


def test_python_snippet_reproduces_the_per_step_lr(original, tmp_path):
    run_dir, export = original
    snippet = tmp_path / "settings.py"
    snippet.write_text(render(export, "python"))
    with SqliteStore(run_dir) as store:
        logged = store.metrics_since()["lr"]
    assert len(set(logged)) > 10  # the decay makes this a real trajectory, not a constant
    out = subprocess.run([sys.executable, str(snippet), str(len(logged))], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == logged


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_writes_atomically_inside_the_working_directory(original, tmp_path,
                                                                   monkeypatch, capsys):
    run_dir, _ = original
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(["export", str(run_dir), "--format", "yaml", "--out", "s.yaml"],
                            capsys)
    assert code == 0 and "to" in err
    assert yaml.safe_load((tmp_path / "s.yaml").read_text())["run"] == "orig"
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]  # no temporary file left


@pytest.mark.parametrize("args, reason", [
    (["export", "no-such-run"], "no run"),
    (["export", "RUN", "--out", "../escape.json"], "inside"),
    (["export", "RUN", "--out", "/etc/panda.json"], "inside"),
    (["export", "RUN", "--out", "missing-dir/x.json"], "does not exist"),
    (["export", "RUN", "--out", "."], "directory"),
])
def test_bad_export_requests_exit_2_and_write_nothing(original, tmp_path, monkeypatch, capsys,
                                                     args, reason):
    run_dir, _ = original
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [str(run_dir) if a == "RUN" else a for a in args]
    code, _, err = _run_cli(args, capsys)
    assert code == 2
    assert reason in err and err.count("\n") == 1
    assert list(work.iterdir()) == [] and not (tmp_path / "escape.json").exists()


def test_bad_export_format_is_refused(original, capsys):
    assert cli.main(["export", str(original[0]), "--format", "xml"]) == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown export format"):
        render(original[1], "xml")


@pytest.mark.parametrize("text, reason", [
    ("{not json", "neither JSON nor YAML"),
    ('{"panda_export": 99}', "not a Panda export"),
    ('{"panda_export": 1, "initial": {}}', "no built-in task"),
    ('{"panda_export": 1, "initial": {"task": "digits"}, "timeline": [{"step": 3, '
     '"kind": "set", "command": {"lr": -1}, "command_id": 1}]}', "lr must be"),
])
def test_replay_refuses_bad_exports(tmp_path, capsys, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, _, err = _run_cli(["train", "--replay", str(path), "--run-dir",
                             str(tmp_path / "runs" / "r")], capsys)
    assert code == 2 and reason in err
    assert not (tmp_path / "runs").exists()


# --- a user's own loop with a torch scheduler ------------------------------------------------

def _user_loop(run_dir, *, live: bool = False, replay=None) -> tuple[list, list]:
    """A user's loop (warm-up + cosine LambdaLR, the shape of transformers' schedulers). With
    ``live`` a person sends three changes through the store while it trains; with ``replay``
    the Babysitter re-enacts an export's timeline. Returns (losses, LRs the updates used)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / 120)))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 8, generator=g), torch.randn(512, 1, generator=g)
    changes = {30: {"lr": 0.02}, 60: {"momentum": 0.5}, 90: {"lr": 0.004}} if live else {}
    losses, used = [], []
    with Babysitter(optimizer, run_dir, model=model, replay=replay, flush_interval=0.02,
                    poll_interval=0.005, on_diverge="ignore") as bs, SqliteStore(run_dir) as st:
        for step in range(120):
            i = (step * 32) % 512
            loss = torch.nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            used.append(bs.composition.used_lr)
            if step in changes:
                st.submit_command("set", changes[step], source="test")
                wait_until(lambda: bs.channels.commands, what="the poller")
            bs.step(loss)
        if live:
            wait_until(lambda: all(c.status == "applied" for c in st.commands()),
                       what="every change applied")
    return losses, used


def test_replay_of_a_user_schedule_with_three_live_changes_is_identical(tmp_path):
    losses, used = _user_loop(tmp_path / "user", live=True)
    with SqliteStore(tmp_path / "user") as store:
        export = build_export(store)
    timeline = export["timeline"]
    assert [(t["step"], t["knob"]) for t in timeline] == [(31, "lr"), (61, "momentum"),
                                                          (91, "lr")]
    first = timeline[0]
    assert first["new"] == 0.02 and first["factor"] == pytest.approx(0.02 / first["user_lr"])
    replayed_losses, replayed_used = _user_loop(tmp_path / "replayed",
                                                replay=replay_commands(export))
    assert replayed_losses == losses   # bit for bit, every step
    assert replayed_used == used
    # The export's per-step LR is what the updates used, and the python snippet rebuilds it.
    lrs = _expand(export["trajectory"]["lr"], 120)
    assert lrs == used
    snippet = tmp_path / "settings.py"
    snippet.write_text(render(export, "python"))
    out = subprocess.run([sys.executable, str(snippet), "120"], capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == used


def _expand(segments: list, steps: int) -> list[float]:
    values, index = [], 0
    for step in range(steps):
        while index + 1 < len(segments) and segments[index + 1][0] <= step:
            index += 1
        values.append(segments[index][1])
    return values
