"""``panda dashboard --token``: without the token no action changes a run or starts work.

The page draws the controls disabled, but a disabled widget is not a lock: these tests press
every one of them anyway (AppTest sends the click as a crafted websocket message would) and
check that the store received no command, no result and no new run. Then the right token
unlocks the page, and a wrong one is refused slowly, with a message.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from helpers import APP, knob_widget, open_panels
from streamlit.testing.v1 import AppTest

from app import access
from app.controls import key
from app.panels import DECAY_PANEL, NEW_RUN_PANEL
from trainer.store import SqliteStore

APP_TIMEOUT_S = 60
TOKEN = "s3cret-token"
ACTION_BUTTONS = ("apply", "half", "double", "pause", "resume", "rollback", "stop",
                  "apply_decay")


@pytest.fixture
def locked_page(make_run, tmp_path, monkeypatch):
    run_dir = make_run()
    with SqliteStore(run_dir) as store:  # a finished range test: "Apply suggested LR" shows
        result = store.add_result("lr_find", {"lrs": [1e-4, 1e-2, 1.0],
                                              "losses": [2.0, 1.0, 9.0],
                                              "smoothed_losses": [2.0, 1.0, 9.0],
                                              "suggested_lr": 8.3, "suggestion_range": [1, 9]})
    monkeypatch.setenv("PANDA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PANDA_TOKEN", TOKEN)
    slept = []
    monkeypatch.setattr(access, "_delay", slept.append)
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception, at.exception
    open_panels(at, NEW_RUN_PANEL, key("live", DECAY_PANEL))  # their buttons are checked too
    return at, run_dir, result, slept


def _anyway(widget):
    """``widget`` as a crafted websocket message can use it: AppTest, like the browser, will
    not touch a disabled widget, but the server has no such rule (hence the checks in the
    callbacks, which this exercises)."""
    widget.proto.disabled = False
    return widget


def _nothing_happened(run_dir: Path, result_id: int) -> None:
    with SqliteStore(run_dir) as store:
        assert store.commands() == []
        assert [r["id"] for r in store.results()] == [result_id]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]


def _action_buttons(result_id: int) -> list[str]:
    return [key("live", name) for name in ACTION_BUTTONS] + [
        f"lrfind_apply_live_{result_id}", "lrfind_start_live",
        "FormSubmitter:new_run-Start training"]


def test_without_the_token_every_action_is_disabled_and_inert(locked_page):
    at, run_dir, result, _ = locked_page
    buttons = _action_buttons(result)
    for name in buttons:
        assert at.button(key=name).disabled, name
    assert knob_widget(at, "lr").disabled
    assert knob_widget(at, "exact").disabled
    at.text_input(key="new_name").input("sneaky")
    _anyway(knob_widget(at, "lr")).set_value(0.1)
    for name in buttons:  # pressed anyway, as a crafted message would
        _anyway(at.button(key=name)).click().run()
        assert not at.exception, (name, at.exception)
    _nothing_happened(run_dir, result)


def test_the_token_is_checked_when_the_action_runs(locked_page):
    """Controls drawn enabled (the token was given) whose session no longer holds a matching
    token: each callback refuses, with the message, and nothing reaches the store."""
    at, run_dir, result, _ = locked_page
    at.text_input(key=access.FIELD).input(TOKEN).run()
    buttons = [b for b in _action_buttons(result) if not at.button(key=b).disabled]
    assert len(buttons) >= 6, buttons  # the run's state leaves a few disabled (Resume …)
    at.text_input(key="new_name").input("sneaky")
    for name in buttons:
        at.session_state[access._HELD] = TOKEN
        at.run()  # drawn unlocked …
        knob_widget(at, "lr").set_value(0.1)
        at.session_state[access._HELD] = "a token that no longer matches"  # … then not
        at.button(key=name).click().run()
        assert not at.exception, (name, at.exception)
        if name.startswith("FormSubmitter"):
            assert any(access.REFUSAL in e.value for e in at.error), name
        else:
            assert access.REFUSAL in at.session_state["outcome:live"].text, name
    _nothing_happened(run_dir, result)


def test_the_right_token_unlocks_and_a_wrong_one_is_refused_slowly(locked_page):
    at, run_dir, result, slept = locked_page
    at.text_input(key=access.FIELD).input("not-it").run()
    assert any("Wrong token" in e.value for e in at.error)
    assert slept == [access.WRONG_TOKEN_DELAY_S]
    assert at.button(key=key("live", "apply")).disabled
    _nothing_happened(run_dir, result)
    at.text_input(key=access.FIELD).input(TOKEN).run()
    assert access.FIELD not in [t.key for t in at.text_input]  # unlocked: Lock instead
    assert TOKEN not in [t.value for t in at.text_input]  # read once, kept in no field
    assert not at.button(key=key("live", "pause")).disabled
    at.button(key=key("live", "pause")).click().run()
    with SqliteStore(run_dir) as store:
        assert [c.kind for c in store.commands()] == ["pause"]
    at.button(key="access_lock").click().run()  # Lock: the token is forgotten again
    assert at.button(key=key("live", "stop")).disabled
    _anyway(at.button(key=key("live", "stop"))).click().run()
    with SqliteStore(run_dir) as store:
        assert [c.kind for c in store.commands()] == ["pause"]


def test_tokens_are_compared_in_constant_time(monkeypatch):
    compared, compare = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    monkeypatch.setenv("PANDA_TOKEN", TOKEN)
    assert access._matches(TOKEN) and not access._matches("x") and not access._matches("")
    assert compared == [(TOKEN.encode(), TOKEN.encode()), (b"x", TOKEN.encode())]
    monkeypatch.delenv("PANDA_TOKEN")
    assert not access.required()
