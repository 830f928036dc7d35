"""Structure descriptors and family labels (studies.descriptors)."""

from __future__ import annotations

import pytest

from mlbtc_search.matrix import MatrixSpec
from mlbtc_search.model import ModelSpec, kv_cache_bytes, model_flops
from studies.descriptors import (
    attention_family,
    describe,
    family_label,
    matrix_family,
    numerical_rank,
)


def _model(attention: dict, mlp: dict | None = None, width: int = 64, T: int = 64) -> ModelSpec:
    return ModelSpec.from_dict({"width": width, "depth": 2, "attention": attention,
                                "mlp": mlp or {"dense": {}}, "max_seq_len": T})


@pytest.mark.parametrize("spec, family, rank", [
    ({"dense": {}}, "dense", 64),
    ({"low_rank": {"rank": 5}}, "low_rank", 5),
    ({"kronecker": {}}, "kronecker", 64),
    ({"monarch": {}}, "monarch", 64),
    ({"btt": {"rank": 2}}, "btt", 64),
    ({"tensor_train": {"cores": 3, "ranks": 2}}, "tensor_train", 64),
    ({"mlr": {"ranks": [4, 2, 1, 1], "blocks": [1, 2, 4, 8]}}, "mlr", 20),
    ({"block_diag": {"blocks": 4, "structure": {"low_rank": {"rank": 3}}}},
     "block_diag(low_rank)", 12),
    ({"theta": {"exponents": [0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.0]}}, "theta", None),
    ({"btc": {"in_axes": {"i": 8, "j": 8}, "out_axes": {"o": 64}, "bonds": {"r": 2},
              "cores": [["i", "r"], ["j", "r", "o"]]}}, "btc", None),
])
def test_matrix_family_and_rank(spec, family, rank):
    m = MatrixSpec.from_dict(spec, (), 64, 64)
    assert matrix_family(m) == family
    if rank is not None:
        assert numerical_rank(m) == rank


def test_standard_attention_descriptors():
    spec = _model({"kind": "standard", "heads": 4})
    d = describe(spec)
    g = d["layers"][0]["groups"][0]
    assert g["label"] == "standard" and g["heads"] == 4 and g["window"] is None
    assert g["sequence_levels"] == 1 and g["finest_block"] == 64
    want = {"rank": 16, "qk_width": 16, "cores": 2, "feature_levels": 1, "family": "low_rank"}
    assert {k: g["levels"][0][k] for k in want} == want
    assert d["family"] == "standard" and d["label"] == "standard"
    assert sum(lay["flops_per_token"] for lay in d["layers"]) == model_flops(spec)
    assert sum(lay["kv_cache_bytes_per_token"] for lay in d["layers"]) == kv_cache_bytes(spec)
    s = d["summary"]
    assert s["min_rank"] == 16 and s["qk_width"] == 16 and s["groups"] == 1


def test_mlr_and_window_and_theta_descriptors():
    d = describe(_model({"kind": "mlr", "heads": 8, "ranks": [4, 2, 1, 1]},
                        mlp={"theta": {"exponents": [0.5, 0, 0.5, 0, 0.5, 0.5, 0.25]}}))
    g = d["layers"][0]["groups"][0]
    assert g["label"] == "mlr" and g["sequence_levels"] == 4 and g["finest_block"] == 8
    assert [lv["rank"] for lv in g["levels"]] == [4, 2, 1, 1]
    assert d["family"] == "mlr" and d["label"] == "mlr / mlp:theta"
    assert d["mlp"]["theta"] == [[0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.25]]
    assert d["summary"]["theta_rho"] == 0.25
    d = describe(_model({"kind": "global_window", "heads": 4, "window": 8}))
    assert d["family"] == "sliding_window+standard"
    assert d["summary"]["finest_block"] == 8 and d["summary"]["windowed_heads"] == 2


def test_bilinear_families_and_attention_kind():
    btt = {"kind": "bilinear_btt", "heads": 8, "rank": 1}
    assert family_label(_model(btt)) == "bilinear_monarch"
    assert attention_family(btt, 64, 64) == "bilinear_btt"
    mlr = {"kind": "bilinear_mlr", "heads": 8, "ranks": [4, 2, 1, 1]}
    assert family_label(_model(mlr)) == "bilinear_mlr"
    assert attention_family(mlr, 64, 64) == "bilinear_mlr"
    dense = {"kind": "general", "groups": [{"heads": 2, "levels": [{"score": {"dense": {}}}]}]}
    assert family_label(_model(dense)) == "bilinear_dense"
    assert attention_family(dense, 64, 64) == "general"
    assert attention_family({"kind": "standard", "heads": 2}, 64, 64) == "standard"


def test_family_label_unites_layers_and_names_block_diagonal_forms():
    spec = ModelSpec.from_dict({"width": 64, "depth": 3, "max_seq_len": 64, "layers": [
        {"kind": "standard", "heads": 2}, {"kind": "sliding_window", "heads": 2, "window": 8},
        {"kind": "standard", "heads": 4}]})
    assert family_label(spec) == "sliding_window+standard"
    block = {"kind": "general", "groups": [{"heads": 2, "levels": [{"score": {
        "block_diag": {"blocks": 4, "structure": {"low_rank": {"rank": 2}}}}}]}]}
    assert family_label(_model(block)) == "bilinear_block_low_rank"


def test_a_split_mlp_is_described_by_both_halves():
    from studies.descriptors import describe, model_label

    spec = ModelSpec.from_dict({"width": 32, "depth": 1, "max_seq_len": 16,
                                "attention": {"kind": "standard"},
                                "mlp": {"up": {"btt": {"rank": 2}},
                                        "down": {"low_rank": {"rank": 8}}}})
    assert model_label(spec).endswith("/ mlp:btt+low_rank")
    desc = describe(spec)
    assert desc["mlp"] != desc["mlp_down"]
