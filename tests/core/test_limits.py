"""Sizes are checked against limits before anything is factorized, allocated or iterated; each
bad size is a one-line SpecError naming the field. Plus regression tests of small defects."""

from __future__ import annotations

import time

import pytest

from mlbtc_search.attention_presets import ATTENTION_PRESETS, AttentionPreset
from mlbtc_search.attention_spec import AttentionSpec, HeadGroup, ScoreLevel
from mlbtc_search.btc import BTC
from mlbtc_search.errors import SpecError
from mlbtc_search.matrix import MatrixSpec
from mlbtc_search.model import ModelSpec, build_model
from mlbtc_search.presets import divisors, theta

TOKENS = {"input_kind": "tokens", "input_dim": 11, "output_dim": 11}


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"in": 10**12, "out": 10**12, "btt": {}}, r"at in: in must be at most 16,777,216"),
        ({"in": 64, "out": 64, "kronecker": {"in_factors": [2**30, 1]}},
         r"product of in_factors must be 64"),
        ({"in": 64, "out": 64, "mlr": {"ranks": [1] * 10**6}},
         r"at mlr\.ranks: ranks may have at most 32 levels"),
        ({"in": 64, "out": 64, "tensor_train": {"cores": 10**6}},
         r"at tensor_train\.cores: cores must be an integer between 2 and 12"),
        ({"in": 64, "out": 64, "btc": {"in_axes": {"i": 64}, "out_axes": {"o": 64},
                                       "bonds": {"r": 10**9}, "cores": [["i", "r"], ["r", "o"]]}},
         r"axis size must be between 1 and 16,777,216"),
    ],
)
def test_matrix_sizes_are_limited_and_fast(doc, match):
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=match):
        MatrixSpec.from_dict(doc)
    assert time.perf_counter() - t0 < 1


def test_divisors_come_from_a_factorization():
    t0 = time.perf_counter()
    assert divisors(2**24) == [2**k for k in range(25)]
    assert divisors(16_777_213) == [1, 16_777_213]  # a prime near the limit
    assert divisors(360) == [d for d in range(1, 361) if 360 % d == 0]
    assert time.perf_counter() - t0 < 0.5
    spec = MatrixSpec.from_dict({"in": 2**24, "out": 2**24 - 3, "btt": {}})
    assert spec.levels[0].btc.n_in == 2**24


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"width": 10**12}, r"at width: width must be an integer >= 1 and <= 16777216"),
        ({"width": 64, "depth": 10**9}, r"at depth: depth must be an integer >= 1 and <= 1024"),
        ({"width": 64, "max_seq_len": 10**12}, r"max_seq_len must be an integer >= 1 and <="),
        ({"width": 64, "mlp_ratio": 10**9}, r"mlp_ratio must be an integer >= 1 and <= 262144"),
        ({"width": 64, "attention": {"kind": "mlr", "ranks": [1] * 200}},
         r"at attention\.ranks: max_seq_len=64 must be divisible by 2\^\(levels-1\)=2\^199"),
    ],
)
def test_model_sizes_are_limited(doc, match):
    doc = {"max_seq_len": 64, "attention": "standard", **doc}
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_dict(doc, adapter=TOKENS)


def test_a_huge_model_is_refused_before_allocation():
    spec = ModelSpec.from_dict({"width": 65536, "depth": 8, "max_seq_len": 64,
                                "attention": "standard"}, adapter=TOKENS)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"at width: the model has 412,3.* parameters .* at most "
                                         r"10,000,000,000 can be built"):
        build_model(spec)
    assert time.perf_counter() - t0 < 1


def test_a_window_longer_than_the_sequence_allocates_nothing_extra():
    spec = ModelSpec.from_dict({"width": 16, "depth": 1, "max_seq_len": 8, "attention": {
        "kind": "sliding_window", "heads": 2, "window": 10**9}}, adapter=TOKENS)
    import torch

    from mlbtc_search.flopcount import count_flops
    from mlbtc_search.model import model_flops

    model = build_model(spec)
    x = torch.randint(0, 11, (1, 8))
    assert count_flops(lambda: model(x)) == 8 * model_flops(spec, 8, embedding=True)


# ---- regression tests of issue 10 item 6 --------------------------------------------------------
def test_theta_corner_falls_back_to_one_dense_core():
    btc = theta(32, 32, [1, 0, 0, 1, 0, 0, 0])
    assert len(btc.cores) == 1 and btc.params == 32 * 32
    spec = MatrixSpec.from_dict({"in": 32, "out": 32, "theta": "(1|0|0|1|0|0|0)"})
    assert spec.params == 1024
    assert spec.hash() == MatrixSpec.from_dict({"in": 32, "out": 32, "dense": {}}).hash()


def test_canonical_hash_ignores_axis_order_inside_a_core():
    def spec(first_core):
        return MatrixSpec.from_dict({"in": 16, "out": 16, "btc": {
            "in_axes": {"i": 16}, "out_axes": {"o": 16}, "bonds": {"s": 2, "t": 3},
            "cores": [first_core, ["s", "t", "o"]]}})

    assert spec(["i", "s", "t"]).hash() == spec(["i", "t", "s"]).hash()
    assert spec(["i", "s", "t"]).hash() == spec(["t", "i", "s"]).hash()


def test_canonical_hash_still_tells_different_bonds_apart():
    def spec(sizes):
        return MatrixSpec.from_dict({"in": 16, "out": 16, "btc": {
            "in_axes": {"i": 16}, "out_axes": {"o": 16}, "bonds": sizes,
            "cores": [["i", "s", "t"], ["s", "o"], ["t", "o"]]}})

    assert spec({"s": 2, "t": 3}).hash() != spec({"s": 3, "t": 2}).hash()


def test_bond_naming_does_not_depend_on_core_axis_order():
    a = BTC((("i", 4),), (("o", 4),), (("s", 2), ("t", 2)), (("i", "s", "t"), ("s", "t", "o")))
    b = BTC((("i", 4),), (("o", 4),), (("s", 2), ("t", 2)), (("i", "t", "s"), ("t", "s", "o")))
    assert a.canonical() == b.canonical()


# ---- the attention preset registry --------------------------------------------------------------
def test_every_kind_is_one_registry_row():
    assert set(ATTENTION_PRESETS) == {"standard", "bilinear_btt", "bilinear_mlr", "mlr",
                                      "sliding_window", "global_window", "general"}
    for name, preset in ATTENTION_PRESETS.items():
        assert preset.name == name and "kind" in preset.keys


def test_a_new_preset_is_one_function_and_one_row(monkeypatch):
    def toy(d, width, seq_len, path):
        score = MatrixSpec.from_dict({"low_rank": {"rank": d.get("rank", 2)}}, path, width, width)
        return (HeadGroup(d.get("heads", 1), (ScoreLevel(None, score),)),)

    keys = ("kind", "heads", "value", "output", "qk_norm", "causal", "logit_mult", "rank")
    monkeypatch.setitem(ATTENTION_PRESETS, "toy", AttentionPreset("toy", keys, toy))
    spec = AttentionSpec.from_dict({"kind": "toy", "heads": 2, "rank": 3}, 16, 8)
    assert spec.kind == "toy" and spec.groups[0].levels[0].score.params == 2 * 16 * 3
    with pytest.raises(SpecError, match=r"at window: unknown key 'window' in toy attention"):
        AttentionSpec.from_dict({"kind": "toy", "window": 3}, 16, 8)
