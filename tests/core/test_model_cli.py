"""``mlbtc inspect MODEL.yaml`` (in-process through ``mlbtc_search.cli.main``): the JSON report
agrees with the model functions, the text report has one row per layer, and a bad model file is
one stderr line with file:line and the field path (exit code 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mlbtc_search.cli import main
from mlbtc_search.model import ModelSpec, kv_cache_bytes, model_flops, model_params

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "models").glob("*.yaml"))

OWN_MODEL = """\
# a model written by the test: per-layer attention, a structured MLP, an adapter
width: 32
depth: 3
layers:
  - {kind: mlr, heads: 4, ranks: [4, 2, 1, 1]}
  - {kind: sliding_window, heads: 4, window: 8}
  - kind: general
    groups:
      - heads: 2
        levels:
          - {block_size: null, score: {btt: {rank: 1}}}
          - {block_size: 8, score: {low_rank: {rank: 2}}}
mlp: {btt: {rank: 1}}
mlp_ratio: 2
max_seq_len: 32
adapter: {input_kind: tokens, input_dim: 256, output_dim: 256}
"""


@pytest.fixture
def own_model(tmp_path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(OWN_MODEL)
    return path


def inspect_json(path: Path, capsys, *extra: str) -> dict:
    assert main(["inspect", str(path), "--json", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "one JSON object on one line"
    return json.loads(out)


def check_report(report: dict, spec: ModelSpec, T: int) -> None:
    assert {"params", "flops_per_token", "kv_cache_bytes_per_token", "layers"} <= set(report)
    assert report["kind"] == "model" and report["seq_len"] == T
    assert report["params"] == model_params(spec)
    assert report["flops_per_token"] == model_flops(spec, T)
    assert report["kv_cache_bytes_per_token"] == kv_cache_bytes(spec, T)
    assert report["hash"] == spec.hash() and report["family"] == spec.family
    assert len(report["layers"]) == spec.depth
    for row, attn in zip(report["layers"], spec.layers, strict=True):
        assert row["attention"] == attn.kind and row["heads"] == attn.heads
        assert (
            row["flops_per_token"] == row["attention_flops_per_token"] + row["mlp_flops_per_token"]
        )
    assert sum(r["flops_per_token"] for r in report["layers"]) == report["flops_per_token"]


def test_inspect_own_model_json(own_model, capsys):
    report = inspect_json(own_model, capsys)
    spec = ModelSpec.from_dict(yaml.safe_load(OWN_MODEL))
    check_report(report, spec, 32)
    assert [r["attention"] for r in report["layers"]] == ["mlr", "sliding_window", "general"]
    assert report["kv_cache_bytes_per_token"] < report["kv_cache_bytes_per_token_standard"]
    assert report["params_with_embedding"] == model_params(spec, embedding=True)


def test_inspect_seq_len(own_model, capsys):
    spec = ModelSpec.from_dict(yaml.safe_load(OWN_MODEL))
    report = inspect_json(own_model, capsys, "--seq-len", "16")
    check_report(report, spec, 16)
    assert report["flops_per_token"] < model_flops(spec, 32)


def test_inspect_seq_len_beyond_the_model(own_model, capsys):
    assert main(["inspect", str(own_model), "--seq-len", "64"]) == 2
    err = error_line(capsys)
    assert "max_seq_len: the sequence length must be between 1 and max_seq_len=32" in err


def test_inspect_own_model_text(own_model, capsys):
    assert main(["inspect", str(own_model)]) == 0
    out = capsys.readouterr().out
    spec = ModelSpec.from_dict(yaml.safe_load(OWN_MODEL))
    lines = out.splitlines()
    assert lines[0].startswith(f"model {spec.family}  (hash {spec.hash()}): width 32, depth 3")
    assert f"{model_params(spec):,}" in out and f"{model_flops(spec):,.0f}" in out
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "attention"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [r[:3] for r in rows] == [
        ["0", "mlr", "4"],
        ["1", "sliding_window", "4"],
        ["2", "general", "2"],
    ]


def test_there_are_model_examples():
    assert EXAMPLES, "examples/models/*.yaml ship with the project"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_inspect_every_model_example(path, capsys):
    doc = yaml.safe_load(path.read_text())
    spec = ModelSpec.from_dict(doc)
    check_report(inspect_json(path, capsys), spec, spec.max_seq_len)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model {spec.family}") and f"depth {spec.depth}" in out


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, "one stderr line"
    return captured.err


@pytest.mark.parametrize(
    "line,text,where",
    [
        (
            4,
            "attention: {kind: standard, heads: 5}",
            r"bad\.yaml:4 attention\.heads: heads must "
            r"divide width=32, got heads=5",
        ),
        (
            4,
            "attention: {kind: mlr, ranks: [1, 1, 1, 1, 1, 1, 1]}",
            r"bad\.yaml:4 attention\.ranks: max_seq_len=32 must be divisible by "
            r"2\^\(levels-1\)=64",
        ),
        (4, "attention: {kind: fancy}", r"bad\.yaml:4 attention\.kind: unknown attention kind"),
        (5, "colour: red", r"bad\.yaml:5 colour: unknown key 'colour'"),
    ],
)
def test_bad_model_file(tmp_path, capsys, line, text, where):
    good = ["width: 32", "depth: 2", "max_seq_len: 32", "attention: standard"]
    lines = good[:3] + [text] if line == 4 else good + [text]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["inspect", str(path)]) == 2
    err = error_line(capsys)
    assert err.startswith("mlbtc inspect: error: at ")
    assert str(path) in err
    assert re.search(where, err), err


def test_bad_nested_field_points_at_its_line(tmp_path, capsys):
    text = OWN_MODEL.replace("{block_size: 8, score", "{block_size: 3, score")
    text = text.replace("{block_size: null, score: {btt", "{block_size: 16, score: {btt")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["inspect", str(path), "--json"]) == 2
    line = text.splitlines().index("          - {block_size: 3, score: {low_rank: {rank: 2}}}")
    err = error_line(capsys)
    assert (
        f"bad.yaml:{line + 1} layers[2].groups[0].levels[1].block_size: block sizes must "
        "be nested" in err
    )


def test_missing_and_unparsable_files(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in error_line(capsys)
    path = tmp_path / "broken.yaml"
    path.write_text("width: 32\nattention: {kind: standard\n")
    assert main(["inspect", str(path)]) == 2
    assert f"{path}:" in error_line(capsys)
