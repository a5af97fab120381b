"""How close is Panda to the least an in-loop logger can cost? The floor under issue #18's goal.

``benchmarks/overhead.py`` measures whole runs. This script asks what part of that cost any
tool would pay, on the same fast loop (a 64-128-10 MLP on one fixed batch, ``--loop fast``
there), in one process: 100-step segments of each variant, interleaved and rotated so machine
noise hits them alike, medians of the per-segment ratios to the bare loop beside it.

* ``bare``: the loop alone;
* ``loss read``: ``values.append(loss.item())`` after each step, the least a logger that keeps
  the loss does (TensorBoard's ``add_scalar`` does this and more);
* ``+ hook pair``: and an empty optimizer step pre-hook and post-hook, the least a tool does
  that sees what each update used and composes its knobs with the user's schedule (see
  :mod:`trainer.composition`): torch calls the hooks inside ``optimizer.step()``;
* ``+ Panda's hooks``: the loss read with Panda's own pair instead (a
  :class:`~trainer.composition.Composition` with no factor in force, as in a run nobody has
  touched yet): what composing costs above the empty pair;
* ``Panda``: ``bs.step(loss)`` with a SQLite run store, its writer thread included.

Inside the loop every Python or torch call costs several times what it costs alone (the
loop's own work evicts the interpreter's caches), so the floor is measured, not summed.

    .venv/bin/python benchmarks/overhead_floor.py [--segments 300 --steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from overhead import FixedBatch, _model  # the whole-run benchmark's fast loop

from trainer import Babysitter
from trainer.composition import Composition
from trainer.optim import OptimizerKnobs
from trainer.schedules import Schedule

VALUES_KEPT = 10_000  # the loss-read variants drop their list past this (bounded memory)
Variant = tuple[torch.nn.Module, torch.optim.Optimizer, Callable | None]


def _reader() -> Callable:
    values: list[float] = []

    def after(loss: torch.Tensor) -> None:
        values.append(loss.item())
        if len(values) > VALUES_KEPT:
            values.clear()
    return after


def _variant(kind: str, run_dir: Path, babysitters: list[Babysitter]) -> Variant:
    model = _model("fast")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if kind == "bare":
        return model, optimizer, None
    if kind == "loss read":
        return model, optimizer, _reader()
    if kind == "+ hook pair":
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: None)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: None)
        return model, optimizer, _reader()
    if kind == "+ Panda's hooks":
        Composition(OptimizerKnobs(optimizer), Schedule())  # the optimizer keeps its hooks
        return model, optimizer, _reader()
    babysitter = Babysitter(optimizer, run_dir, model=model)
    babysitters.append(babysitter)
    return model, optimizer, babysitter.step


def _segment(variant: Variant, steps: int, batch: FixedBatch) -> tuple[float, float]:
    """Wall and training-thread CPU µs a step over ``steps`` steps."""
    model, optimizer, after = variant
    (x, y), loss_fn = batch.batch, batch.loss_fn
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after is not None:
            after(loss)
    return ((time.perf_counter() - wall) / steps * 1e6,
            (time.thread_time() - cpu) / steps * 1e6)


def measure(segments: int, steps: int) -> dict[str, list[tuple[float, float]]]:
    torch.set_num_threads(1)
    batch = FixedBatch()
    names = ["bare", "loss read", "+ hook pair", "+ Panda's hooks", "Panda"]
    babysitters: list[Babysitter] = []
    with tempfile.TemporaryDirectory(prefix="panda-floor-") as tmp:
        try:
            variants = {name: _variant(name, Path(tmp) / "run", babysitters) for name in names}
            for name in names:  # warm-up: first calls allocate
                _segment(variants[name], steps, batch)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for i in range(segments):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    results[name].append(_segment(variants[name], steps, batch))
        finally:  # its writer thread stops before the directory goes
            for babysitter in babysitters:
                babysitter.close()
    return results


def report(results: dict[str, list[tuple[float, float]]]) -> str:
    bare = results["bare"]
    lines = ["| variant | µs a step | overhead vs bare (median of pairs) | training-thread CPU "
             "µs a step vs bare |", "|---|---:|---:|---:|"]
    for name, rows in results.items():
        ratio = statistics.median(w / b[0] for (w, _), b in zip(rows, bare, strict=True))
        cpu = statistics.median(c - b[1] for (_, c), b in zip(rows, bare, strict=True))
        wall = statistics.median(w for w, _ in rows)
        lines.append(f"| {name} | {wall:.1f} | {100 * (ratio - 1):+.2f} % | {cpu:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=300, help="segments of each variant")
    parser.add_argument("--steps", type=int, default=100, help="steps a segment")
    args = parser.parse_args(argv)
    print(report(measure(args.segments, args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
