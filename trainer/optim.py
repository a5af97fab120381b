"""Reading and writing knobs on any ``torch.optim`` optimizer, across all param groups.

Knob meaning per optimizer family:

* ``lr``: ``group["lr"]`` everywhere. The reported value is group 0's; a change keeps the
  ratios between groups (e.g. a 10× smaller LR for a backbone stays 10× smaller).
* ``momentum``: ``group["momentum"]`` for SGD / RMSprop, ``group["betas"][0]`` (β1) for the
  Adam family. A change sets every group to the value.
* ``weight_decay``: ``group["weight_decay"]``. The reported value is the largest over groups;
  a change keeps the ratios, so groups excluded from decay (0, e.g. biases and norms) stay 0.

A value may be a Python number or a one-value CPU tensor: ``lr=torch.tensor(0.01)`` is how an
LR scheduler drives a ``torch.compile``-d optimizer step without recompiling (PyTorch recipe
"Running the compiled optimizer with an LR scheduler"), and fused or capturable optimizers take
one too. Panda reads it as a float (a memory read). A value on a device is refused: Panda reads
the knobs at every update, and reading a device tensor makes the host wait for the device.
"""

from __future__ import annotations

import math

import torch

from trainer.config import OPTIMIZERS
from trainer.ranges import KnobError

SAME_REL = 1e-12  # a float knob used within this relative distance of the one asked is that one


def value(knob: float | torch.Tensor) -> float:
    """A knob's value as a float (a number converted, a CPU tensor read: no device involved)."""
    return knob if type(knob) is float else float(knob)


def precision(knob: float | torch.Tensor) -> float:
    """How close to a value asked for a knob can be written: a float's to ``SAME_REL``, a
    tensor's to its dtype's rounding (a float32 LR of 0.003 is 0.0030000000260770321)."""
    if isinstance(knob, torch.Tensor) and knob.is_floating_point():
        return max(SAME_REL, torch.finfo(knob.dtype).eps)
    return SAME_REL


def same(used: float | None, asked: float | None, rel_tol: float = SAME_REL) -> bool:
    """Whether a value an update used is the one asked for, rounding aside."""
    if used is None or asked is None:
        return used is asked
    return math.isclose(used, asked, rel_tol=rel_tol, abs_tol=0.0)


def make_optimizer(name: str, params, *, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """Build one of Panda's listed optimizers (:data:`trainer.config.OPTIMIZERS`);
    ``momentum`` is β1 for Adam and AdamW."""
    OPTIMIZERS.check("optimizer", name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


class OptimizerKnobs:
    """The knobs of one optimizer: what it supports, current values, and proportional writes."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        first = optimizer.param_groups[0]
        self.momentum_key = "betas" if "betas" in first else (
            "momentum" if "momentum" in first else None)
        self.has_weight_decay = "weight_decay" in first
        self.name = type(optimizer).__name__
        knobs = [k for g in optimizer.param_groups for k in (
            g.get("lr"), *(g.get("betas") or ()), g.get("momentum"), g.get("weight_decay"))]
        on_device = [k for k in knobs if isinstance(k, torch.Tensor) and not k.is_cpu]
        if on_device:  # checked here only: a knob moved to a device later is not caught
            raise ValueError(f"{self.name}'s knobs include a tensor on {on_device[0].device}: "
                             "Panda reads them at every update, which would wait for the "
                             "device; keep them on the CPU (lr=torch.tensor(0.01)), which fused "
                             "and compiled optimizers take too")
        # Ratios between groups' weight decay, fixed at construction: a decay set on groups that
        # have none keeps the original exclusions (see trainer.composition).
        decays = [value(g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
        top = max(decays)
        self.wd_ratios = [w / top for w in decays] if top > 0 else [1.0] * len(decays)

    @property
    def groups(self) -> list[dict]:
        # Never cached: Optimizer.load_state_dict replaces param_groups with new dicts.
        return self.optimizer.param_groups

    @property
    def supported(self) -> tuple[str, ...]:
        """Knob names this optimizer has, in the literature's order of importance."""
        names = ["lr"]
        if self.momentum_key:
            names.append("momentum")
        if self.has_weight_decay:
            names.append("weight_decay")
        return tuple(names)

    def check(self, knobs: dict[str, float]) -> None:
        """Raise :class:`KnobError` for a knob this optimizer does not have."""
        for name in knobs:
            if name not in self.supported:
                raise KnobError(f"{self.name} has no {name} knob (it has "
                                f"{', '.join(self.supported)})")

    # --- reads (cheap: a few dict lookups; called every step) ----------------------------------

    def lr(self) -> float:
        return value(self.groups[0]["lr"])

    def momentum(self) -> float | None:
        beta = self._beta(self.groups[0])
        return None if beta is None else value(beta)

    def _beta(self, group: dict) -> float | torch.Tensor | None:
        """A group's β as it holds it (β1 of ``betas``, or ``momentum``), or None."""
        if self.momentum_key == "betas":
            return group["betas"][0]
        return group["momentum"] if self.momentum_key == "momentum" else None

    def weight_decay(self) -> float | None:
        if not self.has_weight_decay:
            return None
        return max(value(g["weight_decay"]) for g in self.groups)

    def tolerance(self, name: str) -> float:
        """How close to a value asked for knob ``name`` the groups can hold now (see
        :func:`precision`): what a change's verdict allows (asked only at a landing)."""
        if name == "weight_decay":  # the value checked is the largest over the groups
            return max(precision(g.get("weight_decay")) for g in self.groups)
        first = self.groups[0]
        return precision(first["lr"] if name == "lr" else self._beta(first))

    def values(self) -> dict[str, float | None]:
        return {"lr": self.lr(), "momentum": self.momentum(),
                "weight_decay": self.weight_decay()}

    def lrs(self) -> list[float]:
        return [value(g["lr"]) for g in self.groups]

    # --- writes ---------------------------------------------------------------------------------

    def write_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.groups, lrs):
            group["lr"] = lr

    def set_momentum(self, value: float) -> None:
        for group in self.groups:
            if self.momentum_key == "betas":
                group["betas"] = (value, group["betas"][1])
            else:
                group["momentum"] = value

    def set_weight_decay(self, value: float) -> None:
        for group, ratio in zip(self.groups, self.wd_ratios):
            group["weight_decay"] = value * ratio
