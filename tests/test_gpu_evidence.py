"""benchmarks/gpu_evidence.py --smoke on the CPU: every phase's plumbing, end to end.

Tiny models (one seed, budgets of 1e8 FLOPs) through the real subprocess runner, the real
``mlbtc search`` (local Ray) for the rediscovery phase, the JSONL log, the summary and the plots;
then a rerun, which must find every run done and train nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_evidence.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_runs_every_phase_and_resumes(tmp_path) -> None:
    out = tmp_path / "evidence"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "plan (device cpu" in first.stdout and "total ~" in first.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in rows}
    assert {"throughput/cpu-c1", "throughput/cpu-c2", "throughput/cpu2"} <= keys
    icl = [r for r in rows if r["phase"] == "icl"]
    assert sorted(r["label"] for r in icl) == ["bilinear_btt", "bilinear_mlr", "mlr_sequence",
                                               "standard_1head", "standard_8head"]
    assert all(r["status"] == "ok" and r["curve"] for r in icl)
    by_cost = sorted(icl, key=lambda r: r["flops_per_token"])  # equal budgets, own costs:
    assert by_cost[0]["steps"] > by_cost[-1]["steps"]  # the cheapest model takes more steps
    assert all(r["budget"] - r["train_flops"] < r["train_flops"] for r in icl)
    redisc = [r for r in rows if r["phase"] == "rediscovery"]
    assert redisc and redisc[-1]["status"] == "ok" and len(redisc[-1]["trials"]) >= 1
    assert all(isinstance(t["rank"], int) and t["rank"] >= 1 for t in redisc[-1]["trials"])
    lang = [r for r in rows if r["phase"] == "language"]
    assert len(lang) == 6 and {r["label"] for r in lang} == {"standard", "mlr_sequence",
                                                              "sliding_window"}
    summary = (out / "summary.md").read_text()
    for heading in ("## Throughput", "## In-context regression", "## Rediscovery",
                    "## Language"):
        assert heading in summary
    for png in ("icl_curves.png", "rediscovery_front.png", "language_scaling.png"):
        assert (out / png).stat().st_size > 1000

    second = _run(out)  # everything is done: nothing is trained again
    assert second.returncode == 0, second.stderr[-2000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    assert "runs to do" not in second.stderr


def test_plan_only_prints_estimates(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--fit", "10", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.strip().startswith("icl ") and "10 runs" in line for line in lines)
    total = float(lines[-1].split("~")[1].split()[0])
    assert total <= 10.0  # --fit lowered the scale until the estimate fits
    assert not (tmp_path / "results.jsonl").exists()
