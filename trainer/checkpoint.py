"""Checkpoints: snapshot in memory on the training thread, write atomically elsewhere.

A checkpoint holds the model and optimizer state, the Babysitter's knob state and step, and the
random generators' state (the CPU's and the CUDA devices', :mod:`trainer.rng`; under DDP every
rank's), so a resumed run continues exactly where the checkpoint was taken. Files are written
to a temporary name, fsynced and renamed (POSIX ``rename`` is atomic), so a kill -9 during a
write leaves the previous checkpoints intact. Loading uses ``torch.load(weights_only=True)``:
a checkpoint can never execute code.

Where the files lie, their names, and finding one: :mod:`trainer.checkpoint_files` (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trainer import atomic
from trainer.checkpoint_files import checkpoint_dir, checkpoint_path, list_checkpoints
from trainer.rng import RANKS, rng_state, set_rank_rng_state

DEFAULT_KEEP = 10  # automatic checkpoints kept in the ring
REASONS = ("periodic", "epoch", "intervention", "final", "manual", "best", "branch")


def _cpu_copy(value: Any) -> Any:
    """Deep copy with every tensor cloned to CPU (optimizer state_dicts share live tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             babysitter_state: dict[str, Any],
             ranks_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An in-memory, CPU-side copy of everything a resume needs (and, under DDP, every rank's
    generators as gathered: ``ranks_rng``)."""
    state = {
        "model": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "babysitter": _cpu_copy(babysitter_state),
        **rng_state(),  # the CPU generator's and, on a GPU, the devices' (trainer.rng)
    }
    if ranks_rng is not None:
        state[RANKS] = ranks_rng
    return state


def finite(state: dict[str, Any]) -> bool:
    """Whether every floating-point tensor of a snapshot's model and optimizer is finite: a
    state with a NaN or inf in it is not one to go back to (a rescue would diverge again)."""
    def walk(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value).all())
        if isinstance(value, dict):
            return all(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(walk(v) for v in value)
        return True
    return walk(state["model"]) and walk(state["optimizer"].get("state", {}))


def write_atomic(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see :mod:`trainer.atomic`)."""
    atomic.write_atomic(path, lambda f: torch.save(state, f))


def save(run_dir: str | os.PathLike, state: dict[str, Any], *, reason: str = "periodic",
         pinned: bool = False, keep: int = DEFAULT_KEEP) -> Path:
    """Write a checkpoint of ``state`` into the run's ring (or pin it), then prune the ring."""
    if reason not in REASONS:
        raise ValueError(f"unknown checkpoint reason {reason!r}")
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, int(state["babysitter"]["step"]), reason, pinned=pinned)
    write_atomic(path, state)
    if pinned and reason == "best":  # only one best model is worth keeping
        for old in list_checkpoints(run_dir):
            if old.pinned and old.reason == "best" and old.path != path:
                old.path.unlink(missing_ok=True)
    ring = [c for c in list_checkpoints(run_dir) if not c.pinned]
    for old in ring[:-keep] if keep > 0 else ring:
        old.path.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore(state: dict[str, Any], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, *, rank: int = 0,
            world_size: int = 1) -> dict[str, Any]:
    """Put an in-memory checkpoint back into ``model`` / ``optimizer`` and the RNG: ``rank``'s
    own generators where the checkpoint kept every rank's, else rank 0's (the CUDA generators
    then on rank 0 only: rank 0's devices are no other rank's)."""
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rank_rng_state(state, rank, world_size)
    return state["babysitter"]
