"""Built-in demo tasks: small, deterministic, and needing no download.

* ``digits``: an MLP on scikit-learn's bundled 8x8 digits (``load_digits``), with a held-out
  validation split; validation reports loss and accuracy.
* ``spirals``: two interleaved generated spirals, a classic non-linear 2-D problem.
* ``quadratic``: linear regression with MSE on generated data of chosen conditioning. Its loss is
  an exact quadratic, so the largest stable SGD step is known in closed form
  (see :func:`Task.max_stable_lr`); the LR finder tests use it as ground truth.
* ``charlm``: a small character-level causal transformer on the Python standard library's own
  source files (:mod:`trainer.charlm`): the task worth babysitting, with its own defaults
  (:data:`trainer.config.TASK_DEFAULTS`: AdamW, warm-up and cosine decay).

Every task is built from a seed alone, so training is reproducible on CPU.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from trainer.charlm import build_task as build_charlm
from trainer.config import TASKS
from trainer.task import Task

TASK_NAMES = TASKS.options

VAL_FRACTION = 0.2  # held-out share for digits and spirals
SPIRAL_POINTS_PER_CLASS = 1000
SPIRAL_NOISE = 0.08
QUADRATIC_SAMPLES = 512
QUADRATIC_FEATURES = 16
QUADRATIC_NOISE = 0.1
DEFAULT_HIDDEN = 64  # units per hidden layer of the digits and spirals MLPs


def make_task(name: str, *, seed: int = 0, condition: float = 10.0,
              hidden: int = DEFAULT_HIDDEN) -> Task:
    """Build a built-in task. ``condition`` (quadratic only) is λmax/λmin of XᵀX/n;
    ``hidden`` (digits, spirals) is the width of each hidden layer."""
    TASKS.check("task", name)
    generator = torch.Generator().manual_seed(seed)
    if name == "quadratic":
        return _quadratic(generator, condition)
    if name == "charlm":
        return _charlm(generator)
    return {"digits": _digits, "spirals": _spirals}[name](generator, hidden)


def _split(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    order = torch.randperm(x.shape[0], generator=generator)
    n_val = round(VAL_FRACTION * x.shape[0])
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _mlp(sizes: list[int], generator: torch.Generator) -> nn.Sequential:
    """ReLU MLP with Xavier (Glorot & Bengio 2010) uniform weights and zero biases."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.zero_()
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _digits(generator: torch.Generator, hidden: int) -> Task:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    train_x, train_y, val_x, val_y = _split(x, y, generator)
    # Normalize with training statistics only (the literature's "LR 0.01 on normalized inputs").
    # The std is floored at one grey level (pixels are 0..16): a border pixel that is blank in
    # all but a handful of training images has a std near 0, and dividing by it turned a
    # validation image's faint stroke there into a feature of ~1000, so the validation loss was
    # set by a few such images, not by how well the model had learned.
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1.0)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    model = _mlp([64, hidden, 10], generator)
    return Task("digits", model, nn.CrossEntropyLoss(), train_x, train_y, val_x, val_y,
                info={"description": f"MLP 64-{hidden}-10 on scikit-learn digits (8x8)"})


def _spirals(generator: torch.Generator, hidden: int) -> Task:
    n = SPIRAL_POINTS_PER_CLASS
    t = torch.rand(n, generator=generator) * 3 * math.pi + 0.5
    xs, ys = [], []
    for label, phase in enumerate((0.0, math.pi)):
        radius = t / (3 * math.pi)
        points = torch.stack([radius * torch.cos(t + phase), radius * torch.sin(t + phase)], 1)
        xs.append(points + SPIRAL_NOISE * torch.randn(n, 2, generator=generator))
        ys.append(torch.full((n,), label, dtype=torch.long))
    train_x, train_y, val_x, val_y = _split(torch.cat(xs), torch.cat(ys), generator)
    model = _mlp([2, hidden, hidden, 2], generator)
    return Task("spirals", model, nn.CrossEntropyLoss(), train_x, train_y, val_x, val_y,
                info={"description": f"MLP 2-{hidden}-{hidden}-2 on two generated spirals"})


def _quadratic(generator: torch.Generator, condition: float) -> Task:
    if not condition >= 1.0:
        raise ValueError(f"condition must be >= 1, got {condition}")
    n, d = QUADRATIC_SAMPLES, QUADRATIC_FEATURES
    # X = U diag(s) Vᵀ with log-spaced singular values gives XᵀX/n exactly the spectrum we want.
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    eig = torch.logspace(0, math.log10(condition), d)  # eigenvalues of XᵀX/n, 1 … condition
    x = u @ torch.diag(torch.sqrt(eig * n)) @ v.T
    w_true = torch.randn(d, 1, generator=generator)
    y = x @ w_true + QUADRATIC_NOISE * torch.randn(n, 1, generator=generator)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    hessian_max_eig = float(2.0 * torch.linalg.eigvalsh(x.T @ x / n).max())
    return Task("quadratic", model, nn.MSELoss(), x, y, classification=False,
                info={"description": f"linear regression, {n}x{d}, condition {condition:g}",
                      "hessian_max_eig": hessian_max_eig, "condition": condition})


def _charlm(generator: torch.Generator) -> Task:
    return build_charlm(generator)  # its own module: model, corpus and sampling
