"""Benchmark: Panda's ``lr_find`` against davidtvs/pytorch-lr-finder (``torch_lr_finder``).

Not a test. Needs ``torch_lr_finder`` in the venv, installed for this script only:

    .venv/bin/pip install --no-deps torch-lr-finder
    .venv/bin/python benchmarks/lr_finder_vs_torch_lr_finder.py

``torch_lr_finder`` imports tqdm and matplotlib at module level but only uses them for progress
bars and plots; when they are missing, this script puts inert stand-ins in ``sys.modules``.

Two tables (Markdown):

1. Wall time of the coarse ramp alone (``refine=False``), both tools on the same model, data
   and ``num_iter``, interleaved over several rounds; median ratio Panda / torch_lr_finder.
   The "no divergence" rows end below the stability limit, so both tools run exactly
   ``num_iter`` steps (a per-step comparison); the "to divergence" rows use each tool's own
   stopping rule.
2. Divergence estimate vs the closed-form limit 2(1+β)/L on the quadratic task (full batch,
   SGD): torch_lr_finder's stopping LR, Panda's coarse stop, and Panda's refined max_stable_lr.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import statistics
import sys
import time
import types

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from trainer.lr_range.finder import lr_find
from trainer.tasks import make_task

ROUNDS = 7
NUM_ITER = 100
START_LR, END_LR = 1e-5, 10.0
BELOW_LIMIT = 0.5      # "no divergence" rows ramp up to this fraction of the stability limit
MINIBATCH = 64


def stand_in(dotted: str) -> types.ModuleType:
    """Register an empty module (and its parent) under ``dotted``; returns the leaf.
    Each gets a ``__spec__``, because torch._dynamo calls ``find_spec`` on installed modules."""
    parent_name, _, child = dotted.partition(".")
    modules = []
    for name in (parent_name, dotted):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        modules.append(module)
    setattr(modules[0], child, modules[1])
    return modules[1]


def import_torch_lr_finder():
    """Import ``torch_lr_finder``, standing in for its plotting/progress-bar imports if absent."""
    if importlib.util.find_spec("tqdm") is None:
        stand_in("tqdm.autonotebook").tqdm = lambda iterable, **_: iterable
    if importlib.util.find_spec("matplotlib") is None:
        stand_in("matplotlib.pyplot")
    from torch_lr_finder import LRFinder

    return LRFinder


def setup(task_name: str, condition: float, momentum: float, batch_size: int | None):
    task = make_task(task_name, seed=0, condition=condition)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01, momentum=momentum)
    data = TensorDataset(task.train_x, task.train_y)
    # Whole-batch indexing (batch_size=None over a BatchSampler): per-sample collation would
    # dominate the timings and hide the finders' own overhead.
    batches = BatchSampler(SequentialSampler(data), batch_size or len(data), drop_last=False)
    loader = DataLoader(data, sampler=batches, batch_size=None)
    return task, optimizer, loader


def run_panda(task, optimizer, loader, end_lr: float, refine: bool):
    start = time.perf_counter()
    result = lr_find(task.model, optimizer, task.loss_fn, loader, start_lr=START_LR,
                     end_lr=end_lr, num_iter=NUM_ITER, refine=refine)
    return time.perf_counter() - start, result


def run_theirs(lr_finder_cls, task, optimizer, loader, end_lr: float):
    start = time.perf_counter()
    finder = lr_finder_cls(task.model, optimizer, task.loss_fn)
    finder.range_test(loader, start_lr=START_LR, end_lr=end_lr, num_iter=NUM_ITER)
    finder.reset()   # restore model and optimizer, as lr_find leaves them untouched
    return time.perf_counter() - start, finder.history


def timing_row(lr_finder_cls, label, task_name, condition, momentum, batch_size, end_lr):
    task, optimizer, loader = setup(task_name, condition, momentum, batch_size)
    ours, theirs = [], []
    steps = [0, 0]
    # Round 0 is an untimed warm-up; rounds alternate which tool goes first, so drift in machine
    # load and allocator state hits both tools alike.
    for round_ in range(ROUNDS + 1):
        for tool in (0, 1) if round_ % 2 else (1, 0):
            if tool == 0:
                seconds, result = run_panda(task, optimizer, loader, end_lr, refine=False)
                steps[0] = len(result.lrs)
            else:
                seconds, history = run_theirs(lr_finder_cls, task, optimizer, loader, end_lr)
                steps[1] = len(history["lr"])
            if round_:
                (ours, theirs)[tool].append(seconds)
    ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    return (f"| {label} | {steps[0]} / {steps[1]} | {ours_ms:.1f} | {theirs_ms:.1f} "
            f"| {ours_ms / theirs_ms:.2f} |")


def timing_table(lr_finder_cls) -> list[str]:
    rows = ["| case | steps (Panda / theirs) | Panda ms | torch_lr_finder ms | ratio |",
            "|---|---|---|---|---|"]
    quad_limit = make_task("quadratic", seed=0, condition=10.0).max_stable_lr(0.0)
    cases = [
        ("quadratic κ=10, full batch, no divergence", "quadratic", 10.0, None,
         BELOW_LIMIT * quad_limit),
        ("quadratic κ=10, full batch, to divergence", "quadratic", 10.0, None, END_LR),
        ("digits MLP, batch 64, no divergence", "digits", 10.0, MINIBATCH, 1e-2),
        ("digits MLP, batch 64, to divergence", "digits", 10.0, MINIBATCH, END_LR),
    ]
    for label, name, condition, batch_size, end_lr in cases:
        rows.append(timing_row(lr_finder_cls, label, name, condition, 0.0, batch_size, end_lr))
    return rows


def accuracy_table(lr_finder_cls) -> list[str]:
    rows = ["| κ | β | closed form | torch_lr_finder stop | Panda coarse stop "
            "| Panda refined (time) |", "|---|---|---|---|---|---|"]
    for condition in (10.0, 100.0):
        for momentum in (0.0, 0.9):
            task, optimizer, loader = setup("quadratic", condition, momentum, None)
            true = task.max_stable_lr(momentum)
            _, history = run_theirs(lr_finder_cls, task, optimizer, loader, END_LR)
            _, coarse = run_panda(task, optimizer, loader, END_LR, refine=False)
            seconds, refined = run_panda(task, optimizer, loader, END_LR, refine=True)
            theirs = history["lr"][-1]
            rows.append(
                f"| {condition:g} | {momentum:g} | {true:.4g} | {theirs:.4g} ({theirs / true:.2f}×)"
                f" | {coarse.diverged_at:.4g} ({coarse.diverged_at / true:.2f}×)"
                f" | {refined.max_stable_lr:.4g} ({refined.max_stable_lr / true:.3f}×,"
                f" {seconds * 1e3:.0f} ms) |")
    return rows


def main() -> int:
    torch.set_num_threads(1)
    try:
        lr_finder_cls = import_torch_lr_finder()
    except ImportError as error:
        print(f"torch_lr_finder is not importable ({error}); "
              "install it with: .venv/bin/pip install --no-deps torch-lr-finder")
        return 1
    print(f"torch {torch.__version__}, 1 thread, CPU; num_iter={NUM_ITER}, "
          f"median of {ROUNDS} interleaved rounds\n")
    print("\n".join(timing_table(lr_finder_cls)))
    print()
    print("\n".join(accuracy_table(lr_finder_cls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
