"""Panels whose content is built only while they are open: ``with folding(label, key) as open_``.

A plain ``st.expander`` is built and sent at every run of the script even while collapsed, and
the browser renders the hidden content too: a dataframe, a chart frame, a form of eight
widgets. Building the run view's collapsed panels (the new-run form, the export, the LR range
test, the runs table, the decay, the interventions) only while open took the first view of a
paused run in a warm Chromium from 1,716 to 1,364 ms (medians of 8 interleaved rounds, the
measure of `benchmarks/page.py`), and the runs table no longer reads every run's store every
5 s while nobody looks at it.

Streamlit (since 1.55) tracks an expander's state when it has an ``on_change``: opening one
re-runs the script (or the fragment holding it), which then builds the content. But it knows
the expander by its label (and its initial state) as well as its key, so a label that changes
(the decay shape in force, the count of interventions) would be a new expander, closed again.
So the panel's state is kept under ``key`` in ``st.session_state`` by the page itself (written
when the person opens or closes it, or by the page, e.g. when a new result arrives), and
written into the expander's own widget state (``key + WIDGET_SUFFIX``) before each build: a
value set through the Session State API takes precedence over the browser's, and the
expander keeps one identity while it opens and closes. (Passed as its initial state instead,
the state changed the expander's identity at each toggle, and a second click within ~0.1 s,
sent for the identity just left, left a panel drawn open and empty.)

Widgets inside a panel lose their values when it closes (Streamlit drops the state of widgets
not drawn in a run) unless they keep it with ``persist_state="page"`` (Streamlit ≥ 1.59), as
the new-run form, the runs table's filter and the export's format do. (Entries typed into a
form and not yet submitted are the browser's alone, and go when the panel closes.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

WIDGET_SUFFIX = ":expander"


@contextmanager
def folding(label: str, key: str, *, expanded: bool = False, where: Any = st) -> Iterator[bool]:
    """An expander (in ``where``: ``st``, ``st.sidebar`` or a container), entered; yields
    whether it is open, i.e. whether to build its content. ``expanded``: open on first show."""
    is_open = bool(st.session_state.setdefault(key, expanded))
    st.session_state[key + WIDGET_SUFFIX] = is_open  # before the expander: see the module
    with where.expander(label, key=key + WIDGET_SUFFIX, on_change=_toggled, args=(key,)):
        yield is_open


def _toggled(key: str) -> None:
    """The person opened or closed the panel (a callback: runs before the re-run)."""
    st.session_state[key] = bool(st.session_state[key + WIDGET_SUFFIX])
