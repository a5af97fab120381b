"""What one search is: its budget, sampler, pruner, rounds and space (no Optuna needed here).

The config is stored in the study itself (an Optuna study user attribute), so a worker that
joins from another machine, or a resumed search, needs only the study's name.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from trainer.config import CHECKS as TRAIN_CHECKS
from trainer.config import OPTIMIZERS, TASKS
from trainer.ranges import COUNT, Choice, KnobError, Range, check_fields
from trainer.search.rounds import DEFAULT_MARGIN, DEFAULT_TOP
from trainer.search.space import SearchSpace
from trainer.store.base import sanitize_run_name

SAMPLERS = Choice(("random", "tpe", "grid"))  # grid: the baseline random search beats
PRUNERS = Choice(("hyperband", "median", "none"))
MAX_PARALLEL = 64
MAX_STUDY_NAME = 80   # trial runs are named <study>-<number>; run names stop at 100 characters


@dataclass(frozen=True)
class SearchConfig:
    """One search. Defaults follow the literature (see :mod:`trainer.search.space`)."""

    task: str | None = "digits"  # a built-in task (trainer.tasks); None: the caller's objective
    trials: int = 20            # trials in all rounds together
    parallel: int = 1           # trial processes on this machine
    rounds: int = 1             # coarse-to-fine rounds (trainer.search.rounds)
    sampler: str = "random"     # random: Bergstra & Bengio 2012; tpe: Bergstra et al. 2011;
    #                             grid: the baseline (a grid of exactly `trials` points)
    prune: str = "hyperband"    # hyperband: Li et al. 2018 | median | none
    epochs: int = 10            # per trial; Hyperband's maximum resource (1 unit = 1 epoch)
    optimizer: str = "sgd"      # sgd | adam | adamw (momentum is β1 for Adam)
    seed: int = 0               # seeds the sampler and every trial's training
    train_seed: int | None = None  # the trials' training seed (data, init) if not `seed`:
    #                                repeat a search with other draws on the same task
    step_delay: float = 0.0     # seconds slept per step: slows trials to watching speed
    top: float = DEFAULT_TOP    # a round is built around this share of the previous one's trials
    margin: float = DEFAULT_MARGIN  # ... widened by this share of the box's log width per side
    study: str | None = None    # the study's name; default <task>-search-<time>
    space: SearchSpace = field(default_factory=SearchSpace)

    def validate(self) -> SearchConfig:
        """Return a copy with defaults filled (study name, space for the task), or raise
        ValueError with a one-line reason."""
        checked = check_fields({name: getattr(self, name) for name in CHECKS}, CHECKS)
        if self.task is not None:
            TASKS.check("task", self.task)
        if checked["rounds"] > checked["trials"]:
            raise KnobError(f"{self.trials} trials cannot fill {self.rounds} rounds")
        if self.sampler == "grid" and self.rounds > 1:
            raise KnobError("a grid has no rounds: coarse to fine needs a random sampler")
        space = self.space if isinstance(self.space, SearchSpace) else \
            SearchSpace.from_dict(self.space)
        space = space.validate().for_task(self.task)
        if self.sampler == "grid" and space.lr is not None:
            space.grid(self.trials)  # raises when no grid has that many points
        study = self.study or f"{self.task or 'search'}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_study_name(study)
        return replace(self, space=space, study=study)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["space"] = SearchSpace.from_dict(values.get("space") or {})
        return cls(**values)


# Each setting's valid values, declared once (trainer.ranges): `validate`, the CLI's parser.
CHECKS: dict[str, Range | Choice] = {
    "trials": COUNT, "rounds": COUNT, "epochs": COUNT,
    "parallel": Range(1, MAX_PARALLEL, integer=True),
    "sampler": SAMPLERS, "prune": PRUNERS, "optimizer": OPTIMIZERS,
    "step_delay": TRAIN_CHECKS["step_delay"],
    "top": Range(0.0, 1.0, low_open=True), "margin": Range(0.0, 1.0),
}



def check_study_name(name: str) -> str:
    """A study's name becomes part of run names and a file name: the run-name rules apply."""
    sanitize_run_name(name)
    if len(name) > MAX_STUDY_NAME:
        raise ValueError(f"study name too long ({len(name)} characters, at most "
                         f"{MAX_STUDY_NAME})")
    return name


def trial_run_name(study: str, number: int) -> str:
    """The Panda run of trial ``number``: ``<study>-<number>``."""
    return sanitize_run_name(f"{study}-{number}")
