"""What one search is: its budget, sampler, pruner, rounds and space (no Optuna needed here).

The config is stored in the study itself (an Optuna study user attribute), so a worker that
joins from another machine, or a resumed search, needs only the study's name.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from trainer.optim import OPTIMIZERS
from trainer.search.rounds import DEFAULT_MARGIN, DEFAULT_TOP
from trainer.search.space import SearchSpace
from trainer.store.base import sanitize_run_name
from trainer.tasks import TASK_NAMES

SAMPLERS = ("random", "tpe", "grid")  # grid: the baseline random search beats
PRUNERS = ("hyperband", "median", "none")
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
        if self.task is not None and self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_NAMES)}")
        for name, low in (("trials", 1), ("rounds", 1), ("epochs", 1), ("parallel", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.parallel > MAX_PARALLEL:
            raise ValueError(f"parallel must be at most {MAX_PARALLEL}, got {self.parallel}")
        if self.rounds > self.trials:
            raise ValueError(f"{self.trials} trials cannot fill {self.rounds} rounds")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of "
                             f"{', '.join(SAMPLERS)}")
        if self.sampler == "grid" and self.rounds > 1:
            raise ValueError("a grid has no rounds: coarse to fine needs a random sampler")
        if self.prune not in PRUNERS:
            raise ValueError(f"unknown pruner {self.prune!r}; choose one of {', '.join(PRUNERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if not 0 <= self.step_delay <= 10:
            raise ValueError(f"step_delay must be in [0, 10] seconds, got {self.step_delay}")
        if not 0 < self.top <= 1:
            raise ValueError(f"top must be in (0, 1], got {self.top}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
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
