"""The exponential moving average both the divergence guard and the dashboard's smoothing use.

``s_t = β·s_{t−1} + (1−β)·x_t`` from ``s_{−1} = start`` (a first-order IIR filter; the
debiasing by ``1 − β^t`` is the caller's, Kingma & Ba 2015, §3). Computed in C by pandas'
``ewm(adjust=False)``, which runs this recurrence on a series that begins with ``start``
(bit for bit for β ≥ 0.5; below, pandas' 1 − (1 − β) differs from β in the last bits).
pandas treats NaN and ±inf as missing and carries the average over them, so both callers
pass finite values only (the guard stops at the first non-finite loss; the chart skips them).

Not SciPy's ``lfilter``: importing ``scipy.signal`` took ~0.7 s at the start of every trainer
and of the dashboard's first page, for one filter; pandas takes ~0.25 s, and the dashboard's
tables and scikit-learn's data sets load it anyway. A call costs ~40 µs (lfilter's ~6): the
flusher makes one a flush.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def exponential_moving_average(x: Sequence[float] | np.ndarray, beta: float,
                               start: float = 0.0) -> np.ndarray:
    """The EMA of finite values ``x`` with weight ``beta`` in [0, 1), from state ``start``."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.empty(0)
    series = pd.Series(np.concatenate([[start], x]))
    return series.ewm(alpha=1.0 - beta, adjust=False).mean().to_numpy(copy=True)[1:]
