"""A throw-away PostgreSQL server for the tests, from Debian's ``postgresql`` package.

:func:`start` makes a cluster in a temporary directory (``initdb``, trust authentication,
loopback only, a free port, ``fsync=off`` since nothing here must survive the test session),
and :meth:`Server.new_database` hands each test an empty database of its own. As root (CI),
the server runs as the ``postgres`` user the package creates: PostgreSQL refuses to run as
root. ``make test`` installs the package, so CI always has it.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"   # created by Debian's postgresql package
START_TIMEOUT_S = 60
MAX_CONNECTIONS = 300      # every test opens a few per-thread connections of its own


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def _binaries() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise Unavailable("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                          "`make test` installs Debian's postgresql package")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running throw-away cluster; :meth:`stop` removes it."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: list[str]):
        self.bindir, self.root, self.port, self.run_as = bindir, root, port, run_as
        self.url = f"postgresql://panda@127.0.0.1:{port}/postgres"
        self._numbers = itertools.count()

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([*self.run_as, str(self.bindir / program), *args],
                                capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if result.returncode != 0:
            raise Unavailable(f"{program} failed: {(result.stderr or result.stdout).strip()}")

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def _start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   f"-c max_connections={MAX_CONNECTIONS}")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start")

    def restart(self, down_s: float) -> None:
        """Stop the server (every client loses its connection), wait, start it again."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        time.sleep(down_s)
        self._start()

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start() -> Server:
    """Start a server, or raise :class:`Unavailable` with the reason."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install '.[postgres]')") from None
    bindir = _binaries()
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="panda-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise Unavailable("running as root without `runuser` to drop to the postgres user")
        try:
            shutil.chown(root, user=SERVER_USER)
        except LookupError:
            raise Unavailable(f"running as root and there is no {SERVER_USER!r} user to run "
                              "the server as") from None
        run_as = ["runuser", "-u", SERVER_USER, "--"]
    server = Server(bindir, root, _free_port(), run_as)
    try:
        server._run("initdb", "-D", str(root / "data"), "--auth=trust", "-U", "panda",
                    "-E", "UTF8", "--no-sync")
        server._start()
    except (Unavailable, OSError, subprocess.SubprocessError) as err:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"could not start a throw-away PostgreSQL server: {err}") from None
    return server
