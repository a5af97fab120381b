"""Learning-rate decay shapes as pure functions, evaluated every step.

Like nanoGPT's ``get_lr(it)``, the LR is a pure function of the step; the Babysitter writes it
into every ``param_group`` each step and logs the value actually used. Shapes are expressed in
(fractional) epochs, the unit the literature uses:

=============  ==============================================  ===========================
shape          factor at epoch e (relative to the base LR)     reference
=============  ==============================================  ===========================
constant       1
exponential    r^e                                             Ng, DLS course 2, week 2
inverse_time   1 / (1 + k·e)                                   Robbins & Monro 1951
step           γ^floor(e / N)                                  Krizhevsky et al. 2012
cosine         floor + (1 − floor)·(1 + cos(π·e/T)) / 2         Loshchilov & Hutter 2017
=============  ==============================================  ===========================

Each shape may start with a linear warm-up (Goyal et al. 2017) from 0 to the base LR.
Annealing helpers follow fastai's ``(start, end, pos)`` convention, pos in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from trainer.ranges import NON_NEGATIVE, POSITIVE, KnobError, Range

SHAPES = ("constant", "exponential", "inverse_time", "step", "cosine")

# Default "rate" per shape: the meaning of `rate` differs by shape (r, k, γ); these are the
# values a practitioner would try first.
DEFAULT_RATES = {"constant": 1.0, "exponential": 0.95, "inverse_time": 0.1, "step": 0.5,
                 "cosine": 0.0}


def anneal_linear(start: float, end: float, pos: float) -> float:
    """Linear interpolation from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + pos * (end - start)


def anneal_cos(start: float, end: float, pos: float) -> float:
    """Half-cosine from ``start`` to ``end`` (SGDR, Loshchilov & Hutter 2017, eq. 5)."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pos))


@dataclass(frozen=True)
class Schedule:
    """An LR decay: its shape and parameters. Epochs may be fractional."""

    shape: str = "constant"
    # exponential: r per epoch; inverse_time: k; step: γ per `step_epochs`; cosine: floor as a
    # fraction of the base LR. Unused by constant.
    rate: float = 1.0
    step_epochs: float = 10.0     # step: epochs between drops
    total_epochs: float = 100.0   # cosine: epochs to reach the floor (then it stays there)
    warmup_epochs: float = 0.0    # linear warm-up length, 0 for none
    origin_epoch: float = 0.0     # epoch at which this schedule started (live changes rebase)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def factor(self, epoch: float) -> float:
        """Multiplier on the base LR at ``epoch`` (see the module table)."""
        e = max(0.0, epoch - self.origin_epoch)
        warm = min(1.0, e / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return warm * _shape_factor(self, e)


def _shape_factor(s: Schedule, e: float) -> float:
    if s.shape == "exponential":
        return s.rate ** e
    if s.shape == "inverse_time":
        return 1.0 / (1.0 + s.rate * e)
    if s.shape == "step":
        return s.rate ** math.floor(e / s.step_epochs)
    if s.shape == "cosine":
        return anneal_cos(1.0, s.rate, min(1.0, e / s.total_epochs))
    return 1.0


def lr_at(step: int, base_lr: float, schedule: Schedule, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    return base_lr * schedule.factor(step / steps_per_epoch)


# What `rate` means per shape, and its range (declared once: the page, the CLI and the trainer
# check through these).
RATES = {
    "exponential": ("r per epoch", Range(0.0, 1.0, low_open=True)),
    "inverse_time": ("k", Range(0.0, 1e6)),
    "step": ("γ per drop", Range(0.0, 1.0, low_open=True)),
    "cosine": ("floor as a fraction of the base LR", Range(0.0, 1.0)),
    "constant": ("unused", Range()),
}
FIELDS = {"step_epochs": POSITIVE, "total_epochs": POSITIVE, "warmup_epochs": NON_NEGATIVE,
          "origin_epoch": NON_NEGATIVE}


def validate_schedule(payload: Any) -> dict[str, Any]:
    """Validate a schedule description (dict) and return it normalized with defaults filled."""
    if isinstance(payload, Schedule):
        payload = payload.to_dict()
    if not isinstance(payload, dict):
        raise KnobError(f"schedule must be an object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(Schedule.__dataclass_fields__))
    if unknown:
        raise KnobError(f"unknown schedule field {unknown[0]!r}")
    shape = payload.get("shape", "constant")
    if shape not in SHAPES:
        raise KnobError(f"unknown decay shape {shape!r}; choose one of {', '.join(SHAPES)}")
    values: dict[str, Any] = {"shape": shape, "rate": DEFAULT_RATES[shape]}
    for name, value in payload.items():
        if name != "shape":
            values[name] = float(FIELDS.get(name, Range()).check(f"schedule {name}", value))
    meaning, rates = RATES[shape]
    rates.check(f"{shape} rate ({meaning})", values["rate"])
    return Schedule(**values).to_dict()


def schedule_from(payload: Any) -> Schedule:
    """Build a validated :class:`Schedule` from a dict (or return a Schedule unchanged)."""
    return Schedule(**validate_schedule(payload))


def rebased(schedule: Schedule, epoch: float) -> Schedule:
    """The same shape restarted at ``epoch`` (a live decay change continues from the current LR)."""
    return replace(schedule, origin_epoch=epoch)
