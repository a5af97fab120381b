"""The study view: all the trials of a search (``panda search``) around the run being watched.

Shown below a run that belongs to a study (its meta names the study and trial): a table of the
trials (click one to open it for babysitting), validation loss against the LR on a log axis
coloured by 1−β, parallel coordinates over every searched setting, and the best trial's curve
over the others. It reads the Optuna study (Optuna is imported only here, and only when such a
run is shown) about every two seconds; 200 trials take a few tens of milliseconds (README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from app.stream_chart import stream_chart
from trainer.store import StoreError
from trainer.store.address import open_store, run_address

REFRESH_S = 2.0   # the study view re-reads its trials this often
OUTCOME_SYMBOLS = {"complete": "circle", "pruned": "triangle-down", "diverged": "x",
                   "stopped": "square", "running": "circle-open", "failed": "x-thin"}
BEST_COLOR, OTHER_COLOR = "#d62728", "rgba(120, 120, 120, 0.35)"
PICKER_KEY = "run_picker"   # the sidebar's run picker (app/main.py)
OPEN_KEY = "study_open_run"  # a trial clicked in the table, for the picker on the next run
TABLE_KEY = "study_trials"
FIGURE_HEIGHT = 380
TABLE_COLUMNS = ("trial", "round", "state", "manual", "best val loss", "epoch", "lr", "β",
                 "weight decay", "batch", "hidden", "decay", "pruned at", "why", "run")


def open_clicked_trial() -> None:
    """Call before the run picker is drawn: a trial clicked in the study table becomes the
    picked run. (Setting the picker's value from the table's callback instead, in a fragment
    re-run, loses to the browser's stale value of the picker now and then.)"""
    run = st.session_state.pop(OPEN_KEY, None)
    if run:
        st.session_state[PICKER_KEY] = run


def study_section(root: str, meta: dict[str, Any]) -> None:
    """The study of the run whose ``meta`` is given, if it belongs to one (else nothing)."""
    name = meta.get("study")
    if not name:
        return
    st.divider()
    study_view(root, str(name), str(meta.get("name", "")))


@st.cache_resource(show_spinner=False, max_entries=8)
def _storage(root: str, name: str):
    from trainer.search.study import open_storage

    return open_storage(root, name, writer=False)


@st.cache_data(ttl=REFRESH_S, show_spinner=False, max_entries=8)
def load_study(root: str, name: str) -> dict[str, Any]:
    """The study's trials as plain records, its rounds and config (cached ~one refresh)."""
    import optuna

    from trainer.search.study import (
        LR_RANGE_ATTR,
        best_trial,
        config_of,
        round_plans,
        trial_records,
    )

    study = optuna.load_study(study_name=name, storage=_storage(root, name))
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials)
    cfg = config_of(study)
    return {"records": trial_records(trials), "rounds": round_plans(study),
            "best": None if best is None else best.number, "task": cfg.task,
            "trials": cfg.trials, "searched": cfg.space.searched(),
            "lr_range": study.user_attrs.get(LR_RANGE_ATTR)}


def _live_states(root: str, records: list[dict[str, Any]]) -> None:
    """A running trial's run may be paused or diverged: show the run's own state."""
    for record in records:
        if record["outcome"] == "running" and record["run"]:
            try:
                with open_store(run_address(root, record["run"])) as store:
                    state = store.summary()["state"]
            except (StoreError, ValueError):
                continue
            if state != "running":
                record["outcome"] = f"running ({state})"


@st.fragment(run_every=REFRESH_S)
def study_view(root: str, name: str, current: str) -> None:
    """Header, rounds, then the table and the three plots in tabs."""
    if st.session_state.get(OPEN_KEY) not in (None, current):
        st.rerun(scope="app")  # a trial was clicked: the whole page opens it
    try:
        data = load_study(root, name)
    except Exception as err:  # Optuna missing, the study file gone, the database down
        st.warning(f"Study {name}: cannot read it ({type(err).__name__}: {err})")
        return
    records = [dict(r) for r in data["records"]]
    _live_states(root, records)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    best = next((r for r in records if r["trial"] == data["best"]), None)
    st.markdown(f"#### Study {name}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    best_text = ("" if best is None else
                 f" · best: trial {best['trial']}, val loss {best['best']:.4g}")
    st.caption(f"{data['task'] or 'custom objective'} · {data['trials']} trials: {summary}"
               f"{best_text}")
    for line in _round_lines(data):
        st.caption(line)
    table, versus_lr, coordinates, curves = st.tabs(
        ["Trials", "Loss vs LR", "All settings", "Curves"])
    with table:
        _trial_table(records, current)
    with versus_lr:
        stream_chart(loss_vs_lr_figure(records, data["rounds"]), key="study_lr")
    with coordinates:
        stream_chart(coordinates_figure(records, data["searched"]), key="study_coords")
    with curves:
        stream_chart(curves_figure(records, data["best"]), key="study_curves")


def _round_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    if data.get("lr_range"):
        lines.append(f"LR range: {data['lr_range']['why']}")
    for record in data["rounds"][1:]:
        box = ", ".join(f"{_label(k)} [{lo:.3g}, {hi:.3g}]"
                        for k, (lo, hi) in record["box"].items())
        lines.append(f"Round {record['round']}: {box} — {record['why']}")
    return lines


def _label(param: str) -> str:
    return {"one_minus_beta": "1−β", "weight_decay": "weight decay", "lr": "lr"}.get(param,
                                                                                     param)


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials table, newest first."""
    rows = []
    for r in sorted(records, key=lambda r: -r["trial"]):
        rows.append({
            "trial": r["trial"], "round": r["round"], "state": r["outcome"],
            "lr": _sci(r["lr"]), "β": None if r["momentum"] is None else f"{r['momentum']:.4g}",
            "weight decay": _sci(r["weight_decay"]), "batch": r["batch_size"],
            "hidden": r["hidden"], "decay": r["decay"],
            "best val loss": None if r["best"] is None else float(f"{r['best']:.4g}"),
            "epoch": r["epoch"], "pruned at": r["pruned_at"],
            "why": (r["reason"] or "") + (f" (re-run of #{r['rerun_of']})"
                                          if r["rerun_of"] is not None else ""),
            "manual": "yes" if r["manual"] else "", "run": r["run"]})
    return rows


def _sci(value: float | None) -> str | None:
    if value is None:
        return None
    return "0" if value == 0 else f"{value:.2e}"


def _trial_table(records: list[dict[str, Any]], current: str) -> None:
    rows = table_rows(records)
    st.caption("Click a row to open that trial's run (knobs, pause, stop, rollback, branch, "
               "export all work on it).")
    st.dataframe(rows, key=TABLE_KEY, on_select=_open_selected, selection_mode="single-row",
                 hide_index=True, width="stretch", height=min(420, 38 + 35 * len(rows)),
                 column_order=TABLE_COLUMNS)
    st.session_state["study_table_runs"] = [row["run"] for row in rows]


def _open_selected() -> None:
    """Clicked row → its run, opened on the next whole-page run (:func:`open_clicked_trial`)."""
    rows = st.session_state.get(TABLE_KEY, {}).get("selection", {}).get("rows") or []
    runs = st.session_state.get("study_table_runs") or []
    if rows and rows[0] < len(runs) and runs[rows[0]]:
        st.session_state[OPEN_KEY] = runs[rows[0]]


# --- figures (pure: records in, figures out) -----------------------------------------------------

def loss_vs_lr_figure(records: Sequence[dict[str, Any]],
                      rounds: Sequence[dict[str, Any]] = ()) -> go.Figure:
    """Best validation loss against the LR (log x), coloured by log10(1−β); a diverged trial
    sits on the top edge; each later round's LR box is shaded."""
    scored = [r for r in records if r["lr"] is not None]
    finite = [r["best"] for r in scored if r["best"] is not None]
    top = max(finite) * 1.5 if finite else 1.0
    figure = go.Figure()
    for outcome, symbol in OUTCOME_SYMBOLS.items():
        group = [r for r in scored if r["outcome"].split(" ")[0] == outcome]
        if not group:
            continue
        figure.add_trace(go.Scatter(
            x=[r["lr"] for r in group], y=[r["best"] if r["best"] is not None else top
                                           for r in group],
            mode="markers", name=outcome, text=[_hover(r) for r in group],
            hovertemplate="%{text}<extra></extra>", customdata=[r["run"] for r in group],
            marker={"symbol": symbol, "size": 10, "line": {"width": 1},
                    "color": [_log10(r["one_minus_beta"]) for r in group],
                    "colorscale": "Viridis", "cmin": -3, "cmax": -1,
                    "colorbar": {"title": "1−β", "tickvals": [-3, -2, -1],
                                 "ticktext": ["1e-3", "1e-2", "1e-1"]}}))
    for record in rounds[1:]:
        low_high = record["box"].get("lr")
        if low_high:
            figure.add_vrect(x0=low_high[0], x1=low_high[1], fillcolor="rgba(46,125,50,0.08)",
                             line_width=0, annotation_text=f"round {record['round']}",
                             annotation_position="top left")
    log_y = len(finite) > 1 and min(finite) > 0 and max(finite) / min(finite) > 30
    figure.update_layout(height=FIGURE_HEIGHT, margin={"t": 30, "b": 40, "l": 60, "r": 20},
                         xaxis={"type": "log", "title": "learning rate"},
                         yaxis={"type": "log" if log_y else "linear",
                                "title": "best validation loss"},
                         legend={"orientation": "h", "y": 1.12})
    return figure


def _hover(r: dict[str, Any]) -> str:
    best = "–" if r["best"] is None else f"{r['best']:.4g}"
    beta = "–" if r["momentum"] is None else f"{r['momentum']:.4g}"
    return (f"trial {r['trial']} ({r['outcome']}): val {best}<br>lr {_sci(r['lr'])}, β {beta}, "
            f"wd {_sci(r['weight_decay'])}, batch {r['batch_size']}"
            + (f"<br>{r['reason']}" if r["reason"] else ""))


def _log10(value: float | None) -> float:
    return math.log10(value) if value and value > 0 else float("nan")


def coordinates_figure(records: Sequence[dict[str, Any]],
                       searched: Sequence[str]) -> go.Figure:
    """Parallel coordinates over every searched setting (log scales as log10) and the best
    validation loss, coloured by it: the trials that reached a validation loss."""
    rows = [r for r in records if r["best"] is not None]
    dims = []
    wd_floor = min((_log10(r["weight_decay"]) for r in rows if r["weight_decay"]),
                   default=-5.0) - 1.0
    for name in searched:
        if name == "lr":
            dims.append({"label": "log10 lr", "values": [_log10(r["lr"]) for r in rows]})
        elif name == "momentum":
            dims.append({"label": "log10(1−β)",
                         "values": [_log10(r["one_minus_beta"]) for r in rows]})
        elif name == "weight_decay":  # 0 sits one decade below the smallest non-zero value
            dims.append({"label": "log10 wd (bottom: 0)", "values": [
                _log10(r["weight_decay"]) if r["weight_decay"] else wd_floor for r in rows]})
        elif name == "decay":
            shapes = sorted({r["decay"] for r in rows if r["decay"]})
            dims.append({"label": "decay", "tickvals": list(range(len(shapes))),
                         "ticktext": shapes,
                         "values": [shapes.index(r["decay"]) if r["decay"] in shapes else None
                                    for r in rows]})
        else:
            dims.append({"label": name, "values": [r[name] for r in rows]})
    losses = [r["best"] for r in rows]
    dims.append({"label": "best val loss", "values": losses})
    figure = go.Figure(go.Parcoords(
        dimensions=dims, line={"color": losses, "colorscale": "Viridis_r", "showscale": True}))
    figure.update_layout(height=FIGURE_HEIGHT, margin={"t": 50, "b": 30, "l": 60, "r": 60})
    return figure


def curves_figure(records: Sequence[dict[str, Any]], best: int | None) -> go.Figure:
    """Validation loss per epoch: every trial faint in one trace (gaps between trials), the
    best trial on top."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    best_record = None
    for r in records:
        if r["trial"] == best:
            best_record = r
            continue
        if r["curve"]:
            xs += [*range(1, len(r["curve"]) + 1), None]
            ys += [*r["curve"], None]
    figure = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", name="other trials",
                                  line={"color": OTHER_COLOR, "width": 1}, hoverinfo="skip"))
    if best_record is not None and best_record["curve"]:
        curve = best_record["curve"]
        figure.add_trace(go.Scatter(x=list(range(1, len(curve) + 1)), y=curve,
                                    mode="lines+markers", name=f"best: trial {best}",
                                    line={"color": BEST_COLOR, "width": 3}))
    finite = [y for y in ys if y is not None and math.isfinite(y)]
    log_y = len(finite) > 1 and min(finite) > 0 and max(finite) / min(finite) > 30
    figure.update_layout(height=FIGURE_HEIGHT, margin={"t": 30, "b": 40, "l": 60, "r": 20},
                         xaxis={"title": "epoch", "dtick": 1},
                         yaxis={"title": "validation loss", "type": "log" if log_y else "linear"},
                         legend={"orientation": "h", "y": 1.12})
    return figure
