"""The state of torch's random number generators, to be put back exactly.

The CPU generator's and, once CUDA is in use, every CUDA device's: dropout and ``torch.rand``
on a GPU draw from the device's own generator, not the CPU's, so a resumed GPU run that put
back only the CPU state would draw other dropout masks than the run it continues. Shared by
checkpoints (see :mod:`trainer.checkpoint`) and the LR range test, which leaves the caller's
generators as it found them. The state is a plain dict of tensors, so a checkpoint holding it
loads with ``torch.load(..., weights_only=True)``.

Under DDP every rank draws its own numbers (dropout masks, ``torch.rand``), so a checkpoint that
rank 0 writes also keeps every rank's state, in rank order (:data:`RANKS`), and each rank puts
back its own; the top-level keys stay rank 0's, which older Panda and single processes read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CPU, CUDA = "rng", "cuda_rng"  # keys in a checkpoint ("rng" since Panda 0.1)
RANKS = "rank_rng"             # under DDP: a list of every rank's rng_state(), in rank order


def rng_state() -> dict[str, Any]:
    """The generators' state now; CUDA's only where CUDA was used (asking would start it)."""
    state: dict[str, Any] = {CPU: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[CUDA] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], *, cuda: bool = True) -> None:
    """Put back what :func:`rng_state` took: the CPU generator's state, and the CUDA
    generators' (unless ``cuda`` is False) where the state has them and CUDA is here. A state
    taken on another number of CUDA devices leaves the CUDA generators as they are, and says
    so; a state from before Panda kept them (only ``"rng"``) puts back the CPU's alone."""
    torch.set_rng_state(state[CPU])
    devices = state.get(CUDA)
    if not cuda or devices is None or not torch.cuda.is_available():
        return
    if len(devices) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(devices)
    else:
        log.warning("the random state was saved on %d CUDA devices and this process sees %d: "
                    "the CUDA generators are not restored (dropout draws other masks)",
                    len(devices), torch.cuda.device_count())


def set_rank_rng_state(state: dict[str, Any], rank: int, world_size: int) -> None:
    """Put back this rank's generators: its own where the checkpoint kept every rank's (its
    CUDA generators too: they are its own), else rank 0's as :func:`set_rng_state` does (the
    CUDA ones on rank 0 only: rank 0's devices are no other rank's). A checkpoint of another
    number of ranks cannot say which state is whose: every rank takes rank 0's, and the log
    says so."""
    ranks = state.get(RANKS)
    if ranks is not None and len(ranks) == world_size:
        set_rng_state(ranks[rank])
        return
    if ranks is not None:
        log.warning("the random state was saved by %d ranks and this job has %d: every rank "
                    "takes rank 0's (ranks draw the same dropout masks)", len(ranks), world_size)
    set_rng_state(state, cuda=rank == 0)
