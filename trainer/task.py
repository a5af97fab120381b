"""A task: a model, its loss and its data, which is all a training loop needs.

The built-in tasks (:mod:`trainer.tasks`) and the character-level LM (:mod:`trainer.charlm`)
are :class:`Task` objects; the runner, range tests and searches use nothing else of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Task:
    """A model, its loss and its data: all a training loop needs."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    classification: bool = True
    info: dict = field(default_factory=dict)
    # Cap on the fixed set of training samples a range test measures after each step (None:
    # the range test's own cap). A transformer's forward pass over thousands of windows per
    # step would make a CPU range test take many minutes.
    measure_samples: int | None = None
    # Intra-op threads to train with (torch.set_num_threads, applied by runner.build in the
    # trainer's own process); None leaves torch's default (one per core).
    threads: int | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.num_train / batch_size)

    def batches(self, batch_size: int, *, seed: int, epoch: int,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one epoch of shuffled mini-batches, starting at batch index ``start``.

        The order depends only on ``(seed, epoch)``, so a resumed run can skip exactly the
        batches it already trained on and see the same data as an uninterrupted run.
        """
        return iter_batches(self.train_x, self.train_y, batch_size, seed=seed, epoch=epoch,
                            start=start)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics: ``loss`` always, ``accuracy`` for classification tasks."""
        if self.val_x is None or self.val_y is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(self.val_x)
            metrics = {"loss": float(self.loss_fn(out, self.val_y))}
            if self.classification:
                metrics["accuracy"] = float((out.argmax(dim=1) == self.val_y).float().mean())
            return metrics
        finally:
            self.model.train(was_training)

    def optim_params(self) -> Any:
        """What the optimizer is built on: the model's parameters, or param groups (e.g. no
        weight decay on biases and norms)."""
        return self.model.parameters()

    def samples(self, seed: int) -> list[dict[str, Any]]:
        """Generated examples to show beside the curves at validation time (none here)."""
        return []

    def max_stable_lr(self, momentum: float = 0.0) -> float:
        """Largest stable full-batch SGD learning rate (quadratic task only).

        For f(w) = mean((Xw - y)^2) the Hessian is H = 2 XᵀX / n, so L = λmax(H). Gradient
        descent is stable iff lr < 2 / L; heavy-ball momentum β (PyTorch's form, no dampening)
        widens that to lr < 2(1 + β) / L (Polyak 1964; Goh, "Why Momentum Really Works", 2017).
        """
        if "hessian_max_eig" not in self.info:
            raise ValueError(f"task {self.name!r} has no closed-form stability limit")
        return 2.0 * (1.0 + momentum) / self.info["hessian_max_eig"]


def iter_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int, epoch: int,
                 start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic shuffled mini-batches for one epoch (see :meth:`Task.batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(x.shape[0], generator=generator)
    for first in range(start * batch_size, x.shape[0], batch_size):
        idx = order[first:first + batch_size]
        yield x[idx], y[idx]
