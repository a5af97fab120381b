"""Run stores: the only channel between trainers, dashboards, the CLI and searches.

* :mod:`~trainer.store.base`: the :class:`RunStore` interface, with every query;
* :mod:`~trainer.store.sqlite` and :mod:`~trainer.store.postgres`: the two backends;
* :mod:`~trainer.store.schema`: the tables, defined once for both;
* :mod:`~trainer.store.records`: the rows a trainer writes, as named types;
* :mod:`~trainer.store.address`: where runs live (a runs directory or a PostgreSQL URL) and
  how a run named on the command line or the page is opened.
"""

from trainer.store.address import list_runs, open_run, open_store, store_for
from trainer.store.base import (
    FINAL_STATES,
    RUNNING_STATES,
    Command,
    RunStore,
    StoreError,
    sanitize_run_name,
)
from trainer.store.postgres import PostgresStore
from trainer.store.sqlite import SqliteStore

__all__ = ["FINAL_STATES", "RUNNING_STATES", "Command", "PostgresStore", "RunStore",
           "SqliteStore", "StoreError", "list_runs", "open_run", "open_store",
           "sanitize_run_name", "store_for"]
