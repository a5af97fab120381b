"""A plotly chart that keeps the user's zoom, pan and hidden legend entries while new points
arrive: ``stream_chart(figure, key=...)``.

``st.plotly_chart`` re-creates the chart whenever its figure changes, so on a page that
refreshes every second a zoom or a hidden trace lasts one tick. This component draws in one
long-lived iframe: every refresh hands it the new figure and it updates the plot in place
(``Plotly.react``), putting back the ranges the user zoomed or panned to, the legend entries
they hid and the modebar's drag mode. Double-click returns to the figure's own view; with
``follow=True`` a zoomed step axis slides so its right edge stays at the newest step, while
the y zoom stays. The component's value is the x range the user chose (None when none), for
a caller that wants to read detail for that range.

Why ``components.v1.declare_component`` and not ``st.components.v2``: v1 serves a plain
directory (``path=``) with no manifest and no installed-package metadata, so it works the same
from a checkout, ``pip install -e .`` and a wheel; its iframe keeps plotly.js and the CSS
plotly injects away from Streamlit's own page (v2 mounts in the page, and a shadow root hides
plotly's injected styles); and its message protocol (ready / render / set height / set value)
is small enough to speak in plain JavaScript, with no npm and no build step. v2's assets must
be declared in an installed package's ``pyproject.toml``, which here would be the shared
virtual environment's copy of the project, not the checkout being run.

plotly.js is the bundle that ships inside the ``plotly`` Python package
(``plotly/package_data/plotly.min.js``); nothing comes from the network. Where the server
serves the app's static files (``server.enableStaticServing``, which ``panda dashboard`` turns
on) a copy named by its version lies in ``app/static/``, dated 1970: Streamlit sends a static
file with its Last-Modified and no cache lifetime, so the browser keeps it fresh for a tenth
of its age (heuristic freshness, RFC 9111 §4.2.2), years here, which is right for content
that never changes under its versioned name; a cached script keeps the code V8 compiled, and
plotly.js evaluates in ~0.1 s instead of ~1 s from the third page load on (measured in
Chromium with a profile; a component file has no Last-Modified and a ``blob:`` URL is never
code-cached). Otherwise, or when the static file fails to load, it is served from the package
by a second declared component that is never drawn (Streamlit refuses symlinks leading out of
a component's directory), and the frame keeps it in the browser's Cache API under its
version. Refreshes only send the figure.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import plotly
import streamlit as st
from plotly.basedatatypes import BaseFigure
from plotly.utils import PlotlyJSONEncoder
from streamlit.components import v1 as components

log = logging.getLogger(__name__)

FRONTEND = Path(__file__).resolve().parent / "frontend"
PLOTLY_JS_DIR = Path(plotly.__file__).resolve().parent / "package_data"
PLOTLY_JS = "plotly.min.js"
DEFAULT_HEIGHT = 450
INT32 = np.iinfo(np.int32)
# The figure's own arrays, packed as plotly.js typed-array specs (dtype + base64, as plotly.py
# does): ~2.7 bytes per float32 value instead of ~19 characters of JSON text.
ARRAY_KEYS = frozenset({"x", "y"})
CONFIG = {"displaylogo": False, "responsive": True,
          # The component resets on double-click itself (to the figure's ranges, which plotly
          # would not know about after the first draw).
          "doubleClick": False,
          # "reset axes" would go back to the ranges of the first draw, box/lasso select do
          # nothing here; autoscale stays (it resets the axes it is pressed for).
          "modeBarButtonsToRemove": ["select2d", "lasso2d", "resetScale2d"]}

# Streamlit names a component "<declaring module>.<name>" and serves its files at
# /component/<that name>/. The plotly.js URL is relative to the chart's page there; its
# version names the bundle in the browser's Cache API (see stream_chart.js).
PLOTLY_JS_URL = f"../{__name__}.plotly_js/{PLOTLY_JS}?v={plotly.__version__}"
# The app's static files: app/static/, served at /app/static/ (the chart's page is
# /component/<name>/index.html, so two levels up).
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PLOTLY_JS = f"plotly-{plotly.__version__}.min.js"
STATIC_PLOTLY_JS_URL = f"../../app/static/{STATIC_PLOTLY_JS}"
STALE_TEMP_S = 600.0  # a temporary copy this old was left by a process that died writing it
_chart = None


def _declared():
    """The chart component, declared on first use: inside a script run, which registers it
    with the running server (declared at import, outside one, Streamlit logs a warning)."""
    global _chart
    if _chart is None:
        _chart = components.declare_component("stream_chart", path=str(FRONTEND))
        # Never drawn: only makes Streamlit serve the installed plotly package's bundle.
        components.declare_component("plotly_js", path=str(PLOTLY_JS_DIR))
    return _chart


def _place_static_plotly_js() -> bool:
    """Put this plotly version's bundle in :data:`STATIC_DIR` (once per process): a copy,
    dated 1970 (see the module docstring), written under a temporary name and renamed, so a
    page never reads half a file and dashboards starting together do not collide. Older
    versions' files and dead processes' temporary copies go. False (and the component route
    is used) where the directory cannot be written."""
    target, source = STATIC_DIR / STATIC_PLOTLY_JS, PLOTLY_JS_DIR / PLOTLY_JS
    try:
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return True
        STATIC_DIR.mkdir(exist_ok=True)
        temp = STATIC_DIR / f".{STATIC_PLOTLY_JS}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(source, temp)
            os.utime(temp, (0, 0))
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        for old in [*STATIC_DIR.glob("plotly-*.min.js"), *STATIC_DIR.glob(".plotly-*.tmp")]:
            with contextlib.suppress(OSError):
                if old.name.endswith(".tmp"):
                    if time.time() - old.stat().st_mtime > STALE_TEMP_S:
                        old.unlink()
                elif old.name != STATIC_PLOTLY_JS:
                    old.unlink()
    except OSError as err:
        log.warning("plotly.js served through the component route: cannot write %s: %s",
                    STATIC_DIR, err)
        return False
    return True


@functools.cache
def plotly_js_source() -> tuple[str, bool]:
    """The URL the chart frame loads plotly.js from, and whether it is the static copy (which
    the browser caches with its compiled code) rather than the component route. Decided once
    per process: the server's options do not change while it runs."""
    if st.get_option("server.enableStaticServing") and _place_static_plotly_js():
        return STATIC_PLOTLY_JS_URL, True
    return PLOTLY_JS_URL, False


def _packed(values: Any, key: str) -> Any:
    """A numeric numpy array (or plotly.py's float64 typed-array spec of one) as a compact
    plotly.js typed-array spec; anything else unchanged.

    Integral values (steps) become int32, exact. Other ``y`` values become float32 (7
    significant digits, far finer than a pixel) unless that would overflow; ``x`` stays
    float64 (it may be a timestamp).
    """
    if isinstance(values, dict) and set(values) == {"dtype", "bdata"}:  # plotly.py ≥ 6 packs
        values = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "iuf" or values.ndim != 1:
        return values
    a = values
    finite = np.isfinite(a) if a.dtype.kind == "f" else np.ones(a.shape, bool)
    if finite.all() and a.size and np.all(a == np.round(a)) \
            and INT32.min <= a.min() and a.max() <= INT32.max:
        a, dtype = a.astype("<i4"), "i4"
    elif key == "y" and np.all(np.abs(a[finite]) < np.finfo(np.float32).max):
        a, dtype = a.astype("<f4"), "f4"
    else:
        a, dtype = a.astype("<f8"), "f8"
    return {"dtype": dtype, "bdata": base64.b64encode(a.tobytes()).decode("ascii")}


def figure_json(figure: BaseFigure | dict[str, Any]) -> str:
    """``figure`` as the JSON text the component draws: data and layout, without plotly.py's
    template (~7 kB per refresh; the iframe has plotly.js's own defaults), with ``x``/``y``
    arrays packed (:func:`_packed`)."""
    spec = figure.to_plotly_json() if isinstance(figure, BaseFigure) else figure
    layout = {k: v for k, v in (spec.get("layout") or {}).items() if k != "template"}
    data = [{k: _packed(v, k) if k in ARRAY_KEYS else v for k, v in trace.items()}
            for trace in spec.get("data") or []]
    # PlotlyJSONEncoder: numpy scalars and arrays left in text/markers, NaN as null.
    return json.dumps({"data": data, "layout": layout}, cls=PlotlyJSONEncoder,
                      separators=(",", ":"))


def latest_x(figure: BaseFigure) -> float | None:
    """The largest finite x over the figure's traces (where "follow latest" puts the right
    edge), or None."""
    best = None
    for trace in figure.data:
        x = getattr(trace, "x", None)
        if x is None or len(x) == 0:
            continue
        values = np.asarray(x, dtype=float)
        values = values[np.isfinite(values)]
        if values.size and (best is None or values.max() > best):
            best = float(values.max())
    return best


def stream_chart(figure: BaseFigure | dict[str, Any] | str, *, key: str,
                 height: int | None = None, follow: bool = False,
                 latest: float | None = None, revision: str = "",
                 config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Draw ``figure`` in place of the previous one with the same ``key``, keeping the view.

    ``figure`` may also be the text :func:`figure_json` made of one: a page whose data has not
    changed sends the same text again without rebuilding the figure (the frame then skips the
    draw). ``height``: px (default the figure's own, else :data:`DEFAULT_HEIGHT`). ``follow``: while
    the user has zoomed the x axis, slide it so its right edge is the newest x (``latest``;
    by default the largest x drawn). ``revision``: a new value drops the user's zoom (use it
    when the axes mean something else: another run, a log axis). ``config``: plotly.js
    config, merged over :data:`CONFIG`.

    Returns the component's value: ``{"x_range": [low, high]}`` with the x range the user
    zoomed or panned to (data units, also on a log axis), ``{"x_range": None}`` once reset,
    None before any interaction.
    """
    if height is None:
        if isinstance(figure, str):
            figure = json.loads(figure)
        height = (figure.layout.height if isinstance(figure, BaseFigure)
                  else (figure.get("layout") or {}).get("height")) or DEFAULT_HEIGHT
    if follow and latest is None and isinstance(figure, BaseFigure):
        latest = latest_x(figure)
    text = figure if isinstance(figure, str) else figure_json(figure)
    plotly_js, cacheable = plotly_js_source()
    return _declared()(figure=text, height=int(height), follow=bool(follow),
                  latest=latest, revision=str(revision), config={**CONFIG, **(config or {})},
                  plotly_js=plotly_js, plotly_js_cacheable=cacheable,
                  plotly_js_fallback=PLOTLY_JS_URL, key=key, default=None)
