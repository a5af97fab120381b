"""PandaCallback for Hugging Face ``transformers.Trainer``: babysit it like any hand-written loop.

    from trainer.huggingface import PandaCallback     # pip install 'panda-babysitter[hf]'

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   eval_dataset=val, callbacks=[PandaCallback("runs/gpt2-tiny")])
    trainer.train()

The callback wraps a :class:`~trainer.babysitter.Babysitter` around the Trainer's optimizer:

* **the loss of every optimizer step**: a forward hook on the model keeps each training
  micro-batch's ``outputs.loss`` as a detached tensor (what ``Trainer.compute_loss`` uses; no
  ``.item()``, no device sync), and at ``on_step_end`` their mean goes to
  :meth:`Babysitter.step`, which also takes pending knob changes and blocks while paused;
* **live knobs that hold**: the LR (on top of the Trainer's scheduler, which keeps running:
  Panda's factor is applied around each update, see :mod:`trainer.composition`), β1 (Adam's
  momentum knob) and weight decay;
* **evaluation metrics** (``on_evaluate``) as validation points: ``eval_loss`` is the
  validation loss, ``eval_accuracy`` becomes ``accuracy``;
* **stop** (a ``stop`` command or Panda's early stopping) sets
  ``control.should_training_stop``; **pause** blocks the training loop inside the callback;
* the run's ``TrainingArguments`` are its config; checkpoints, rollback and branches go
  through Panda as with any run (``model=`` defaults to the Trainer's model).

Only this module imports ``transformers``; ``import trainer`` never does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.babysitter import Babysitter

EVAL_PREFIX = "eval_"
# What Trainer.evaluate reports besides metrics: speed and position, not validation metrics.
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch")
_DEFAULT_MODEL = object()  # sentinel: "use the Trainer's model"


def training_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside the Trainer's (``accelerate`` wraps it, keeping it as
    ``.optimizer``): its step hooks run whichever wrapper calls it."""
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def output_loss(outputs: Any) -> torch.Tensor | None:
    """``outputs.loss`` of a model output (a ``ModelOutput``, a dict, or None when absent)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def validation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``eval_loss`` → ``loss``, ``eval_accuracy`` → ``accuracy``; speed and epoch dropped."""
    chosen = {}
    for name, value in metrics.items():
        short = name[len(EVAL_PREFIX):] if name.startswith(EVAL_PREFIX) else name
        if short in NOT_METRICS or isinstance(value, bool) or not isinstance(
                value, (int, float)) or not math.isfinite(value):
            continue
        chosen[short] = float(value)
    return chosen


class PandaCallback(TrainerCallback):
    """A ``transformers`` callback that does what :class:`~trainer.babysitter.Babysitter` does.

    Args:
        run_dir: the run's directory (``run.db`` and checkpoints live there).
        config: settings to record with the run; default: the ``TrainingArguments``.
        loss_from: picks the loss tensor out of the model's outputs (default ``outputs.loss``,
            which every ``transformers`` model returns when given labels).
        **babysitter_kwargs: passed to :class:`~trainer.babysitter.Babysitter`
            (``schedule``, ``early_stop``, ``on_diverge``, ``checkpoint_every``, ``store``, …).
    """

    def __init__(self, run_dir: str | os.PathLike = "runs/run", config: dict | None = None, *,
                 loss_from: Callable[[Any], torch.Tensor | None] = output_loss,
                 **babysitter_kwargs: Any):
        if "optimizer" in babysitter_kwargs:
            raise TypeError("PandaCallback takes the optimizer from the Trainer; "
                            "do not pass optimizer=")
        self.run_dir, self.config, self.loss_from = run_dir, config, loss_from
        self.babysitter_kwargs = babysitter_kwargs
        self.babysitter: Babysitter | None = None
        self.final_status: str | None = None
        self._losses: list[torch.Tensor] = []
        self._hook = None

    # --- lifecycle --------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model=None, optimizer=None,
                       train_dataloader=None, **kwargs: Any) -> None:
        if self.babysitter is not None:  # a previous train() that did not end cleanly
            self._close()
        if optimizer is None:
            raise RuntimeError("PandaCallback needs the Trainer's optimizer at on_train_begin")
        options = dict(self.babysitter_kwargs)
        chosen_model = options.pop("model", _DEFAULT_MODEL)
        options.setdefault("steps_per_epoch", _updates_per_epoch(args, train_dataloader))
        options.setdefault("task", type(model).__name__ if model is not None else None)
        self.final_status = None
        self.babysitter = Babysitter(
            training_optimizer(optimizer), self.run_dir,
            model=model if chosen_model is _DEFAULT_MODEL else chosen_model,
            config=self.config if self.config is not None else _arguments(args), **options)
        if model is not None:
            self._hook = model.register_forward_hook(self._keep_loss)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self._close()

    def _close(self, status: str | None = None, error: str | None = None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        bs, self.babysitter = self.babysitter, None
        if bs is not None:
            bs.close(status, error)
            self.final_status = bs.final_status

    # --- training ---------------------------------------------------------------------------

    def _keep_loss(self, module: torch.nn.Module, inputs: Any, outputs: Any) -> None:
        if module.training and torch.is_grad_enabled():  # a training micro-batch
            loss = self.loss_from(outputs)
            if loss is not None:
                self._losses.append(loss.detach())

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        bs = self.babysitter
        if bs is None:
            return
        losses, self._losses = self._losses, []
        if not losses:
            raise RuntimeError("PandaCallback found no loss in the model's outputs for this "
                               "step; pass PandaCallback(..., loss_from=lambda out: ...)")
        # The step's loss: the mean over its micro-batches (a lazy op on the device: no sync).
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        bs.step(loss)  # blocks here while paused
        if bs.should_stop:
            control.should_training_stop = True

    def on_log(self, args, state: TrainerState, control, logs=None, **kwargs: Any) -> None:
        """The Trainer logs its scheduler's LR (``get_last_lr``, read before the scheduler
        steps: the update just taken's), and after a live change that update used it times
        Panda's factor (see :mod:`trainer.composition`): the logs go on with the LR the update
        used, to the callbacks after this one (the console's printer is the Trainer's last)
        and into ``state.log_history``. Reporting callbacks that come before user callbacks
        (``report_to``: TensorBoard, W&B) have already sent the scheduler's."""
        bs = self.babysitter
        if bs is None or not logs or logs.get("learning_rate") is None:
            return
        composition = bs.composition
        if composition.lr_factor * composition.decay == 1.0:  # the scheduler's is the one used
            return
        lr = composition.used_lr  # not the factor now: Panda's decay has moved on a step
        logs["learning_rate"] = lr
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and \
                "learning_rate" in last:  # the Trainer's copy of these logs
            last["learning_rate"] = lr

    def on_epoch_end(self, args, state: TrainerState, control, **kwargs: Any) -> None:
        if self.babysitter is not None and state.epoch is not None:
            self.babysitter.epoch = round(state.epoch)  # epochs completed

    def on_evaluate(self, args, state, control: TrainerControl, metrics=None,
                    **kwargs: Any) -> None:
        bs = self.babysitter
        if bs is None or not metrics:
            return
        values = validation_metrics(metrics)
        if values:
            bs.log_validation(values.pop("loss", None), end_epoch=False, **values)
            if bs.should_stop:  # Panda's own early stopping
                control.should_training_stop = True


def _updates_per_epoch(args: TrainingArguments, loader: Any) -> int | None:
    try:
        batches = len(loader)
    except TypeError:  # an iterable dataset: epochs advance Panda's decay instead
        return None
    return max(1, batches // max(1, args.gradient_accumulation_steps))


def _arguments(args: TrainingArguments) -> dict[str, Any]:
    """The run's ``TrainingArguments`` as JSON (what ``to_json_string`` writes)."""
    return json.loads(args.to_json_string())


__all__ = ["PandaCallback", "output_loss", "training_optimizer", "validation_metrics"]
