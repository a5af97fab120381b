"""What defines a built-in training run (``panda train``), and the choices its settings take.

nanoGPT-style: one dataclass with commented defaults. Every field that a person can set
declares its valid values once (:mod:`trainer.ranges`); ``validate``, the CLI's parser and the
dashboard's form all check through those declarations. This module imports no torch, so the
CLI can parse a command line and read a run's config without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from trainer.knobs import KNOBS
from trainer.ranges import COUNT, Choice, KnobError, Range

TASKS = Choice(("digits", "spirals", "quadratic", "charlm"))   # see trainer.tasks

# Settings a task trains well with, where they differ from TrainConfig's (SGD, LR 0.01, batch 32,
# constant LR): `panda train`, the dashboard's form, range tests on a fresh task and `make demo`
# use them for what the user does not give (see config_values). Measured in README, "charlm".
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "charlm": {
        "optimizer": "adamw",   # per-parameter step sizes: the usual choice for transformers
        "lr": 3e-3,             # the range test suggests 3.4e-3; measured in README ("charlm")
        "momentum": 0.9,        # β1 (nanoGPT)
        "weight_decay": 0.1,    # decoupled (Loshchilov & Hutter 2019), on matrices only; nanoGPT
        "batch_size": 32,       # 32 windows × 64 characters = 2,048 characters per step
        "epochs": 20,
        # Linear warm-up, then a cosine to 10 % of the base LR over the run's epochs (nanoGPT's
        # get_lr; Goyal et al. 2017 for the warm-up, Loshchilov & Hutter 2017 for the cosine).
        "schedule": {"shape": "cosine", "rate": 0.1, "warmup_epochs": 0.25},
    },
}
TASKS_WITH_HIDDEN = ("digits", "spirals")   # tasks whose MLP width TrainConfig.hidden sets
OPTIMIZERS = Choice(("sgd", "adam", "adamw"))         # see trainer.optim.make_optimizer
ON_DIVERGE = Choice(("pause", "rollback", "ignore", "stop"))  # see babysitter.Babysitter


@dataclass
class TrainConfig:
    """Everything that defines a built-in training run. Defaults follow the literature."""

    task: str = "digits"        # digits | spirals | quadratic | charlm (TASK_DEFAULTS)
    optimizer: str = "sgd"      # sgd | adam | adamw; SGD is the well-understood baseline
    lr: float = 0.01            # a sensible start on normalized inputs (Ng, DLS course 2)
    momentum: float = 0.9       # β (β1 for Adam): averages over ~1/(1−β) = 10 steps
    weight_decay: float = 0.0   # regularization comes after LR and momentum in priority
    batch_size: int = 32        # small batches generalize well (Masters & Luschi 2018)
    hidden: int = 64            # units per hidden layer (digits, spirals; others ignore it)
    epochs: int = 20
    seed: int = 0
    checkpoint_every: int = 200   # steps between rolling checkpoints
    step_delay: float = 0.0     # seconds slept per step: slows a demo to watching speed
    schedule: dict | None = None  # LR decay, see trainer.schedules.Schedule
    on_diverge: str = "pause"   # pause | rollback | ignore | stop (see Babysitter)
    early_stop: int | None = None  # stop after this many epochs without a better val loss

    def validate(self) -> TrainConfig:
        """Raise :class:`~trainer.ranges.KnobError` (a ValueError) with a one-line reason for
        any value that cannot be trained."""
        for name, check in CHECKS.items():
            setattr(self, name, check.check(name, getattr(self, name)))
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def of_run(cls, meta: dict[str, Any]) -> TrainConfig:
        """The config a `panda train` run recorded in its store meta; ValueError for a run that
        `panda train` did not start (a user's own loop) or an unusable config."""
        config = meta.get("config")
        if not isinstance(config, dict) or "task" not in config:
            raise ValueError("it was not started by `panda train` (no built-in task in its "
                             "config)")
        try:
            return cls.from_dict(config).validate()
        except (TypeError, KnobError) as err:
            raise ValueError(f"its config is unusable: {err}") from None


# The declared values of every checked field (the knobs declare their own ranges).
CHECKS: dict[str, Range | Choice] = {
    "task": TASKS, "optimizer": OPTIMIZERS,
    **{name: knob.range for name, knob in KNOBS.items()},
    "batch_size": COUNT, "hidden": COUNT, "epochs": COUNT, "seed": Range(0, integer=True),
    "checkpoint_every": COUNT, "step_delay": Range(0.0, 10.0),
    "on_diverge": ON_DIVERGE, "early_stop": Range(1, integer=True, optional=True),
}


def config_values(task: str, **given: Any) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments for ``task``: the values given (None counts as not
    given) over the task's :data:`TASK_DEFAULTS`; TrainConfig's own defaults fill the rest.

    A default cosine schedule without ``total_epochs`` decays over the run's epochs (nanoGPT's
    ``lr_decay_iters = max_iters``), whatever number of epochs is given.
    """
    values = {**TASK_DEFAULTS.get(task, {}),
              **{k: v for k, v in given.items() if v is not None}, "task": task}
    schedule = values.get("schedule")
    if "schedule" not in given and isinstance(schedule, dict) and \
            schedule.get("shape") == "cosine" and "total_epochs" not in schedule and \
            "epochs" in values:
        values["schedule"] = {**schedule, "total_epochs": float(values["epochs"])}
    return values
