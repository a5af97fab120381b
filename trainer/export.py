"""Settings export and replay: leave a babysitting session with settings you can trust.

An export holds the settings a run ended with, the settings it started with, and the full
intervention timeline (step, knob, old → new, source; for an LR change also the user's own LR
then and the factor Panda holds from there on), and the per-step values every update used
(the effective LR and, beside it, the user's own LR). Three renderings:

* ``json`` / ``yaml``: the export itself; ``panda train --replay FILE`` re-runs a built-in task
  with the timeline applied at the recorded steps (on CPU with the same seed the loss curve is
  identical, step for step).
* ``python``: a runnable snippet that builds the optimizer and a
  ``torch.optim.lr_scheduler.LambdaLR`` reproducing the exact per-step LR actually used,
  manual changes included, plus the momentum / weight-decay trajectory.
"""

from __future__ import annotations

import json
import os
import time
from itertools import groupby
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from trainer import atomic
from trainer.commands import validate_command
from trainer.store.base import RunStore

EXPORT_VERSION = 1
FORMATS = ("json", "yaml", "python")
# What a replay re-enacts at the recorded steps: pause/resume change nothing in a replay (the
# step counter stands still meanwhile), a person's rollback is done again, and the divergence
# guard's own rescue (no command: a rollback and a halved LR) is re-enacted from its events,
# since a replay's guard could notice the blow-up a few steps earlier or later.
REPLAYABLE_KINDS = ("set", "schedule", "stop", "rollback")


class ExportError(ValueError):
    """An export or replay request that cannot be honoured (bad file, unknown format, …)."""


def build_export(store: RunStore) -> dict[str, Any]:
    """The export of one run as a plain, JSON-serializable dict."""
    meta = store.meta()
    summary = store.summary()
    metrics = store.metrics_since(-1, columns=("step", "lr", "momentum", "weight_decay",
                                               "user_lr"))
    user_lr = dict(zip(metrics["step"], metrics["user_lr"]))
    timeline = build_timeline(store)
    for item in timeline:
        user = user_lr.get(item["step"])
        if item["knob"] == "lr" and user and item["new"] is not None:
            # The factor Panda holds from here on: the user's own schedule × factor.
            item.update(user_lr=user, factor=item["new"] / user)
    config = meta.get("config") or {}
    return {
        "panda_export": EXPORT_VERSION,
        "run": summary["run"],
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": summary["state"],
        "task": {"name": config.get("task"), "description": meta.get("task")},
        "optimizer": meta.get("optimizer"),
        "steps_per_epoch": meta.get("steps_per_epoch"),
        "steps": summary["step"],
        "initial": config,
        "parent": meta.get("parent"),   # a branch: the run and step it started from
        "final": {"lr": summary["lr"], "momentum": summary["momentum"],
                  "weight_decay": summary["weight_decay"], "schedule": meta.get("schedule"),
                  **{k: config[k] for k in ("batch_size", "epochs", "seed") if k in config}},
        "timeline": timeline,
        # Per-step values the updates used (lr: the effective LR), and the user's own LR.
        "trajectory": {name: _segments(metrics["step"], metrics[name])
                       for name in ("lr", "momentum", "weight_decay", "user_lr")},
    }


def build_timeline(store: RunStore, kinds: tuple[str, ...] = REPLAYABLE_KINDS
                   ) -> list[dict[str, Any]]:
    """The run's interventions of ``kinds``, one item per event, in order: step, kind, knob,
    old → new, source and the command's payload (what a replay applies again)."""
    commands = {c.id: c for c in store.commands()}
    timeline = []
    for event in store.events_since(0):
        command = commands.get(event["command_id"])
        item = {"step": event["step"], "knob": event["knob"], "old": event["old"],
                "new": event["new"]}
        if command is not None and command.kind in kinds:
            item.update(kind=command.kind, source=command.source, command_id=command.id,
                        command=json.loads(command.payload) if command.payload else {})
        elif command is None and "rollback" in kinds and event["kind"] in ("rollback", "set"):
            rescue = _rescue(event)  # the divergence guard's own action
            if rescue is None:
                continue
            item.update(kind=event["kind"], source="guard", command_id=None, command=rescue)
        else:
            continue
        timeline.append(item)
    return timeline


def _rescue(event: dict[str, Any]) -> dict[str, Any] | None:
    """The command that re-enacts a divergence guard's rescue event, or None."""
    if event["kind"] == "rollback" and event["knob"] == "step" and event["new"] is not None:
        return {"step": int(event["new"]), "knobs": "checkpoint"}
    if event["kind"] == "set" and event["knob"] == "lr" and event["new"] is not None:
        return {"lr": event["new"]}
    return None


def _segments(steps: list[int], values: list) -> list[list]:
    """Run-length encode a per-step series as ``[[first_step, value], …]``."""
    out = []
    for value, group in groupby(zip(steps, values), key=lambda sv: sv[1]):
        out.append([next(group)[0], value])
    return out


def render(export: dict[str, Any], fmt: str) -> str:
    """The export as text in ``fmt`` (json, yaml or python)."""
    if fmt == "json":
        return json.dumps(export, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(export, sort_keys=False)
    if fmt == "python":
        return _python_snippet(export)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


_SNIPPET = '''"""Settings exported by Panda from run {run!r} ({description}).

Rebuilds the optimizer and a LambdaLR that reproduce the run's exact per-step learning rate,
manual changes included; `set_knobs(optimizer, step)` replays momentum and weight decay.
Call `scheduler.step()` and `set_knobs(...)` once per optimizer step, after `optimizer.step()`.
"""
import bisect
import json
import sys

import torch

SETTINGS = {final!r}
# [first step, value] segments of the values actually used, as logged by Panda.
LR = {lr!r}
MOMENTUM = {momentum!r}
WEIGHT_DECAY = {weight_decay!r}


def value_at(segments, step):
    starts = [s for s, _ in segments]
    return segments[max(0, bisect.bisect_right(starts, step) - 1)][1]


def make_optimizer(params):
    return {optimizer_expr}


def make_scheduler(optimizer):
    # LambdaLR multiplies each group's initial_lr by the lambda; an initial_lr of 1.0 (kept by
    # its setdefault) makes the product exactly the logged value: no division, no rounding.
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: value_at(LR, step))


def set_knobs(optimizer, step):
    momentum, weight_decay = value_at(MOMENTUM, step), value_at(WEIGHT_DECAY, step)
    for group in optimizer.param_groups:
        if momentum is not None and "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif momentum is not None and "momentum" in group:
            group["momentum"] = momentum
        if weight_decay is not None and "weight_decay" in group:
            group["weight_decay"] = weight_decay


if __name__ == "__main__":
    # `python this_file.py N` prints the learning rate of the first N steps as JSON.
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else {steps}
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    scheduler = make_scheduler(optimizer)
    lrs = []
    for step in range(steps):
        set_knobs(optimizer, step)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    print(json.dumps(lrs))
'''

_OPTIMIZER_EXPRS = {
    "SGD": "torch.optim.SGD(params, lr={lr!r}, momentum={momentum!r}, "
           "weight_decay={weight_decay!r})",
    "Adam": "torch.optim.Adam(params, lr={lr!r}, betas=({momentum!r}, 0.999), "
            "weight_decay={weight_decay!r})",
    "AdamW": "torch.optim.AdamW(params, lr={lr!r}, betas=({momentum!r}, 0.999), "
             "weight_decay={weight_decay!r})",
}


def _python_snippet(export: dict[str, Any]) -> str:
    trajectory = export["trajectory"]
    if not trajectory["lr"]:
        raise ExportError(f"run {export['run']} has no logged steps yet: nothing to reproduce")
    optimizer = export.get("optimizer")
    if optimizer not in _OPTIMIZER_EXPRS:
        raise ExportError(f"the python export supports {', '.join(_OPTIMIZER_EXPRS)}, "
                          f"not {optimizer}")
    first = {name: trajectory[name][0][1] for name in ("lr", "momentum", "weight_decay")}
    first = {k: (0.0 if v is None else v) for k, v in first.items()}
    return _SNIPPET.format(
        run=export["run"], description=export["task"].get("description") or "custom model",
        final=export["final"], lr=trajectory["lr"], momentum=trajectory["momentum"],
        weight_decay=trajectory["weight_decay"], steps=export["steps"],
        optimizer_expr=_OPTIMIZER_EXPRS[optimizer].format(**first))


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :mod:`trainer.atomic`): never half a file."""
    atomic.write_atomic(path, lambda f: f.write(text.encode()))


def safe_output_path(out: str | os.PathLike, base: str | os.PathLike = ".") -> Path:
    """Resolve ``out`` and refuse anything outside ``base`` (no ``..``, no absolute escape)."""
    base_path = Path(base).resolve()
    target = (base_path / out).resolve()
    if base_path != target and base_path not in target.parents:
        raise ExportError(f"refusing to write {out}: export paths must stay inside {base_path}")
    if target.is_dir():
        raise ExportError(f"{out} is a directory; give a file name")
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {out}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ExportError(f"cannot write {out}: directory {target.parent} is not writable")
    return target


def load_export(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a JSON or YAML export for replay."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err.strerror}") from None
    try:
        export = yaml.safe_load(text)  # YAML is a superset of JSON: one loader for both
    except yaml.YAMLError as err:
        raise ExportError(f"{path} is neither JSON nor YAML: {err}") from None
    if not isinstance(export, dict) or export.get("panda_export") != EXPORT_VERSION:
        raise ExportError(f"{path} is not a Panda export (version {EXPORT_VERSION})")
    if not isinstance(export.get("initial"), dict) or "task" not in export["initial"]:
        raise ExportError(f"{path} has no built-in task settings; replay needs a `panda train` "
                          "run")
    parent = export.get("parent")
    if parent:
        raise ExportError(f"{path} is a branch of {parent.get('run')} from step "
                          f"{parent.get('step')}: a replay cannot rebuild that state; replay "
                          f"{parent.get('run')}'s own export instead")
    for item in export.get("timeline", []):
        validate_command(item["kind"], item["command"])
    return export


class TimedCommand(NamedTuple):
    """A command to apply at exactly one step boundary (a replayed intervention)."""

    step: int
    kind: str
    payload: dict


def replay_commands(export: dict[str, Any]) -> list[TimedCommand]:
    """The timeline as commands at their steps, one per original command."""
    seen, commands = set(), []
    for item in export.get("timeline", []):
        if item["command_id"] is not None and item["command_id"] in seen:
            continue  # one command may set several knobs: several events, one command
        seen.add(item["command_id"])
        commands.append(TimedCommand(int(item["step"]), item["kind"], item["command"]))
    return sorted(commands, key=lambda c: c.step)
