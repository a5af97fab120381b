"""Keeps the dashboard's access token in the browser tab's ``sessionStorage``, so a reload of
the tab does not lock the page again: ``token_keeper(remember=..., forget=...)``.

A v1 component (``declare_component`` with a plain directory and plain JavaScript, like
:mod:`app.stream_chart`) with no visible content. On each page load it offers the token stored
in this tab, once, as its value (``{"token": ..., "offer": ...}``; None when there is none);
``remember`` stores an accepted token, ``forget`` removes it. The token travels only inside the
page's own websocket: never in a URL, never in a log line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamlit.components import v1 as components

FRONTEND = Path(__file__).resolve().parent / "frontend"
_keeper = None


def _declared():
    """Declared on first use, inside a script run (see app.stream_chart)."""
    global _keeper
    if _keeper is None:
        _keeper = components.declare_component("token_keeper", path=str(FRONTEND))
    return _keeper


def token_keeper(*, remember: str | None = None, forget: bool = False,
                 key: str = "token_keeper") -> dict[str, Any] | None:
    """Render the keeper; return the token this tab offered (with its offer id), or None."""
    return _declared()(remember=remember, forget=bool(forget), key=key, default=None)
