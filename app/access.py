"""Who may change runs: the access token of ``panda dashboard --token``.

With ``$PANDA_TOKEN`` set, every action that changes a run or starts work (knobs and Apply,
Apply suggested LR, LR decay, pause / resume / undo / stop, the LR range test, starting a run)
is refused unless this page session holds that token. The check runs on the server at the
moment of the action (:func:`granted`, called by every callback in :mod:`app.actions`), not only
by disabling widgets: a disabled widget is not a lock, a crafted websocket message can still
press it.

Tokens are compared with :func:`hmac.compare_digest`; a wrong one costs
:data:`WRONG_TOKEN_DELAY_S` and says so. An accepted token is kept in the browser tab's
``sessionStorage`` (:mod:`app.token_keeper`), so a reload stays unlocked; it never appears in a
URL or a log line, and the page never shows it.
"""

from __future__ import annotations

import hmac
import os
import time

import streamlit as st

from app.token_keeper import token_keeper

TOKEN_ENV = "PANDA_TOKEN"
WRONG_TOKEN_DELAY_S = 1.0   # per wrong try, in the session that tried: guessing stays slow
REFUSAL = "Locked: enter the access token (in the sidebar) first. Nothing was sent."
FIELD = "access_token_field"    # the password field's widget key
_HELD = "_access_token"         # the accepted token, server side only
_REMEMBER = "_access_remember"  # an accepted token the keeper should store in the tab
_FORGET = "_access_forget"
_SEEN_OFFER = "_access_seen_offer"
_MESSAGE = "_access_message"


def _delay(seconds: float) -> None:
    """The wait after a wrong token (this session's script thread only; tests replace it)."""
    time.sleep(seconds)


def required() -> bool:
    """Whether this dashboard was started with a token."""
    return bool(os.environ.get(TOKEN_ENV))


def _matches(given: str | None) -> bool:
    expected = os.environ.get(TOKEN_ENV) or ""
    # compare_digest takes as long for a near miss as for a far one (bytes: any characters)
    return bool(given) and bool(expected) and hmac.compare_digest(
        given.encode("utf-8"), expected.encode("utf-8"))


def granted() -> bool:
    """Whether this page session may change runs now (always, without a token)."""
    return not required() or _matches(st.session_state.get(_HELD))


def _try(given: str, *, remember: bool) -> None:
    """Accept ``given`` (and have the tab keep it when ``remember``), or refuse it slowly."""
    state = st.session_state
    if _matches(given):
        state[_HELD] = given
        if remember:
            state[_REMEMBER] = given
        state[_MESSAGE] = ("success", "Unlocked: the knobs and actions work in this tab.")
        return
    _delay(WRONG_TOKEN_DELAY_S)
    state[_MESSAGE] = ("error", "Wrong token: the page stays locked.")
    if not remember:  # a stored token that no longer matches (the server's token changed)
        state[_FORGET] = True


def _entered() -> None:
    """The password field's callback: its value is read once and the field emptied."""
    state = st.session_state
    given = state.get(FIELD) or ""
    state[FIELD] = ""
    if given:
        _try(given, remember=True)


def _lock() -> None:
    state = st.session_state
    state.pop(_HELD, None)
    state[_FORGET] = True
    state[_MESSAGE] = ("info", "Locked: the token is forgotten in this tab.")


def gate() -> bool:
    """The sidebar's token field (only with a token), and whether this session may act.

    Call once per full run, before anything that acts is drawn: the keeper offers the token
    this tab stored (a reload), which unlocks the page without typing it again.
    """
    if not required():
        return True
    state = st.session_state
    offered = token_keeper(remember=state.pop(_REMEMBER, None),
                           forget=state.pop(_FORGET, False))
    if isinstance(offered, dict) and offered.get("offer") != state.get(_SEEN_OFFER):
        state[_SEEN_OFFER] = offered.get("offer")
        if not granted():
            _try(str(offered.get("token") or ""), remember=False)
    with st.sidebar:
        if granted():
            st.button("Lock", key="access_lock", on_click=_lock,
                      help="forget the access token in this tab")
        else:
            st.text_input("Access token", type="password", key=FIELD, on_change=_entered,
                          help="this dashboard was started with --token: knobs and actions "
                               "stay locked until the page is given that token")
        message = state.get(_MESSAGE)
        if message:
            {"success": st.success, "error": st.error}.get(message[0], st.info)(message[1])
    return granted()
