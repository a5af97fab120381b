"""Rolling checkpoints: snapshot in memory on the training thread, write atomically elsewhere.

A checkpoint holds the model and optimizer state, the Babysitter's knob state and step, and the
RNG state, so a resumed run continues exactly where the checkpoint was taken. Files are written
to a temporary name, fsynced and renamed (POSIX ``rename`` is atomic), so a kill -9 during a
write leaves the previous checkpoint intact. Loading uses ``torch.load(weights_only=True)``:
a checkpoint can never execute code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def path_in(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


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
             babysitter_state: dict[str, Any]) -> dict[str, Any]:
    """An in-memory, CPU-side copy of everything a resume needs."""
    return {
        "model": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "babysitter": _cpu_copy(babysitter_state),
        "rng": torch.get_rng_state(),
    }


def write(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename, fsync directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_into(path: str | os.PathLike, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``), restore the RNG; return its
    Babysitter state."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["babysitter"]
