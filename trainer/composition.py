"""Panda's knob changes as factors on the user's own values, applied right around each update.

Why. Real training loops write the LR themselves: a ``torch.optim.lr_scheduler`` steps after
every update (``LambdaLR``, ``OneCycleLR``, ``LinearLR`` recompute it in closed form; ``StepLR``,
``ExponentialLR``, ``CosineAnnealingLR``, ``ReduceLROnPlateau`` scale the value they find), and
nanoGPT's ``train.py`` writes ``g["lr"] = get_lr(it)`` before every forward pass. A value Panda
left in ``param_group["lr"]`` would be overwritten at the next step, or scaled once more by a
recursive scheduler. So Panda never leaves its own value in the param groups. It holds one
factor per knob, and

* an optimizer step **pre-hook** multiplies the user's current values by the factors right
  before the update (``Optimizer.register_step_pre_hook``, torch ≥ 2.0);
* a step **post-hook** records what the update used and puts the user's values back
  (``Optimizer.register_step_post_hook``).

The user's code and schedulers only ever see their own values, so nothing compounds, and one
mechanism covers every loop: no scheduler, any scheduler, a loop that writes the LR itself
before or after ``bs.step``, a Hugging Face or Lightning ``Trainer``.

Semantics. A change to X requested at a step boundary *lands* at the next update: that update
uses exactly X, and the factor becomes X / (the user's value then). Afterwards the effective
value is the user's value times the factor, so the user's schedule continues from the new level
(a later change sets a new factor):

==============  =============================================================================
knob            effective value of group i
==============  =============================================================================
lr              ``user_lr_i · k · decay(position)``: the groups keep the user's ratios, and
                Panda's own decay knob (:mod:`trainer.schedules`) multiplies on top
momentum (β)    ``1 − (1 − user_β)·s``: composed on the 1−β scale, the scale momentum is tuned
                on (Ng, DLS course 2, week 3), so β stays below 1 whatever the user's schedule
                does (e.g. ``OneCycleLR`` cycling β between 0.85 and 0.95); clipped at 0
weight decay    ``user_wd_i · w``: groups without decay (biases, norms) stay at 0; when no
                group of the user's has any decay, X is set on the groups in proportion to the
                decay they had at construction (all of them when none had any)
==============  =============================================================================

A user value of 0 at the landing (an LR warm-up that starts at 0) defines no factor: the update
uses X and the change stays pending, landing again at the next update, until the user's value
is positive.

A user value that is a CPU tensor (a compiled or fused optimizer's ``lr=torch.tensor(0.01)``,
see :mod:`trainer.optim`) stays a tensor of its dtype in the update: the composed value is the
tensor times the factors, and X lands as a tensor like it, so the user's step sees the type it
was written for; what the update used is read back as a float, rounded as that dtype rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.optim import OptimizerKnobs, value
from trainer.schedules import Schedule, rebased, schedule_from

# A compiled optimizer step (``torch.compile(optimizer.step)``) would trace the hooks into its
# graph and guard it on Panda's factors: a recompile at every knob change and, with Panda's
# decay on, at every step, until torch's recompile limit sends the whole step back to eager.
# So while torch.compile traces, each hook calls itself through ``torch.compiler.disable``: a
# graph break, and the hook runs as plain Python at every step. Outside a compile this costs
# one call a hook (``is_dynamo_compiling`` returns False, ~0.03 µs; dynamo reads it as True
# while it traces; the disable wrapper itself would cost ~0.4 µs a call).
_compiling = getattr(torch.compiler, "is_dynamo_compiling", lambda: False)  # torch >= 2.3


@dataclass
class Landing:
    """A requested change, and (once an update has run) what that update used."""

    requested: dict[str, float]               # knob -> the value asked for
    update: int | None = None                 # the update that used it (Composition.updates)
    used: dict[str, float] = field(default_factory=dict)


class Composition:
    """Panda's factors on one optimizer's knobs, and the hooks that apply them (see module)."""

    def __init__(self, knobs: OptimizerKnobs, schedule: Schedule):
        self.knobs = knobs
        self.lr_factor = 1.0          # k
        self.beta_scale = 1.0         # s, on 1 − β
        self.wd_factor = 1.0          # w
        self.wd_override: float | None = None   # X when the user's groups have no decay at all
        self.schedule = schedule
        self.decay = 1.0              # schedule.factor(position), set at each step boundary
        self.targets: dict[str, float] = {}     # knob -> value that lands at the next update
        self.landings: list[Landing] = []       # requested, waiting for an update to use them
        self.updates = 0              # optimizer updates seen (post-hooks run)
        self.user_schedule = False    # the user's LR changed between updates
        # What the last update used (group 0's LR and momentum, the largest weight decay), and
        # the user's own LR then: read every step by the Babysitter, so plain attributes.
        self.used_lr = knobs.lr()
        self.used_momentum = knobs.momentum()
        self.used_weight_decay = knobs.weight_decay()
        self.user_lr = self.used_lr
        self._active = False          # any factor, target or override: the slow path
        # The optimizer's kinds of knobs, fixed: read by the hooks at every update.
        self._momentum_key, self._has_weight_decay = knobs.momentum_key, knobs.has_weight_decay
        self._saved: list[tuple] | None = None  # the user's values, until the post-hook
        optimizer = knobs.optimizer
        self._handles = [optimizer.register_step_pre_hook(self._before_update),
                         optimizer.register_step_post_hook(self._after_update)]
        self._refresh()

    def remove(self) -> None:
        """Unhook from the optimizer (the Babysitter closes); the user's values are in place."""
        self._put_back()
        for handle in self._handles:
            handle.remove()

    # --- requests (training thread, at a step boundary) ----------------------------------------

    def request(self, values: dict[str, float]) -> Landing:
        """Ask for knob values; they land at the next update."""
        self.targets.update(values)
        landing = Landing(dict(values))
        self.landings.append(landing)
        self._refresh()
        return landing

    def set_schedule(self, schedule: Schedule, position: float) -> None:
        """A new decay shape, starting at ``position`` from the LR in force: the old decay's
        current factor is folded into k, so the LR does not jump."""
        self.lr_factor *= self.decay
        self.schedule = rebased(schedule, position)
        self.set_position(position)

    def set_position(self, position: float) -> None:
        """The run's position in (fractional) epochs, for Panda's own decay."""
        self.decay = self.schedule.factor(position)
        self._refresh()

    def _refresh(self) -> None:
        self.decaying = self.schedule.shape != "constant"  # read every step: a plain attribute
        self._active = bool(self.targets) or self.wd_override is not None or not (
            self.lr_factor == 1.0 and self.beta_scale == 1.0 and self.wd_factor == 1.0
            and self.decay == 1.0)

    # --- what is in force ----------------------------------------------------------------------

    def in_force(self, *, requested: bool = True) -> dict[str, float | None]:
        """The values the next update will use, as far as known now (the user may still write
        theirs before it): requested targets (unless ``requested`` is False), else the user's
        current values composed."""
        first = self.knobs.groups[0]
        values = {"lr": self._lr(value(first["lr"])),
                  "momentum": None if self._momentum_key is None else
                  self._beta(self.knobs.momentum()),
                  "weight_decay": None if not self._has_weight_decay else
                  max(value(w) for w in self._wds([g["weight_decay"] for g in self.knobs.groups]))}
        return {**values, **self.targets} if requested else values

    def last_used(self) -> dict[str, float | None]:
        return {"lr": self.used_lr, "momentum": self.used_momentum,
                "weight_decay": self.used_weight_decay}

    def describe(self) -> dict[str, Any]:
        """For the run's meta: the LR as the user's value × Panda's factor (page and CLI)."""
        return {"user_lr": self.user_lr, "factor": self.lr_factor * self.decay,
                "lr_factor": self.lr_factor, "decay": self.decay, "lr": self.used_lr,
                "user_schedule": self.user_schedule, "beta_scale": self.beta_scale,
                "wd_factor": self.wd_factor, "wd_override": self.wd_override}

    # --- the hooks (training thread, inside optimizer.step) ------------------------------------

    def _before_update(self, optimizer, args, kwargs) -> None:
        if _compiling():  # see _compiling
            return torch.compiler.disable(Composition._before_update)(self, optimizer, args,
                                                                       kwargs)
        if self._saved is not None:  # the last step raised before its post-hook: undo it
            self._put_back()
        if not self._active:
            return
        groups = self.knobs.groups
        landing_lr = self.targets.get("lr")
        if self.targets:
            self._land(groups)
        key = self._momentum_key
        saved = []
        lrs = [g["lr"] for g in groups]
        # The user's decay is left as it is (not even 0 → 0.0) unless Panda changes it.
        changes_wd = self.wd_factor != 1.0 or self.wd_override is not None
        wds = self._wds([g["weight_decay"] for g in groups]) \
            if self._has_weight_decay and changes_wd else None
        for i, group in enumerate(groups):
            saved.append((group, group["lr"], group.get(key) if key else None,
                          group.get("weight_decay")))
            group["lr"] = self._lr(lrs[i])  # a tensor stays one (see the module)
            if key == "betas":
                group["betas"] = (self._beta(group["betas"][0]), group["betas"][1])
            elif key == "momentum":
                group["momentum"] = self._beta(group["momentum"])
            if wds is not None:
                group["weight_decay"] = wds[i]
        self._saved = saved
        if landing_lr is not None:
            # The landing update uses exactly X (user × (X / user) may be off by an ulp); the
            # other groups keep the user's ratios. A user LR of 0 took no factor: the target
            # stays, and lands again at the next update.
            for i, (group, user_lr, *_) in enumerate(saved):
                group["lr"] = _like(user_lr, landing_lr if i == 0 else landing_lr * value(
                    user_lr / lrs[0] if lrs[0] else 1.0))

    def _after_update(self, optimizer, args, kwargs) -> None:
        # Runs after every update: plain dict reads, no method calls on the common path.
        if _compiling():  # see _compiling
            return torch.compiler.disable(Composition._after_update)(self, optimizer, args,
                                                                      kwargs)
        groups = optimizer.param_groups
        first, saved = groups[0], self._saved
        lr = first["lr"]
        if type(lr) is not float:  # an int, or a CPU tensor (see the module)
            lr = value(lr)
        if saved is None:
            user_lr = lr
        else:
            user_lr = saved[0][1]
            if type(user_lr) is not float:
                user_lr = value(user_lr)
        if user_lr != self.user_lr:
            if self.updates:
                self.user_schedule = True
            self.user_lr = user_lr
        self.used_lr = lr
        key = self._momentum_key
        if key is not None:
            beta = first["betas"][0] if key == "betas" else first["momentum"]
            self.used_momentum = beta if type(beta) is float else value(beta)
        if self._has_weight_decay:
            if len(groups) == 1:
                wd = first["weight_decay"]
                self.used_weight_decay = wd if type(wd) is float else value(wd)
            else:
                wd = max(g["weight_decay"] for g in groups)
                self.used_weight_decay = wd if type(wd) is float else value(wd)
        self.updates += 1
        if self.landings:
            used = self.last_used()
            for landing in self.landings:  # every change requested so far lands here
                landing.update = self.updates
                landing.used = {name: used[name] for name in landing.requested}
            self.landings = []
        if saved is not None:
            self._put_back()

    def _put_back(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        key = self._momentum_key
        for group, lr, beta, wd in saved:
            group["lr"] = lr
            if key:
                group[key] = beta
            if wd is not None:
                group["weight_decay"] = wd

    def _land(self, groups: list[dict]) -> None:
        """Turn targets into factors from the user's values now (see the module table)."""
        targets = self.targets
        if "lr" in targets:
            user = groups[0]["lr"]
            base = float(user) * self.decay
            if base > 0:
                self.lr_factor = targets.pop("lr") / base
        if "momentum" in targets:
            gap = 1.0 - self.knobs.momentum()
            target = targets.pop("momentum")
            self.beta_scale = (1.0 - target) / gap if gap > 0 else 1.0
        if "weight_decay" in targets:
            target = targets.pop("weight_decay")
            top = max(value(g["weight_decay"]) for g in groups)
            if top > 0:
                self.wd_factor, self.wd_override = target / top, None
            else:
                self.wd_factor, self.wd_override = 1.0, target
        self._refresh()

    # --- composition rules -----------------------------------------------------------------------

    # A user's value that is a tensor gets a tensor like it back (see the module): the LR is
    # scaled by one tensor op (one rounding); β and a decay set from nothing are computed in
    # float64 and written once, since 1 − (1 − β)·s in float32 cancels (β 0.1 would land as
    # 0.10000004, outside float32's own rounding of 0.1).

    def _lr(self, user_lr: Any) -> Any:
        return user_lr * (self.lr_factor * self.decay)

    def _beta(self, user_beta: Any) -> Any:
        if self.beta_scale == 1.0:
            return user_beta
        return _like(user_beta, max(0.0, 1.0 - (1.0 - value(user_beta)) * self.beta_scale))

    def _wds(self, user_wds: list[Any]) -> list[Any]:
        if self.wd_override is not None:
            return [_like(wd, self.wd_override * r)
                    for wd, r in zip(user_wds, self.knobs.wd_ratios)]
        return [wd * self.wd_factor for wd in user_wds]

    # --- checkpoints -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"composition": {"lr_factor": self.lr_factor, "beta_scale": self.beta_scale,
                                "wd_factor": self.wd_factor, "wd_override": self.wd_override,
                                "targets": dict(self.targets)},
                "schedule": self.schedule.to_dict()}

    def load(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's Babysitter state (written by :meth:`state`, or by Panda
        0.1, which kept a base LR: its k is that base over the LR the groups were left at)."""
        self.schedule = schedule_from(state["schedule"])
        self.landings = []  # changes no update used: undone with the state they were asked in
        saved = state.get("composition")
        if saved is not None:
            self.lr_factor, self.beta_scale = saved["lr_factor"], saved["beta_scale"]
            self.wd_factor, self.wd_override = saved["wd_factor"], saved["wd_override"]
            self.targets = dict(saved.get("targets", {}))
        else:
            first = self.knobs.lr()
            self.lr_factor = state["base_lr"] / first if first > 0 else 1.0
            self.beta_scale, self.wd_factor, self.wd_override = 1.0, 1.0, None
            self.targets = {}
        self._refresh()


def _like(user: Any, composed: float) -> Any:
    """``composed`` in the type of the user's value: a tensor like theirs, else a number."""
    return torch.full_like(user, composed) if isinstance(user, torch.Tensor) else composed
