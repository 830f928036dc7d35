"""Ctrl-C in ``mlbtc train``: a real process and a real SIGINT (issue 9 item 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "width: 16\ndepth: 1\nattention: {kind: standard, heads: 2}\nmlp: {dense: {}}\n"


def test_ctrl_c_answers_within_seconds_and_reports_what_was_done(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text(MODEL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbtc_search.cli", "train", str(model), "--budget", "1e15",
         "--task-option", "n_dims=4", "--batch-size", "8", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        first = proc.stderr.readline()  # the first progress line: the loop is running
        assert first.startswith("step "), first
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        answered = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert answered < 5.0, f"took {answered:.1f}s to stop (load {os.getloadavg()[0]:.1f})"
    assert "interrupted: stopping, then evaluating once" in err
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == "interrupted" and result["steps"] >= 1
    assert result["val_loss"] is not None  # evaluated once after the interrupt
    assert (tmp_path / "run" / "model.safetensors").is_file()
