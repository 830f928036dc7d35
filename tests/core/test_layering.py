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
