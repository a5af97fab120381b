"""The search space of caviar mode, on the scales the tuning literature asks for.

Sample at random, not on a grid (Bergstra & Bengio 2012): with a few parameters that matter, a
grid of N trials tries the important one at only √N (or fewer) values, a random search at N.
And sample each parameter on the scale where equal steps mean equal change (Ng, "Improving
Deep Neural Networks", week 3):

* the learning rate log-uniformly, ``10^U(−4, 0)``: as many trials per decade;
* momentum as ``1 − β`` log-uniformly in ``[10^−3, 10^−1]`` (β from 0.9 to 0.999): β near 1 is
  extremely sensitive, since the averaging window ``1/(1−β)`` goes from 10 to 1000 steps;
* weight decay log-uniformly, with an explicit 0 (no regularization is a real option);
* batch size and hidden units as integer choices, the LR decay shape as a category.

A parameter is searched when it is given a range (``(low, high)``, or several choices), and
fixed when it is given one value. This module only describes and validates the space and turns
a trial's draws into settings; the draws themselves are Optuna's (``trial.suggest_*``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from trainer.config import TASKS_WITH_HIDDEN
from trainer.knobs import KNOBS, KnobError
from trainer.schedules import SHAPES, validate_schedule

DEFAULT_LR = (1e-4, 1.0)            # 10^U(−4, 0) (Ng, DLS course 2, week 3)
DEFAULT_BETA = (0.9, 0.999)         # 1 − β in [1e-3, 1e-1], log-uniform (same source)
DEFAULT_WEIGHT_DECAY = (1e-5, 1e-2)  # log-uniform, plus an explicit 0
DEFAULT_BATCH_SIZES = (16, 32, 64, 128)
DEFAULT_HIDDEN = (32, 64, 128)
DECAY_END_FACTOR = 0.1  # every decay shape ends its trial at about a tenth of its LR

# The names Optuna records (``trial.params``). Momentum is drawn as 1 − β: its log scale.
LOG_PARAMS = ("lr", "one_minus_beta", "weight_decay")
WD_ZERO = "weight_decay_is_zero"
SETTINGS = ("lr", "momentum", "weight_decay", "batch_size", "hidden", "decay")

Range = tuple[float, float]
Box = dict[str, Range]   # log-scale parameter → (low, high): where a round samples


class SpaceError(ValueError):
    """A search space that cannot be searched, with a one-line reason."""


@dataclass(frozen=True)
class SearchSpace:
    """What a search samples. A ``(low, high)`` pair is searched (log-uniformly), a single
    number is fixed; a tuple of choices is searched, a one-element tuple is fixed."""

    lr: float | Range | None = None     # None: from the LR range test (a built-in task), else
    #                                     DEFAULT_LR
    beta: float | Range = DEFAULT_BETA  # momentum β (Adam β1), drawn as 1 − β on a log scale
    weight_decay: float | Range = DEFAULT_WEIGHT_DECAY  # log-uniform between the two
    weight_decay_zero: bool = True      # a searched weight decay also tries exactly 0 (half the
    #                                     trials: regularization is the least important knob)
    batch_size: tuple[int, ...] = DEFAULT_BATCH_SIZES
    hidden: tuple[int, ...] = DEFAULT_HIDDEN  # () for a model without hidden layers
    decay: tuple[str, ...] = SHAPES     # LR decay shapes (trainer.schedules)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SearchSpace:
        """A space from ``{"lr": (1e-4, 1), "beta": 0.9, ...}``; unknown names are refused."""
        values = dict(values or {})
        if "momentum" in values and "beta" not in values:
            values["beta"] = values.pop("momentum")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SpaceError(f"unknown parameter {unknown[0]!r}; known parameters: "
                             f"{', '.join(known)}")
        for name in ("lr", "beta", "weight_decay"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        for name in ("batch_size", "hidden", "decay"):
            if name in values and not isinstance(values[name], (list, tuple)):
                values[name] = (values[name],)
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> SearchSpace:
        """Return self, or raise :class:`SpaceError` naming the first bad parameter."""
        if self.lr is not None:
            _check_knob_range("lr", "lr", self.lr, log=True)
        _check_knob_range("beta", "momentum", self.beta, log=False)
        _check_knob_range("weight_decay", "weight_decay", self.weight_decay, log=True)
        for name in ("batch_size", "hidden"):
            values = getattr(self, name)
            if not values and name == "batch_size":
                raise SpaceError("batch_size needs at least one value")
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SpaceError(f"{name} values must be whole numbers >= 1, got {value!r}")
            if len(set(values)) != len(values):
                raise SpaceError(f"{name} lists a value twice: {list(values)}")
        if not self.decay:
            raise SpaceError("decay needs at least one shape")
        for shape in self.decay:
            if shape not in SHAPES:
                raise SpaceError(f"unknown decay shape {shape!r}; choose from {', '.join(SHAPES)}")
        if len(set(self.decay)) != len(self.decay):
            raise SpaceError(f"decay lists a shape twice: {list(self.decay)}")
        return self

    def for_task(self, task: str | None) -> SearchSpace:
        """The space as it applies to a built-in ``task`` (quadratic has no hidden layer)."""
        if task is not None and task not in TASKS_WITH_HIDDEN:
            return replace(self, hidden=())
        return self

    def with_lr(self, lr: float | Range) -> SearchSpace:
        return replace(self, lr=lr).validate()

    def outer_box(self) -> Box:
        """The log-scale parameters that are searched, with their full ranges (round 1)."""
        box: Box = {}
        if isinstance(self.lr, tuple):
            box["lr"] = self.lr
        if isinstance(self.beta, tuple):  # 1 − 0.999 is 0.0010000000000000009 in floats
            box["one_minus_beta"] = (_clean(1.0 - self.beta[1]), _clean(1.0 - self.beta[0]))
        if isinstance(self.weight_decay, tuple):
            box["weight_decay"] = self.weight_decay
        return box

    def searched(self) -> list[str]:
        """The settings this space varies (for tables and plots)."""
        names = [name for name, key in (("lr", "lr"), ("momentum", "one_minus_beta"),
                                        ("weight_decay", "weight_decay"))
                 if key in self.outer_box()]
        return names + [name for name in ("batch_size", "hidden", "decay")
                        if len(getattr(self, name)) > 1]

    def suggest(self, trial: Any, box: Box | None = None) -> dict[str, Any]:
        """Draw one trial's settings through Optuna's ``trial.suggest_*`` inside ``box`` (a
        round's narrowed ranges; default the whole space). Returns the settings a run takes:
        ``lr, momentum, weight_decay, batch_size, hidden, decay``."""
        if self.lr is None:
            raise SpaceError("the LR range is not set (give one, or search a built-in task)")
        box = {**self.outer_box(), **(box or {})}
        settings: dict[str, Any] = {}
        settings["lr"] = (trial.suggest_float("lr", *box["lr"], log=True) if "lr" in box
                          else float(self.lr))
        if "one_minus_beta" in box:
            settings["momentum"] = 1.0 - trial.suggest_float("one_minus_beta",
                                                             *box["one_minus_beta"], log=True)
        else:
            settings["momentum"] = float(self.beta)
        if "weight_decay" in box:
            zero = self.weight_decay_zero and trial.suggest_categorical(WD_ZERO, (True, False))
            settings["weight_decay"] = 0.0 if zero else trial.suggest_float(
                "weight_decay", *box["weight_decay"], log=True)
        else:
            settings["weight_decay"] = float(self.weight_decay)
        for name in ("batch_size", "hidden", "decay"):
            choices = getattr(self, name)
            if len(choices) > 1:
                settings[name] = trial.suggest_categorical(name, choices)
            else:
                settings[name] = choices[0] if choices else None
        return settings


    def grid(self, trials: int) -> list[dict[str, Any]]:
        """The points of a grid of exactly ``trials`` trials, as Optuna parameters: k values
        log-spaced per searched log-scale parameter (weight decay's 0 is one of its k) times
        every choice. The baseline random search is compared with (Bergstra & Bengio 2012):
        with few parameters that matter, k is small."""
        box = self.outer_box()
        axes: list[list[dict[str, Any]]] = []
        choices = [name for name in ("batch_size", "hidden", "decay")
                   if len(getattr(self, name)) > 1]
        combos = math.prod(len(getattr(self, name)) for name in choices)
        k = round((trials / combos) ** (1.0 / len(box))) if box else 1
        for name, (low, high) in box.items():
            zero = name == "weight_decay" and self.weight_decay_zero
            values = _log_spaced(low, high, k - 1 if zero else k)
            axis = [{name: v} if not zero else {WD_ZERO: False, name: v} for v in values]
            axes.append(([{WD_ZERO: True}] if zero else []) + axis)
        axes += [[{name: v} for v in getattr(self, name)] for name in choices]
        points = [dict(kv for part in combo for kv in part.items())
                  for combo in itertools.product(*axes)]
        if len(points) != trials or (k < 2 and box):
            raise SpaceError(f"a grid over {len(box)} log-scale parameter(s) and {combos} "
                             f"choice combination(s) cannot have exactly {trials} trials: "
                             f"use k^{len(box)}×{combos} (k ≥ 2)")
        return points


def _clean(value: float) -> float:
    return float(f"{value:.12g}")


def _log_spaced(low: float, high: float, count: int) -> list[float]:
    if count == 1:
        return [math.sqrt(low * high)]
    step = (math.log10(high) - math.log10(low)) / (count - 1)
    return [float(f"{10.0 ** (math.log10(low) + i * step):.10g}") for i in range(count)]


def _check_knob_range(name: str, knob: str, value: Any, *, log: bool) -> None:
    """A fixed value or a (low, high) range, validated by the knob's own declaration
    (:data:`trainer.knobs.KNOBS`: one place declares what a knob accepts)."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise SpaceError(f"{name} range needs (low, high), got {value!r}")
        low, high = (_knob_value(name, knob, v) for v in value)
        if low >= high:
            raise SpaceError(f"{name} range is empty: low {low:g} must be below high {high:g}")
        if log and low <= 0:
            raise SpaceError(f"{name} is searched on a log scale: its bounds must be > 0, got "
                             f"{low:g}" + (" (0 is tried anyway: weight_decay_zero)"
                                           if name == "weight_decay" else ""))
    else:
        _knob_value(name, knob, value)


def _knob_value(name: str, knob: str, value: Any) -> float:
    try:
        return KNOBS[knob].validate(value, allow_text=False)
    except KnobError as err:
        raise SpaceError(str(err).replace(f"{knob} must", f"{name} must", 1)) from None


# --- command-line ranges ----------------------------------------------------------------------

def parse_range(name: str, text: str) -> float | Range:
    """``"1e-4:1"`` → ``(1e-4, 1.0)`` (searched); ``"0.01"`` → ``0.01`` (fixed). The values are
    checked by :meth:`SearchSpace.validate`."""
    parts = text.split(":")
    if len(parts) > 2:
        raise SpaceError(f"--{_flag(name)} takes LOW:HIGH or one value, got {text!r}")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise SpaceError(f"--{_flag(name)} takes numbers (LOW:HIGH or one value), got "
                         f"{text!r}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise SpaceError(f"--{_flag(name)} must be finite, got {text!r}")
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def parse_choices(name: str, text: str, kind: type) -> tuple:
    """``"16,32,64"`` → ``(16, 32, 64)``; one value fixes the setting."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise SpaceError(f"--{_flag(name)} needs at least one value")
    try:
        return tuple(kind(part) for part in parts)
    except ValueError:
        raise SpaceError(f"--{_flag(name)} takes {kind.__name__} values separated by commas, "
                         f"got {text!r}") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")


# --- settings → a training config -------------------------------------------------------------

def schedule_for(shape: str, epochs: int) -> dict[str, Any] | None:
    """The LR decay of a trial of ``epochs`` epochs: each shape ends at about
    :data:`DECAY_END_FACTOR` of the trial's LR (cosine at 0), whatever the trial's length, so the
    shapes compare on equal terms. ``constant`` is no schedule."""
    if shape == "constant":
        return None
    epochs = max(1, epochs)
    if shape == "exponential":
        payload = {"shape": shape, "rate": DECAY_END_FACTOR ** (1.0 / epochs)}
    elif shape == "inverse_time":
        payload = {"shape": shape, "rate": (1.0 / DECAY_END_FACTOR - 1.0) / epochs}
    elif shape == "step":  # two drops, at a third and two thirds of the trial
        payload = {"shape": shape, "rate": math.sqrt(DECAY_END_FACTOR),
                   "step_epochs": epochs / 3.0}
    else:
        payload = {"shape": shape, "rate": 0.0, "total_epochs": float(epochs)}
    return validate_schedule(payload)


def describe(settings: Mapping[str, Any]) -> str:
    """One line: ``lr 3.2e-02, β 0.953, wd 0, batch 32, hidden 64, decay cosine``."""
    parts = [f"lr {settings['lr']:.2e}", f"β {settings['momentum']:.4g}",
             "wd 0" if not settings.get("weight_decay") else f"wd {settings['weight_decay']:.1e}"]
    for name, label in (("batch_size", "batch"), ("hidden", "hidden"), ("decay", "decay")):
        if settings.get(name) is not None:
            parts.append(f"{label} {settings[name]}")
    return ", ".join(parts)
