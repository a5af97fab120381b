"""The exponential moving average both the divergence guard and the dashboard's smoothing use.

``s_t = β·s_{t−1} + (1−β)·x_t`` from ``s_{−1} = start`` (a first-order IIR filter; the
debiasing by ``1 − β^t`` is the caller's, Kingma & Ba 2015, §3). Computed in C by pandas'
``ewm(adjust=False)``, which runs exactly this recurrence on a series that begins with
``start`` (pandas is already loaded wherever this runs: Streamlit's tables, scikit-learn's
data sets). Not SciPy's ``lfilter``: importing ``scipy.signal`` costs ~0.7 s at the start of
every trainer and of the dashboard's first page, for one filter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def exponential_moving_average(x: np.ndarray, beta: float, start: float = 0.0) -> np.ndarray:
    """The EMA of finite values ``x`` with weight ``beta`` in [0, 1), from state ``start``."""
    if x.size == 0:
        return np.empty(0)
    series = pd.Series(np.concatenate([[start], np.asarray(x, dtype=float)]))
    return series.ewm(alpha=1.0 - beta, adjust=False).mean().to_numpy(copy=True)[1:]
