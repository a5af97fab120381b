"""What the browser tests share: Debian's Chromium, a free port, a server that answers, the
environment of the processes they start, and reading the page (status metrics, the chart).

Importing it skips the importing test module when Debian's ``chromium`` or Playwright is
missing: the browser is never downloaded (no ``playwright install``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

CHROMIUM = shutil.which("chromium")
# Headless, and nothing that phones home: this machine's network is closed, and Chromium's
# background connections would be refused many at a time.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent
CHART_IFRAME = 'iframe[title="app.stream_chart.stream_chart"]'
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_S = 120  # safety nets against a hung test, never performance assertions

if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (`make test` installs it); Playwright's "
                "own browser download is never used", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def wait(predicate, what: str, timeout: float = TIMEOUT_S) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.1, what=what)


def wait_for_knobs(page) -> None:
    """Until the knobs panel is drawn. While a script run replaces the page's elements (the
    first run after the run appears, another run picked), Streamlit keeps the old ones, faded,
    beside the new: the label may be there twice for a moment."""
    page.get_by_text("Learning rate (log scale)").first.wait_for()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def child_env() -> dict[str, str]:
    """One BLAS thread each: trainer, dashboard and browser share two cores on CI."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")]))}


def metric(page, label: str) -> str:
    """The value of the status row's ``st.metric`` called ``label`` ('' before it shows)."""
    return page.evaluate("""(label) => {
        for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
            const l = m.querySelector('[data-testid="stMetricLabel"]');
            const v = m.querySelector('[data-testid="stMetricValue"]');
            if (l && v && l.innerText.trim() === label) return v.innerText.trim();
        }
        return ''; }""", label)


def chart_frames(page) -> list:
    """The frames of the stream_chart components on the page (each chart is an iframe)."""
    frames = [handle.content_frame() for handle in page.query_selector_all(CHART_IFRAME)]
    return [frame for frame in frames if frame is not None]


def plot(page, script: str, trace: str = "train loss") -> Any:
    """Evaluate ``script`` (a function of the plotly div) in the chart that draws ``trace``;
    None while there is none."""
    for frame in chart_frames(page):
        try:
            found = frame.evaluate(f"""() => {{
                const plot = document.querySelector('.js-plotly-plot');
                if (!plot || !plot._fullData
                    || !plot._fullData.some(t => t.name === {json.dumps(trace)})) return null;
                return {{value: ({script})(plot)}}; }}""")
        except sync_api.Error:  # the frame is still loading
            continue
        if found is not None:
            return found["value"]
    return None
