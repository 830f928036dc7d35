"""``mlbtc inspect`` on every shipped matrix example, its errors, and ``--help``.

In-process through ``mlbtc_search.cli.main`` (fast); one subprocess test runs the real command
line to check exit codes and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlbtc_search import MatrixSpec, flops, params
from mlbtc_search.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "matrices").glob("*.yaml"))

# rank of each example for random cores: full unless the structure bounds it
EXPECTED_RANK = {"low_rank": 16, "mlr": 16 + 2 * 8 + 4 * 4 + 8 * 2, "tensor_train": 512}


def inspect_json(path: Path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "one JSON object on one line"
    return json.loads(out)


def test_every_example_is_inspected():
    assert {p.stem for p in EXAMPLES} >= {"dense", "low_rank", "kronecker", "monarch", "btt",
                                          "tensor_train", "block_diag", "mlr", "theta",
                                          "general"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_inspect_json_matches_the_spec(path, capsys):
    report = inspect_json(path, capsys)
    spec = MatrixSpec.from_dict(yaml.safe_load(path.read_text()))
    assert {"in", "out", "params", "flops", "rank"} <= set(report)
    assert (report["in"], report["out"]) == (spec.n_in, spec.n_out)
    assert report["params"] == params(spec)
    assert report["flops"] == flops(spec)
    assert report["hash"] == spec.hash()
    assert report["rank"] == EXPECTED_RANK.get(path.stem, min(spec.n_in, spec.n_out))
    assert sum(lv["flops"] for lv in report["levels"]) == flops(spec)
    assert sum(lv["params"] for lv in report["levels"]) == params(spec)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_inspect_text_shows_order_and_graph(path, capsys):
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    spec = MatrixSpec.from_dict(yaml.safe_load(path.read_text()))
    assert f"matrix {spec.n_in} -> {spec.n_out}" in out
    assert f"{params(spec):,}" in out and f"{flops(spec):,}" in out
    assert out.count("contraction order: x -> G0") == len(spec.levels)
    assert out.count("graph:") == len(spec.levels)
    for level in spec.levels:
        x_line = "x  : " + " ".join(f"{a}={s}" for a, s in level.btc.in_axes)
        y_line = "y  : " + " ".join(f"{a}={s}" for a, s in level.btc.out_axes)
        assert x_line in out and y_line in out


def test_inspect_text_of_btt(capsys):
    assert main(["inspect", str(REPO / "examples/matrices/btt.yaml")]) == 0
    out = capsys.readouterr().out
    assert "contraction order: x -> G0 -> G1 -> y" in out
    assert "G0: (i, j) -> (i, b, s)" in out
    assert "G0 : i=8 j=32 b=16 s=2" in out and "G1 : b=16 i=8 s=2 a=16" in out


BAD = """\
in: 64
out: 64
levels:
  - blocks: 2
    low_rank: {rank: 99}
"""


def test_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"mlbtc inspect: error: at {path}:5 levels[0].low_rank.rank:")
    assert "rank must be >= 1 and <= 32" in captured.err


def test_invalid_yaml_exits_2(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("in: 64\nout: [64\n")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:" in err and "invalid YAML" in err


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file not found" in err and "nope.yaml" in err


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"]])
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: mlbtc" in capsys.readouterr().out


def test_command_line(tmp_path):
    """The real entry point: a bad file gives exit 2, one line on stderr and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = subprocess.run([sys.executable, "-m", "mlbtc_search.cli", "inspect", str(bad)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert "Traceback" not in failed.stderr
    assert failed.stderr.count("\n") == 1
    assert f"{bad}:5 levels[0].low_rank.rank" in failed.stderr
