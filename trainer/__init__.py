"""Panda: babysit one PyTorch training run from the browser.

The library half of Panda: import :class:`Babysitter` to hook any training loop into a run
store, and :func:`lr_find` to run a learning-rate range test. Nothing here imports Streamlit,
and ``import trainer`` imports no torch: the two names load their modules on first use, so the
``panda`` command starts without loading PyTorch.
"""

from trainer.ranges import KnobError

__all__ = ["Babysitter", "KnobError", "lr_find"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Babysitter":
        from trainer.babysitter import Babysitter

        return Babysitter
    if name == "lr_find":
        from trainer.lr_range.finder import lr_find

        return lr_find
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
