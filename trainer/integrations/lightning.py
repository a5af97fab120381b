"""PandaCallback: babysit a PyTorch Lightning ``Trainer.fit`` like any hand-written loop.

    from trainer.lightning import PandaCallback

    trainer = L.Trainer(max_epochs=20, callbacks=[PandaCallback("runs/mnist-pl")])
    trainer.fit(model, train_loader, val_loader)

The callback wraps a :class:`~trainer.babysitter.Babysitter` around the trainer's optimizer and
forwards Lightning's hooks to it:

* every training batch: the batch loss (a detached tensor: no ``.item()``, no device sync) goes
  to :meth:`Babysitter.step`, which also applies pending knobs at this batch boundary and
  blocks there while the run is paused;
* after every validation run (not the sanity check): the validation metrics found in
  ``trainer.callback_metrics`` go to :meth:`Babysitter.log_validation`;
* a ``stop`` command (or the Babysitter's own early stopping) sets ``trainer.should_stop``, so
  Lightning ends ``fit`` after the current batch, exactly like its ``EarlyStopping`` does;
* the run is closed as ``finished``, ``stopped`` (stop command, Ctrl+C) or ``failed`` (any
  exception, with its message).

Only this module imports Lightning; ``import trainer`` never does. Install the extra with
``pip install 'panda-babysitter[lightning]'``.

Schedulers: a scheduler returned by ``configure_optimizers`` keeps working, and a live LR
change holds on top of it: Panda applies its factor around each optimizer update and leaves the
scheduler's own values in the param groups (:mod:`trainer.composition`). Panda's own decay
(``PandaCallback(..., schedule={"shape": "cosine"})``) takes its length from the Trainer
(``max_epochs``, else ``max_steps``) unless ``total_epochs`` is given.

Epochs: the run's epoch counts completed epochs, as in a hand-written loop that calls
``log_validation`` once per epoch (after 20 epochs it says 20).

Known limits, on purpose:

* **Multi-process training (DDP, FSDP, …).** When ``torch.distributed`` is initialized (every
  Lightning multi-process strategy on GPUs or CPUs), the callback builds a Babysitter on
  *every* rank, and the Babysitter keeps them in lockstep (:mod:`trainer.distributed`): only
  rank 0 writes the run store; knobs, pause and stop reach all ranks at the same step (at
  the next multiple of ``sync_every`` steps); the logged loss is the mean over ranks. Log
  validation metrics with ``sync_dist=True`` when using ``early_stop`` so every rank decides
  alike. Every rank must see the same number of batches (Lightning's distributed sampler
  sees to that); a ``training_step`` that returns None on one rank only would break the
  lockstep. Without a ``torch.distributed`` group (e.g. XLA/TPU) only global rank 0 babysits and
  knobs, pause and stop do not reach the other ranks: broadcasting them there is separate
  work, and the callback warns.
* **One optimizer.** Knobs act on ``trainer.optimizers[0]``; others keep their settings.
* A Panda step is one training batch. With ``accumulate_grad_batches=k`` the optimizer steps
  every k batches; the loss logged is the batch's own (Lightning's 1/k scaling is undone).
* ``trainer.should_stop`` honours ``min_epochs`` / ``min_steps``, so a stop command waits for
  them, as Lightning's ``EarlyStopping`` does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from trainer.babysitter import Babysitter, ended_by
from trainer.schedules import Schedule

log = logging.getLogger(__name__)

#: Prefixes that mark a ``callback_metrics`` entry as a validation metric; stripped when logged,
#: so ``val_loss`` is stored as the validation ``loss`` and ``val/acc`` as ``acc``.
VAL_PREFIXES = ("validation_", "validation/", "valid_", "valid/", "val_", "val/", "val.")
_DEFAULT_MODEL = object()  # sentinel: "use the LightningModule"


def validation_name(name: str) -> str | None:
    """The name a validation metric is stored under, or None if ``name`` is not one.

    ``val_loss`` / ``val/loss`` / ``val`` → ``loss``; ``val_acc`` → ``acc``; ``train_loss`` →
    None.
    """
    lowered = name.lower()
    if lowered in ("val", "valid", "validation"):
        return "loss"
    for prefix in VAL_PREFIXES:
        if lowered.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return None


def _scalar(value: Any) -> torch.Tensor | float | None:
    """A value the store can hold (scalar tensor kept as a tensor, or a number), else None.

    Only metadata is read (``numel``), so a CUDA tensor is never synchronised here.
    """
    if isinstance(value, torch.Tensor):
        return value.detach() if value.numel() == 1 else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def batch_loss(outputs: Any) -> torch.Tensor | float | None:
    """The loss in what ``training_step`` returned: a tensor, or a mapping's ``"loss"``."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return _scalar(outputs)


class PandaCallback(pl.Callback):
    """A Lightning callback that does what :class:`~trainer.babysitter.Babysitter` does.

    Args:
        run_dir: the run's directory (``run.db`` lives there), e.g. ``"runs/mnist-pl"``.
        config: JSON-serializable settings to record with the run. When left out, the
            LightningModule's ``hparams`` are recorded (if any and JSON-friendly).
        val_metrics: which ``trainer.callback_metrics`` entries are validation metrics.
            Default: names starting with ``val``/``valid``/``validation`` (``val_loss``,
            ``val/acc``, …). Or a list of exact names, or a predicate on the name. The prefix
            is stripped when stored; the one that becomes ``loss`` is the validation loss.
        **babysitter_kwargs: passed to :class:`~trainer.babysitter.Babysitter` (``schedule``,
            ``early_stop``, ``on_diverge``, ``checkpoint_every``, ``task``, …). ``model``
            defaults to the LightningModule (needed for Panda's checkpoints and rollback; pass
            ``model=None`` to turn those off); ``steps_per_epoch`` defaults to the trainer's
            number of training batches.

    Under a multi-process strategy the callback runs on every rank; the Babysitters of all
    ranks keep each other in lockstep and only rank 0 writes the run (see the module notes).

    The Babysitter exists from ``on_train_start`` (after Lightning has built the optimizers
    and restored any ``ckpt_path``) until the end of ``fit``; it is available as
    :attr:`babysitter` meanwhile, e.g. to call ``callback.babysitter.set(lr=...)`` from code.
    """

    def __init__(self, run_dir: str | os.PathLike = "runs/run", config: dict | None = None, *,
                 val_metrics: Sequence[str] | Callable[[str], bool] | None = None,
                 **babysitter_kwargs: Any):
        super().__init__()
        if "optimizer" in babysitter_kwargs:
            raise TypeError("PandaCallback takes the optimizer from the Trainer; "
                            "do not pass optimizer=")
        self.run_dir = run_dir
        self.config = config
        self.val_metrics = val_metrics
        self.babysitter_kwargs = babysitter_kwargs
        self.babysitter: Babysitter | None = None
        #: the final status of the last run ("finished", "stopped", "failed"), after fit.
        self.final_status: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_fit_start: Lightning restores a ckpt_path's optimizer state after that hook,
        # and only knows the number of batches per epoch from here on.
        lockstep = trainer.world_size > 1 and _torch_distributed_ready()
        if not lockstep and not trainer.is_global_zero:
            return  # no process group to share knobs through: rank 0 alone babysits
        if self.babysitter is not None:  # a previous fit that did not end cleanly
            self.babysitter.close()
        if not trainer.optimizers:
            raise RuntimeError("PandaCallback needs an optimizer: configure_optimizers "
                               "returned none")
        self._warn_about_setup(trainer, lockstep)
        kwargs = dict(self.babysitter_kwargs)
        model = kwargs.pop("model", _DEFAULT_MODEL)
        kwargs.setdefault("steps_per_epoch", _batches_per_epoch(trainer))
        if kwargs.get("schedule") is not None:
            kwargs["schedule"] = _schedule_for(trainer, kwargs["schedule"],
                                               kwargs["steps_per_epoch"])
        kwargs.setdefault("task", type(pl_module).__name__)
        self.final_status = None
        self.babysitter = Babysitter(
            trainer.optimizers[0], self.run_dir,
            model=pl_module if model is _DEFAULT_MODEL else model,
            config=self.config if self.config is not None else _hparams(pl_module), **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close(*ended_by(exception))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()  # a safety net: normally closed by on_train_end or on_exception

    def _close(self, status: str | None = None, error: str | None = None) -> None:
        bs, self.babysitter = self.babysitter, None
        if bs is not None:
            bs.close(status, error)
            self.final_status = bs.final_status

    # --- training ---------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bs = self.babysitter
        if bs is None:
            return
        bs.epoch = trainer.current_epoch
        if bs.steps_per_epoch is None and bs.schedule.shape != "constant":
            bs.apply_schedule()  # no batch count: the decay advances once per epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.babysitter is not None:  # epochs completed, like a hand-written loop's count
            self.babysitter.epoch = trainer.current_epoch + 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        bs = self.babysitter
        if bs is None:
            return
        loss = batch_loss(outputs)
        if loss is None:  # training_step returned None: Lightning skipped this batch
            return
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and pl_module.automatic_optimization:
            loss = loss * accumulate  # Lightning divided it by k; a lazy op, no sync
        bs.step(loss)  # blocks here while paused
        if bs.should_stop:
            trainer.should_stop = True

    # --- validation -------------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: a callback's hook runs before the LightningModule's, so
        # metrics the module logs in its own on_validation_epoch_end would be missed.
        bs = self.babysitter
        if bs is None or trainer.sanity_checking:
            return
        metrics = self.validation_metrics(trainer.callback_metrics)
        if not metrics:
            return
        loss = metrics.pop("loss", None)
        bs.log_validation(loss, end_epoch=False, **metrics)  # epochs follow the Trainer
        if bs.should_stop:  # Panda's own early stopping (early_stop=N)
            trainer.should_stop = True

    def validation_metrics(self, callback_metrics: Mapping[str, Any]
                           ) -> dict[str, torch.Tensor | float]:
        """Pick the validation metrics out of ``callback_metrics``, renamed for the store."""
        chosen: dict[str, torch.Tensor | float] = {}
        for name, value in callback_metrics.items():
            stored = self._stored_name(name)
            scalar = _scalar(value)
            if stored is not None and scalar is not None:
                chosen.setdefault(stored, scalar)
        return chosen

    def _stored_name(self, name: str) -> str | None:
        selector = self.val_metrics
        if selector is None:
            return validation_name(name)
        selected = selector(name) if callable(selector) else name in selector
        return (validation_name(name) or name) if selected else None

    # --- checks -----------------------------------------------------------------------------

    @staticmethod
    def _warn_about_setup(trainer: pl.Trainer, lockstep: bool) -> None:
        if not trainer.is_global_zero:
            return  # one warning per job, not one per rank
        if len(trainer.optimizers) > 1:
            log.warning("PandaCallback: %d optimizers; Panda's knobs act on the first one only "
                        "(%s).", len(trainer.optimizers), type(trainer.optimizers[0]).__name__)
        if trainer.world_size > 1 and not lockstep:
            log.warning(
                "PandaCallback: %d processes but no torch.distributed process group: Panda "
                "runs on global rank 0 only. Knob changes reach rank 0's optimizer alone and "
                "pause/stop act on rank 0 alone (broadcast to the other ranks is not "
                "implemented for this strategy): do not change knobs live in this run.",
                trainer.world_size)


def _schedule_for(trainer: pl.Trainer, schedule: Schedule | dict,
                  steps_per_epoch: int | None) -> dict:
    """Panda's decay with its length from the Trainer: a cosine without ``total_epochs``
    reaches its floor at the end of ``max_epochs`` (else ``max_steps``), not after the
    100 epochs of the default."""
    values = schedule.to_dict() if isinstance(schedule, Schedule) else dict(schedule)
    given = (schedule.total_epochs != Schedule.total_epochs if isinstance(schedule, Schedule)
             else "total_epochs" in schedule)
    if values.get("shape") == "cosine" and not given:
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            values["total_epochs"] = float(trainer.max_epochs)
        elif trainer.max_steps and trainer.max_steps > 0 and steps_per_epoch:
            values["total_epochs"] = trainer.max_steps / steps_per_epoch
    return values


def _torch_distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _batches_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if isinstance(batches, int) and batches > 0:
        return batches
    if isinstance(batches, float) and batches != float("inf") and batches > 0:
        return int(batches)
    return None  # an iterable dataset of unknown length: schedules advance per epoch


def _hparams(pl_module: pl.LightningModule) -> dict | None:
    """The module's ``save_hyperparameters()`` values that JSON can hold, or None."""
    try:
        hparams = dict(pl_module.hparams)
    except Exception:  # an odd hparams container must never stop training
        return None
    plain = {}
    for key, value in hparams.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # a module or a tensor passed as a hyperparameter: not recordable
        plain[str(key)] = value
    return plain or None


__all__ = ["PandaCallback", "batch_loss", "validation_name"]
