"""Caviar mode on Optuna: many trials in parallel, random search, coarse to fine, keep the best;
every trial a babysat Panda run that a person can watch and steer.

* :mod:`~trainer.search.space`: the search space on the literature's scales, CLI ranges;
* :mod:`~trainer.search.rounds`: coarse to fine (pure functions);
* :mod:`~trainer.search.config`: one search's settings (stored in the study);
* :mod:`~trainer.search.study`: the Optuna study: storage beside the runs, rounds, cut trials;
* :mod:`~trainer.search.worker`: the trial process: each trial a run, reported to Optuna;
* :mod:`~trainer.search.api`: :func:`search`; :mod:`~trainer.search.cli`: ``panda search``.

Optuna is an extra (``pip install 'panda-babysitter[search]'``): importing this package does
not import it; :func:`search` does.
"""

from trainer.search.config import SearchConfig
from trainer.search.space import SearchSpace, SpaceError

__all__ = ["SearchConfig", "SearchSpace", "SpaceError", "search"]


def __getattr__(name: str):
    # search() needs Optuna; imported on first use so `panda --help` and the dashboard work
    # without the extra.
    if name == "search":
        from trainer.search.api import search

        return search
    raise AttributeError(f"module 'trainer.search' has no attribute {name!r}")
