"""The shape of the code: no import cycles in ``trainer/``, and ``trainer`` never imports
Streamlit. Read with ``ast`` (nothing is imported), function-level imports included:
an import hidden in a function is still a cycle, it only fails later. And the dashboard and
the CLI load neither torch nor SciPy (imported for real, in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from app.controls import key
from app.main import INTERVENTIONS_PANEL, LR_PANEL
from app.panels import DECAY_PANEL, EXPORT_PANEL, NEW_RUN_PANEL
from app.runs_table import PANEL_KEY as RUNS_PANEL

TRAINER = Path(__file__).resolve().parent.parent / "trainer"


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in TRAINER.rglob("*.py")}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The ``trainer`` modules that ``path`` imports anywhere (``TYPE_CHECKING`` excluded).
    ``from trainer.x import y`` imports ``trainer.x.y`` when that is a module, else
    ``trainer.x`` (a package's own ``__init__`` runs either way, but only for its own names
    does the importer depend on what it imports)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    inside = TRAINER in path.resolve().parents
    own = module_name(path) if inside else ""
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # a name defined in the module itself
                found.add(base)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_trainer_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_hidden_in_functions(tmp_path):
    """The check itself must be able to fail: a function-level import closing a loop."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "mod.py"
    source.write_text("import os\n\ndef late():\n    from trainer.knobs import KNOBS\n"
                      "if TYPE_CHECKING:\n    from trainer.babysitter import Babysitter\n")
    assert imports_of(source, {"trainer.knobs", "trainer.babysitter"}) == {"trainer.knobs"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_trainer_never_imports_streamlit(name):
    tree = ast.parse(modules()[name].read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "streamlit" not in imported, f"{name} imports streamlit"


def test_the_dashboard_and_the_cli_load_neither_torch_nor_scipy(tmp_path):
    """The dashboard's first page imports ``app.main`` and renders it; every CLI command
    imports ``trainer.cli``. torch (over a second) and ``scipy.signal`` (~0.7 s) made that
    first page ~2.5 s slower to come and each store-only command (``panda status``, ``set``
    …) slower to answer. The page is rendered (Streamlit's AppTest) on a run that has a
    checkpoint file, with every panel open, so the imports of what a render runs count too:
    the new-run form, the LR range test's readiness, the export panel, the runs table."""
    panels = [NEW_RUN_PANEL, EXPORT_PANEL, RUNS_PANEL, INTERVENTIONS_PANEL,
              key("live", DECAY_PANEL), key("live", LR_PANEL)]
    code = f"""
import os, sys, time
from pathlib import Path
from streamlit.testing.v1 import AppTest
import trainer.cli
from trainer.store import SqliteStore
runs = Path({str(tmp_path / "runs")!r}); run = runs / "live"
with SqliteStore(run, create=True) as store:
    now = time.time()
    store.set_meta(name="live", created=now, status="paused", heartbeat=now, pid=os.getpid(),
                   task="digits", optimizer="SGD", knobs={{"lr": 0.1, "momentum": 0.9,
                   "weight_decay": 0.0}}, supported_knobs=["lr", "momentum", "weight_decay"],
                   step=3, epoch=0, schedule={{"shape": "constant"}})
    store.append_metrics([(s, 0, now, 1.0, 0.1, 0.9, 0.0) for s in range(3)])
(run / "checkpoints").mkdir()
(run / "checkpoints" / "ckpt-000000003-periodic.pt").write_bytes(b"")
os.environ["PANDA_RUNS_DIR"] = str(runs)
at = AppTest.from_file({str(TRAINER.parent / "app" / "main.py")!r}, default_timeout=60).run()
for panel in {panels!r}:
    at.session_state[panel] = True
at.run()
assert not at.exception, at.exception
assert any(m.label == "step" for m in at.metric)
assert at.dataframe and any(b.key == "export_prepare" for b in at.button)
assert any(b.key == "lrfind_start_live" for b in at.button)
print([m for m in ("torch", "scipy") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=TRAINER.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
