"""The runs table: every run in the runs directory (or PostgreSQL database) with its state, step,
best validation loss, LR now, start time and tags; sortable (click a column), filterable (words
to match), and a click on a row opens that run.

Tags say where a run comes from: its task, "branch of PARENT" for a branch, and any ``tags``
list a launcher wrote into the run's meta. The best validation loss is read incrementally (only
the validation rows this session has not seen), so a refresh costs a few small queries per run.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import streamlit as st

from app.folding import folding
from trainer.store import StoreError
from trainer.store.address import list_runs, open_store, run_address

RUNS_REFRESH_S = 5.0     # states and steps of the other runs: a slower refresh is enough
TABLE_KEY = "runs_table"
FILTER_KEY = "runs_filter"
OPEN_KEY = "runs_open_run"   # a run clicked in the table, for the picker on the next page run
PICKER_KEY = "run_picker"    # the sidebar's run picker (app/main.py)
PANEL_KEY = "runs_table_open"  # the table's panel is open (app.folding)


def _best_and_tags(address: str, cache: dict[str, Any]) -> tuple[float | None, list[str]]:
    """The run's lowest finite validation loss so far and its tags (``cache``: per run)."""
    seen = cache.setdefault(address, {"last_val": 0, "best": None})
    try:
        with open_store(address) as store:
            meta = store.meta()
            for row in store.validation_since(seen["last_val"]):
                seen["last_val"] = row["id"]
                value = row["value"]
                if row["name"] == "loss" and value is not None and math.isfinite(value) and (
                        seen["best"] is None or value < seen["best"]):
                    seen["best"] = value
    except (StoreError, ValueError):
        return seen["best"], []
    tags = [str(meta["task"])] if meta.get("task") else []
    parent = (meta.get("parent") or {}).get("run")
    if parent:
        tags.append(f"branch of {parent}")
    tags += [str(t) for t in meta.get("tags") or [] if str(t) not in tags]
    return seen["best"], tags


def run_rows(root: str, runs: list[dict[str, Any]], cache: dict[str, Any]
             ) -> list[dict[str, Any]]:
    """One row per run (``runs``: :func:`trainer.store.address.list_runs`'s summaries)."""
    rows = []
    for run in runs:
        best, tags = _best_and_tags(run_address(root, run["run"]), cache)
        created = run.get("created")
        rows.append({"run": run["run"], "state": run["state"], "step": run.get("step"),
                     "best val loss": best, "LR now": run.get("lr"),
                     "started": dt.datetime.fromtimestamp(created) if created else None,
                     "tags": ", ".join(tags)})
    return rows


def matches(row: dict[str, Any], words: str) -> bool:
    """Whether every word of the filter is in the row's name, state or tags (any case)."""
    text = " ".join(str(row[k]) for k in ("run", "state", "tags")).lower()
    return all(word in text for word in words.lower().split())


def _opened() -> None:
    """A click on a row: that run is asked for; the whole page opens it
    (:func:`open_clicked_run`)."""
    state = st.session_state
    rows = state.get("_runs_table_rows") or []
    picked = ((state.get(TABLE_KEY) or {}).get("selection") or {}).get("rows") or []
    if picked and picked[0] < len(rows):
        state[OPEN_KEY] = rows[picked[0]]["run"]


def open_clicked_run() -> None:
    """Call before the run picker is drawn: a run clicked in the table becomes the picked run.
    (Setting the picker from the table's callback, in the table's fragment, loses to the
    browser's own value of the picker, which every later request carries.)"""
    run = st.session_state.pop(OPEN_KEY, None)
    if run:
        st.session_state[PICKER_KEY] = run


@st.fragment(run_every=RUNS_REFRESH_S)
def runs_table(root: str) -> None:
    """The table, in an expander below the run on show."""
    if st.session_state.get(OPEN_KEY):
        st.rerun(scope="app")  # a row was clicked: the whole page opens its run
    with folding("Runs", PANEL_KEY) as open_:
        if not open_:  # nothing read while nobody looks
            return
        try:
            runs = [r for r in list_runs(root) if r.get("state") != "unreadable"]
        except StoreError as err:
            st.error(str(err))
            return
        rows = run_rows(root, runs, st.session_state.setdefault("runs_best", {}))
        words = st.text_input("filter", key=FILTER_KEY, persist_state="page",  # app.folding
                              placeholder="filter: words in the name, state or tags (e.g. "
                              "paused charlm)", label_visibility="collapsed")
        shown = [r for r in rows if matches(r, words or "")]
        st.session_state["_runs_table_rows"] = shown
        st.caption(f"{len(shown)} of {len(rows)} runs · click a column to sort, a row to "
                   "open the run")
        st.dataframe(shown, key=TABLE_KEY, on_select=_opened, selection_mode="single-row",
                     hide_index=True, width="stretch", column_config={
                         "step": st.column_config.NumberColumn(format="localized"),
                         "best val loss": st.column_config.NumberColumn(format="%.4g"),
                         "LR now": st.column_config.NumberColumn(format="%.2e"),
                         "started": st.column_config.DatetimeColumn(
                             format="YYYY-MM-DD HH:mm")})
