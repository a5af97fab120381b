"""The state of torch's random number generators, to be put back exactly.

The CPU generator's and, once CUDA is in use, every CUDA device's: dropout and ``torch.rand``
on a GPU draw from the device's own generator, not the CPU's, so a resumed GPU run that put
back only the CPU state would draw other dropout masks than the run it continues. Shared by
checkpoints (see :mod:`trainer.checkpoint`) and the LR range test, which leaves the caller's
generators as it found them. The state is a plain dict of tensors, so a checkpoint holding it
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CPU, CUDA = "rng", "cuda_rng"  # keys in a checkpoint ("rng" since Panda 0.1)


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
