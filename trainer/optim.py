"""Reading and writing knobs on any ``torch.optim`` optimizer, across all param groups.

Knob meaning per optimizer family:

* ``lr``: ``group["lr"]`` everywhere. The reported value is group 0's; a change keeps the
  ratios between groups (e.g. a 10× smaller LR for a backbone stays 10× smaller).
* ``momentum``: ``group["momentum"]`` for SGD / RMSprop, ``group["betas"][0]`` (β1) for the
  Adam family. A change sets every group to the value.
* ``weight_decay``: ``group["weight_decay"]``. The reported value is the largest over groups;
  a change keeps the ratios, so groups excluded from decay (0, e.g. biases and norms) stay 0.
"""

from __future__ import annotations

import torch

from trainer.config import OPTIMIZERS
from trainer.ranges import KnobError


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
        # Ratios between groups' weight decay, fixed at construction: a decay set on groups that
        # have none keeps the original exclusions (see trainer.composition).
        decays = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
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
        return self.groups[0]["lr"]

    def momentum(self) -> float | None:
        if self.momentum_key == "betas":
            return self.groups[0]["betas"][0]
        if self.momentum_key == "momentum":
            return self.groups[0]["momentum"]
        return None

    def weight_decay(self) -> float | None:
        if not self.has_weight_decay:
            return None
        return max(g["weight_decay"] for g in self.groups)

    def values(self) -> dict[str, float | None]:
        return {"lr": self.lr(), "momentum": self.momentum(),
                "weight_decay": self.weight_decay()}

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.groups]

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
