"""mlbtc_search.load: an export directory -> the module, with the core alone and no pickle."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mlbtc_search
from mlbtc_search.errors import SpecError, UsageError
from mlbtc_search.load import load_spec
from mlbtc_search.model import ModelSpec, Transformer, build_model
from mlbtc_search.yamlio import dump_yaml

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    "width": 16,
    "depth": 2,
    "layers": [
        {"kind": "mlr", "heads": 2, "ranks": [4, 2, 1, 1]},
        {"kind": "standard", "heads": 4},
    ],
    "mlp": {"btt": {"rank": 1}},
    "mlp_ratio": 2,
    "max_seq_len": 16,
    "adapter": {"input_kind": "vector", "input_dim": 4, "output_dim": 1},
}


def _export_dir(tmp_path: Path, spec: dict = SPEC, seed: int = 0) -> tuple[Path, Transformer]:
    """A hand-made export directory (what `mlbtc export` writes, minus metrics and card)."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec.from_dict(spec))
    with torch.no_grad():  # the read-out starts at zero; make outputs depend on every weight
        model.read_out.weight.normal_()
    out = tmp_path / "export"
    out.mkdir(parents=True)
    doc = {**spec, "task": {"name": "icl_regression", "options": {"n_dims": 4, "n_points": 8}}}
    (out / "architecture.yaml").write_text("# comment\n" + dump_yaml(doc), encoding="utf-8")
    save_file(model.state_dict(), str(out / "model.safetensors"))
    return out, model


def test_load_rebuilds_the_model_exactly(tmp_path):
    out, model = _export_dir(tmp_path)
    loaded = mlbtc_search.load(out)
    assert isinstance(loaded, Transformer)
    assert not loaded.training
    assert loaded.spec.hash() == model.spec.hash()
    x = torch.randn(3, 16, 4)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    for (k, a), (k2, b) in zip(
        loaded.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)


def test_load_accepts_str_and_records_the_task(tmp_path):
    out, _ = _export_dir(tmp_path)
    spec = load_spec(str(out))
    assert dict(spec.task)["name"] == "icl_regression"
    assert mlbtc_search.load(str(out)).spec.adapter.input_dim == 4


def test_load_never_unpickles(tmp_path, monkeypatch):
    out, _ = _export_dir(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load() must not unpickle anything")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    mlbtc_search.load(out)


def test_load_needs_only_the_core(tmp_path):
    out, model = _export_dir(tmp_path)
    x = torch.randn(1, 16, 4)
    expected = model.eval()(x).detach().sum().item()
    code = f"""
import json, sys, torch
import mlbtc_search
m = mlbtc_search.load({str(out)!r})
torch.manual_seed(0)
heavy = sorted(name for name in sys.modules if name.split('.')[0] in
               ('optuna', 'ray', 'dash', 'plotly', 'sqlalchemy', 'trainers', 'studies',
                'dashboard'))
print(json.dumps({{"heavy": heavy, "training": m.training}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "training": False}
    assert expected == pytest.approx(mlbtc_search.load(out)(x).sum().item(), rel=0, abs=0)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(UsageError, match=r"export directory .*nowhere does not exist"):
        mlbtc_search.load(tmp_path / "nowhere")


def test_file_instead_of_directory(tmp_path):
    out, _ = _export_dir(tmp_path)
    with pytest.raises(UsageError, match=r"architecture\.yaml is a file; give the directory"):
        mlbtc_search.load(out / "architecture.yaml")


@pytest.mark.parametrize("name", ["architecture.yaml", "model.safetensors"])
def test_missing_file(tmp_path, name):
    out, _ = _export_dir(tmp_path)
    (out / name).unlink()
    with pytest.raises(
        UsageError,
        match=rf"{name.replace('.', '[.]')} not found: an export "
        "directory must hold",
    ):
        mlbtc_search.load(out)


def test_missing_and_extra_tensors(tmp_path):
    out, model = _export_dir(tmp_path)
    state = model.state_dict()
    state.pop("read_out.weight")
    state["surprise"] = torch.zeros(2)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(
        UsageError,
        match=r"do not match the architecture: missing 1 tensor\(s\) "
        r"\(read_out\.weight\); 1 unexpected tensor\(s\) "
        r"\(surprise\)",
    ):
        mlbtc_search.load(out)


def test_wrong_shapes(tmp_path):
    out, _ = _export_dir(tmp_path)
    _export_dir(
        tmp_path / "b", {**SPEC, "width": 32, "layers": [{"kind": "standard", "heads": 4}] * 2}
    )
    (out / "model.safetensors").write_bytes((tmp_path / "b/export/model.safetensors").read_bytes())
    with pytest.raises(UsageError, match=r"has shape \[.*\] but the architecture needs \[.*\]"):
        mlbtc_search.load(out)


def test_corrupt_weights(tmp_path):
    out, _ = _export_dir(tmp_path)
    (out / "model.safetensors").write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(UsageError, match=r"cannot read .*model\.safetensors as safetensors"):
        mlbtc_search.load(out)


def test_bad_spec_is_located(tmp_path):
    out, _ = _export_dir(tmp_path)
    text = (out / "architecture.yaml").read_text().replace("width: 16", "width: 0", 1)
    (out / "architecture.yaml").write_text(text)
    with pytest.raises(
        SpecError,
        match=r"at .*architecture\.yaml:2 width: width must be an "
        r"integer >= 1 and <= 16777216, got 0",
    ):
        mlbtc_search.load(out)


def test_spec_without_adapter(tmp_path):
    out, _ = _export_dir(tmp_path)
    spec = {k: v for k, v in SPEC.items() if k != "adapter"}
    (out / "architecture.yaml").write_text(dump_yaml(spec))
    with pytest.raises(
        SpecError,
        match=r"adapter: an exported architecture must give its "
        r"adapter",
    ):
        mlbtc_search.load(out)
