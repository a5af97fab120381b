"""Is ``charlm`` worth babysitting? The figures behind README's charlm table.

Trains the task with the loop ``panda train`` runs (same model, batches, optimizer with its
param groups and the LR of :func:`trainer.schedules.lr_at` at every step), but evaluates every
``--eval-every`` steps instead of once per epoch, and prints one line per evaluation:

    .venv/bin/python benchmarks/charlm.py run --steps 1500              # the task's defaults
    .venv/bin/python benchmarks/charlm.py run --steps 1500 --lr 0.1     # 10x the LR
    .venv/bin/python benchmarks/charlm.py run --steps 1500 --schedule constant --warmup 0
    .venv/bin/python benchmarks/charlm.py lr-find                       # range test

``--schedule cosine`` (default) is the task's warm-up + cosine, with its length set to ``--steps``
so a short budget still decays to the floor (what a run of that many steps would use);
``--warmup STEPS`` overrides the warm-up (0: none). Runs are deterministic on CPU for a given
``--threads``; wall times move with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from trainer.charlm import CONTEXT, D_MODEL, N_HEAD, N_LAYER, build_task
from trainer.config import TASK_DEFAULTS
from trainer.optim import make_optimizer
from trainer.schedules import Schedule, lr_at, schedule_from

DEFAULTS = TASK_DEFAULTS["charlm"]


def _task(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    return build_task(torch.Generator().manual_seed(args.seed), context=args.context,
                      n_layer=args.layers, n_head=args.heads, d_model=args.d_model)


def _schedule(args: argparse.Namespace, steps_per_epoch: int) -> Schedule:
    """The task's warm-up + cosine over ``--steps``, or a constant LR; ``--warmup`` (steps)
    overrides the warm-up of either (``--schedule constant --warmup 0``: no schedule at all)."""
    default = DEFAULTS["schedule"]
    warmup = (default["warmup_epochs"] if args.warmup is None
              else args.warmup / steps_per_epoch)
    if args.schedule == "constant":
        return schedule_from({"shape": "constant", "warmup_epochs": warmup})
    return schedule_from({**default, "total_epochs": args.steps / steps_per_epoch,
                          "warmup_epochs": warmup})


def run(args: argparse.Namespace) -> None:
    task = _task(args)
    optimizer = make_optimizer(args.optimizer, task.optim_params(), lr=args.lr,
                               momentum=DEFAULTS["momentum"], weight_decay=args.weight_decay)
    per_epoch = task.steps_per_epoch(args.batch_size)
    schedule = _schedule(args, per_epoch)
    print(json.dumps({"task": task.info["description"], "lr": args.lr,
                      "schedule": schedule.to_dict(), "steps_per_epoch": per_epoch,
                      "threads": torch.get_num_threads()}))
    step, start, train_time = 0, time.perf_counter(), 0.0
    recent: list[float] = []
    epoch = 0
    while step < args.steps:
        for x, y in task.batches(args.batch_size, seed=args.seed, epoch=epoch):
            lr = lr_at(step, args.lr, schedule, per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            loss = task.loss_fn(task.model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_time += time.perf_counter() - tick
            recent.append(loss.item())
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                metrics = task.evaluate()
                print(f"step {step:6d}  wall {time.perf_counter() - start:7.1f}s  "
                      f"train {sum(recent) / len(recent):7.4f}  val {metrics['loss']:7.4f}  "
                      f"bpc {metrics['bpc']:.3f}  acc {metrics['accuracy']:.3f}  lr {lr:.2e}  "
                      f"{1e3 * train_time / step:.1f} ms/step", flush=True)
                recent = []
                if not math.isfinite(metrics["loss"]):
                    return
            if step >= args.steps:
                break
        epoch += 1
    if args.sample:
        tick = time.perf_counter()
        samples = task.samples(seed=0)
        print(f"samples ({time.perf_counter() - tick:.2f} s):")
        for s in samples:
            print(s["text"])


def lr_find_cmd(args: argparse.Namespace) -> None:
    """The range test `panda lr-find --task charlm` runs (fixed training measurement set)."""
    from trainer.lr_range.job import lr_find_for_task

    tick = time.perf_counter()
    result = lr_find_for_task("charlm", num_iter=args.num_iter, refine=not args.no_refine)
    elapsed = time.perf_counter() - tick
    lrs, losses = result.lrs, result.smoothed_losses
    for i in range(0, len(lrs), max(1, len(lrs) // 25)):
        print(f"lr {lrs[i]:.2e}  smoothed {losses[i]:.4f}  raw {result.losses[i]:.4f}")
    print(f"suggested {result.suggested_lr}  range {result.suggestion_range}  "
          f"max stable {result.max_stable_lr}  stopped {result.stop_reason}  {elapsed:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "lr-find"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default=DEFAULTS["optimizer"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--warmup", type=float, help="warm-up steps (default: the task's)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--sample", action="store_true", help="print samples at the end")
    parser.add_argument("--context", type=int, default=CONTEXT)
    parser.add_argument("--layers", type=int, default=N_LAYER)
    parser.add_argument("--heads", type=int, default=N_HEAD)
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--num-iter", type=int, default=100)
    parser.add_argument("--no-refine", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (run if args.command == "run" else lr_find_cmd)(args)


if __name__ == "__main__":
    main()
