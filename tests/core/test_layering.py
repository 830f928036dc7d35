"""The core imports none of the upper layers' dependencies (STYLE rule 1).

Checked in a fresh interpreter: import the core (every module of ``mlbtc_search``, which includes
``linear``, ``plan`` and, once they exist, ``model`` and ``attention``), then read
``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("optuna", "ray", "dash", "plotly", "sqlalchemy")

PROBE = """
import importlib, importlib.util, json, pkgutil, sys
import mlbtc_search, mlbtc_search.linear, mlbtc_search.plan
names = ["mlbtc_search.model", "mlbtc_search.attention"]
names += [m.name for m in pkgutil.iter_modules(mlbtc_search.__path__, "mlbtc_search.")]
imported = []
for name in dict.fromkeys(names):
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
        imported.append(name)
print(json.dumps({"imported": imported, "modules": sorted(sys.modules)}))
"""


def test_core_imports_no_upper_layer():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"mlbtc_search.linear", "mlbtc_search.plan", "mlbtc_search.cli"} <= set(
        result["imported"])
    loaded = {name.split(".")[0] for name in result["modules"]}
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    assert not loaded & {"trainers", "studies", "dashboard"}


# ---- the dashboard reads studies only through the record/storage API --------------------------
# The trial record and study info (record), opening storages and artifacts (storage), fronts,
# hypervolume and summaries over records (pareto), the one exporter (export), PED-ANOVA
# importances over records' values (importance: optuna only, no search machinery), and scaling
# laws over records' rungs (scaling: numpy only).
DASHBOARD_MAY_IMPORT = {"studies.record", "studies.storage", "studies.pareto", "studies.export",
                        "studies.importance", "studies.scaling"}

DASHBOARD_PROBE = """
import json, sys
import dashboard, dashboard.app, dashboard.cli
print(json.dumps(sorted(sys.modules)))
"""


def _studies_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "studies":  # from studies import x: x is a module or a re-export
                names = [f"studies.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "studies" or n.startswith("studies.")}
    return found


def test_dashboard_imports_only_the_studies_record_and_storage_api():
    sources = sorted((REPO / "dashboard").glob("*.py"))
    assert sources
    bad = {str(p.relative_to(REPO)): sorted(_studies_imports(p) - DASHBOARD_MAY_IMPORT)
           for p in sources}
    assert not {k: v for k, v in bad.items() if v}, bad
    # And at run time: the app loads neither the search machinery nor Ray.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DASHBOARD_PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    for name in ("ray", "studies.runner", "studies.trials", "studies.worker", "studies.space",
                 "studies.sampling", "trainers"):
        assert name not in loaded, name
