"""The MLP with its own up and down specs (``mlp: {up: SPEC, down: SPEC}``): round trip, hashes
that do not move for the one-spec form, exact FLOPs/params, µP zero output, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_model import TOKENS, VECTOR, inputs, model_doc, randomized, variant_doc

from mlbtc_search.errors import SpecError
from mlbtc_search.flopcount import count_flops
from mlbtc_search.model import ModelSpec, build_model, model_flops, model_params

# D = 32, hidden = 4 * D = 128: a two-core graph up, a bond-3 tensor-train-like graph down
UP = {"btc": {"in_axes": {"i0": 4, "i1": 8}, "out_axes": {"o0": 16, "o1": 8},
              "bonds": {"r": 2}, "cores": [["i0", "o0", "r"], ["i1", "o1", "r"]]}}
DOWN = {"btc": {"in_axes": {"i0": 8, "i1": 16}, "out_axes": {"o0": 32},
                "bonds": {"r": 3}, "cores": [["i0", "r"], ["i1", "o0", "r"]]}}
GRAPHS = {"up": UP, "down": DOWN}

# hashes of the one-spec form before the split form existed (commit e25a407): pinned
PINNED = {
    "0ae6ab70fe7ff1de": model_doc(),
    "67c583b21f9fc22c": variant_doc("layers", VECTOR),
    "a312523dc183a312": model_doc({"kind": "mlr", "heads": 4, "ranks": [4, 2, 1, 1]},
                                  mlp={"low_rank": {"rank": 8}}, mlp_ratio=2),
}


@pytest.mark.parametrize("want", sorted(PINNED))
def test_one_spec_hashes_and_dicts_do_not_move(want):
    spec = ModelSpec.from_dict(PINNED[want])
    assert spec.hash() == want
    mlp = spec.to_dict()["mlp"]
    assert set(mlp) == {"levels"}  # still the one-spec form, no up/down
    assert ModelSpec.from_dict(spec.to_dict()).hash() == want


def test_split_round_trips_and_hashes():
    spec = ModelSpec.from_dict(model_doc(mlp=GRAPHS))
    d = spec.to_dict()
    assert set(d["mlp"]) == {"up", "down"}
    for again in (ModelSpec.from_dict(yaml.safe_load(yaml.safe_dump(d))),
                  ModelSpec.from_dict(json.loads(json.dumps(d)))):
        assert again == spec and again.hash() == spec.hash() and again.to_dict() == d
    assert (spec.mlp_up.n_in, spec.mlp_up.n_out, spec.mlp_down.n_in) == (32, 128, 128)
    assert spec.family == "standard/mlp:btc"
    swapped = ModelSpec.from_dict(model_doc(mlp={"up": UP, "down": "dense"}))
    assert swapped.hash() != spec.hash() and swapped.family == "standard/mlp:btc+dense"
    # a split whose halves are one shape-agnostic spec is that spec: same dict, same hash
    btt = {"btt": {"rank": 1}}
    same = ModelSpec.from_dict(model_doc(mlp={"up": btt, "down": btt}))
    one = ModelSpec.from_dict(model_doc(mlp=btt))
    assert same == one and same.to_dict() == one.to_dict() and same.hash() == one.hash()


@pytest.mark.parametrize("adapter", [TOKENS, VECTOR], ids=["tokens", "vector"])
def test_split_graph_mlp_flops_and_params_are_exact(adapter):
    spec = ModelSpec.from_dict(model_doc(adapter=adapter, mlp=GRAPHS))
    model = build_model(spec)
    B = 2
    for T in (32, 7):
        x = inputs(spec, B, T)
        x = x.to(torch.get_default_dtype()) if adapter is VECTOR else x
        assert count_flops(lambda x=x: model(x)) == B * T * model_flops(spec, T, embedding=True)
        assert count_flops(lambda x=x: model(x).square().sum().backward()) == (
            B * T * model_flops(spec, T, embedding=True, backward=True))
    assert model_params(spec, embedding=True) == sum(p.numel() for p in model.parameters())
    dense = ModelSpec.from_dict(model_doc(adapter=adapter))
    assert model_flops(spec) < model_flops(dense)


def test_split_graph_mlp_starts_at_zero_and_trains_its_graphs():
    spec = ModelSpec.from_dict(model_doc(adapter=TOKENS, mlp=GRAPHS))
    model = build_model(spec)
    x = torch.randn(2, 9, 32)
    for block in model.blocks:
        assert torch.count_nonzero(block.mlp(x)) == 0  # µP: the down projection starts at zero
    y = randomized(spec).blocks[0].mlp(x.double())
    assert y.shape == (2, 9, 32) and torch.count_nonzero(y) > 0


@pytest.mark.parametrize("mlp, match", [
    ({"up": UP}, r"at mlp\.down: a split MLP takes exactly the keys up and down"),
    ({"up": UP, "down": DOWN, "gate": "dense"}, r"at mlp\.gate: a split MLP takes exactly"),
    ({"up": 3, "down": DOWN}, r"at mlp\.up: mlp\.up must be a matrix structure"),
    ({"up": DOWN, "down": DOWN}, r"at mlp\.up\."),  # a graph of the wrong shape
    ({"up": UP, "down": {"low_rank": {"rank": 999}}}, r"at mlp\.down\.low_rank\.rank"),
])
def test_split_errors_name_the_field(mlp, match):
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_dict(model_doc(mlp=mlp))
