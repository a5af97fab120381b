"""Where runs live: SQLite files under a runs directory (the default) or a PostgreSQL database.

A *store root* is one of the two: a directory (``runs``) or a PostgreSQL URL
(``postgresql://user@host/db``, from ``--store`` or ``$PANDA_STORE``). A run's *address* is
what :func:`open_store` opens: its directory for SQLite, ``<url>#<name>`` for PostgreSQL. The
dashboard, the CLI and LR-finder jobs pass addresses around, so none of them needs to know
which backend holds a run. Checkpoints are files either way: they stay in the trainer's run
directory (``--runs-dir``/name) on the trainer's host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.store.base import RunStore, StoreError, sanitize_run_name
from trainer.store.postgres import PostgresStore, redact, summaries
from trainer.store.sqlite import DB_NAME, SqliteStore

STORE_ENV = "PANDA_STORE"
SERVER_SCHEMES = ("postgresql://", "postgres://")


def is_server_url(text: str | os.PathLike | None) -> bool:
    """Whether ``text`` names a PostgreSQL store (or a run in one) rather than a path."""
    return isinstance(text, str) and text.startswith(SERVER_SCHEMES)


def store_url(explicit: str | None = None) -> str | None:
    """The PostgreSQL URL to use: ``explicit``, else ``$PANDA_STORE``, else None (SQLite).

    Raises ValueError for anything that is not a ``postgresql://`` URL.
    """
    url = explicit if explicit is not None else os.environ.get(STORE_ENV) or None
    if url is not None and not is_server_url(url):
        raise ValueError(f"the store must be a postgresql:// URL, not {url!r} (leave it out to "
                         "keep runs as SQLite files under --runs-dir)")
    return url


def child_env(store: str | None) -> dict[str, str]:
    """The environment for a Panda process that must use PostgreSQL URL ``store`` (None:
    SQLite). The URL travels there rather than in argv, so ``ps`` never shows a password."""
    env = {key: value for key, value in os.environ.items() if key != STORE_ENV}
    if store is not None:
        env[STORE_ENV] = store
    return env


def shown(root: str | os.PathLike) -> str:
    """A store root as the user may see it (a URL's password hidden)."""
    return redact(root) if is_server_url(root) else os.fspath(root)


def run_address(root: str | os.PathLike, name: str) -> str:
    """The address of run ``name`` under store root ``root`` (a runs directory or a URL)."""
    if is_server_url(root):
        return f"{root}#{sanitize_run_name(name)}"
    return str(Path(root) / sanitize_run_name(name))


def root_of(address: str | os.PathLike) -> str:
    """The store root that holds the run at ``address``."""
    if is_server_url(address):
        return str(address).rpartition("#")[0]
    return str(Path(address).parent)


def open_store(address: str | os.PathLike, *, create: bool = False,
               run_dir: str | os.PathLike | None = None, per_thread: bool = True) -> RunStore:
    """Open the run at ``address`` (see the module docstring).

    ``run_dir`` and ``per_thread`` only matter for PostgreSQL: where this process keeps the
    run's checkpoints, and whether each thread gets a connection of its own (see
    :class:`~trainer.store.postgres.PostgresStore`).
    """
    if not is_server_url(address):
        return SqliteStore(address, create=create)
    url, sep, name = str(address).rpartition("#")
    if not sep:
        raise StoreError(f"a run address in PostgreSQL needs '#<run name>' at its end: {address}")
    return PostgresStore(url, name, create=create, run_dir=run_dir, per_thread=per_thread)


def run_exists(root: str | os.PathLike, name: str) -> bool:
    """Whether store root ``root`` holds a run called ``name``."""
    try:
        open_store(run_address(root, name)).close()
    except StoreError:
        return False
    return True


def store_for(run_dir: str | os.PathLike, store: str | None = None, *,
              create: bool = False) -> RunStore:
    """The store of the run a trainer keeps in ``run_dir``: its SQLite file there, or the run
    named like ``run_dir`` at PostgreSQL URL ``store`` (checkpoints stay in ``run_dir``)."""
    run_dir = Path(run_dir)
    if store is None:
        return SqliteStore(run_dir, create=create)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return open_store(run_address(store, run_dir.name), create=create, run_dir=run_dir)


def resolve_run(spec: str | os.PathLike, runs_dir: str | os.PathLike = "runs", *,
                must_exist: bool = True) -> Path:
    """Turn a RUN argument into a SQLite run directory.

    ``spec`` is either a path to a run directory (anything containing a path separator, or an
    existing directory holding ``run.db``) or a bare run name under ``runs_dir``.
    """
    text = os.fspath(spec)
    as_path = Path(text)
    if os.sep in text or "/" in text or (as_path / DB_NAME).exists():
        run_dir = as_path
    else:
        run_dir = Path(runs_dir) / sanitize_run_name(text)
    if must_exist and not (run_dir / DB_NAME).exists():
        raise StoreError(f"no run at {run_dir} (no {DB_NAME} there)")
    return run_dir


def open_run(spec: str | os.PathLike, runs_dir: str | os.PathLike = "runs",
             store: str | None = None) -> RunStore:
    """Open the run a user named on the command line: an address, or a name (or run
    directory, whose name counts) in PostgreSQL store ``store``, else under ``runs_dir``."""
    if is_server_url(spec):
        return open_store(spec)
    if store is not None:
        return open_store(run_address(store, Path(os.fspath(spec)).name))
    return SqliteStore(resolve_run(spec, runs_dir))


def list_runs(root: str | os.PathLike = "runs") -> list[dict[str, Any]]:
    """Summaries of every run under store root ``root``, newest first.

    A run whose store cannot be read is listed with state ``unreadable`` and an ``error``.
    """
    if is_server_url(root):
        found = summaries(str(root))
    else:
        names = sorted(db.parent.name for db in Path(root).glob(f"*/{DB_NAME}")) \
            if Path(root).is_dir() else []
        found = [(name, _summary(run_address(root, name))) for name in names]
    runs = [summary if isinstance(summary, dict) else {
        "run": name, "run_dir": shown(run_address(root, name)),
        "address": shown(run_address(root, name)), "state": "unreadable",
        "error": str(summary), "created": None}
        for name, summary in found]
    return sorted(runs, key=lambda r: r.get("created") or 0, reverse=True)


def _summary(address: str) -> dict[str, Any] | Exception:
    try:
        with open_store(address) as store:
            return store.summary()
    except Exception as err:  # StoreError or a driver's error (a damaged file): listed
        return err

