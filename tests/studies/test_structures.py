"""Structural distributions (studies.structures): options, graphs, theta, levels, head groups."""

from __future__ import annotations

import math

import _structure_params as P
import optuna
import pytest
import torch

from mlbtc_search.btc import BTC
from mlbtc_search.errors import SpecError
from mlbtc_search.linear import StructuredLinear
from mlbtc_search.matrix import MatrixSpec
from mlbtc_search.model import ModelSpec
from studies.structures import (
    AttentionOptions,
    MatrixOptions,
    parse_options,
    sample_attention,
    sample_graph,
    sample_matrix,
    sample_theta,
    split_heads,
)
from studies.structures.matrix import merge_axes

optuna.logging.set_verbosity(optuna.logging.WARNING)
FixedTrial = optuna.trial.FixedTrial
GRAPH = MatrixOptions(forms=("graph",), cores=3, axes=3, ranks=(1, 64))


def _random_trials(n: int, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        yield trial
        study.tell(trial, 0.0)


# ---- options ---------------------------------------------------------------------------------


def test_options_round_trip_and_defaults():
    a = AttentionOptions()
    assert parse_options(a.to_dict()) == a
    m = MatrixOptions(forms=("dense", "theta"))
    assert parse_options(m.to_dict()) == m
    assert parse_options({"structure": "matrix"}) == MatrixOptions()


@pytest.mark.parametrize("raw, match", [
    ({"structure": "tensor"}, r"structure: structure must be one of matrix, attention"),
    ({"structure": "matrix", "form": ["graph"]}, r"form: unknown key 'form'.*valid keys"),
    ({"structure": "matrix", "forms": ["svd"]}, r"forms\[0\]: unknown form 'svd'"),
    ({"structure": "matrix", "max_blocks": 6}, r"max_blocks: max_blocks must be a power of two"),
    ({"structure": "matrix", "ranks": [8, 2]}, r"ranks: ranks: lo <= hi must hold"),
    ({"structure": "attention", "windows": [3, 8]}, r"windows\[0\]: .*power of two"),
    ({"structure": "attention", "heads": []}, r"heads: heads must be a non-empty list"),
    ({"structure": "attention", "score": {"cores": 0}}, r"score.cores: cores must be an integer"),
])
def test_options_errors_name_the_field(raw, match):
    with pytest.raises(SpecError, match=match):
        parse_options(raw, ("space", "attention"))


# ---- contraction graphs ----------------------------------------------------------------------


PRESETS = {
    "dense": ({"dense": {}}, P.dense(64, 64)),
    "low_rank": ({"low_rank": {"rank": 8}}, P.low_rank(64, 64, 8)),
    "low_rank_1": ({"low_rank": {"rank": 1}}, P.low_rank(64, 64, 1)),
    "kronecker": ({"kronecker": {}}, P.kronecker([8, 8], [8, 8])),
    "monarch": ({"monarch": {}}, P.btt([8, 8], [8, 8], 1)),
    "btt": ({"btt": {"rank": 2, "in_factors": [4, 16]}}, P.btt([4, 16], [8, 8], 2)),
    "tensor_train": ({"tensor_train": {"cores": 3, "ranks": [2, 3]}},
                     P.tensor_train([4, 4, 4], [4, 4, 4], [2, 3])),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_graph_reaches_preset_with_its_hash(name):
    preset, rel = PRESETS[name]
    btc = sample_graph(FixedTrial(P.at("s", rel)), "s", GRAPH, 64, 64)
    sampled = MatrixSpec.from_dict({"btc": btc}, (), 64, 64)
    assert sampled.hash() == MatrixSpec.from_dict(preset, (), 64, 64).hash()


def test_random_graphs_are_valid_connected_and_run():
    shapes = [(64, 64), (64, 256), (256, 64), (32, 48), (7, 12)]
    for i, trial in enumerate(_random_trials(150)):
        n, m = shapes[i % len(shapes)]
        d = sample_graph(trial, "s", GRAPH, n, m)
        btc = BTC.from_dict(d)  # validates: connected, every axis used, bonds on 2 cores
        assert (btc.n_in, btc.n_out) == (n, m)
        assert all(s > 1 for _, s in btc.in_axes + btc.out_axes) or min(n, m) == 1
        assert len(btc.cores) <= GRAPH.cores
        if i < 15:
            lin = StructuredLinear(MatrixSpec.from_dict({"btc": d}, (), n, m))
            x = torch.randn(3, n)
            torch.testing.assert_close(lin(x), x @ lin.materialize().T, rtol=1e-4, atol=1e-5)


def test_merge_axes_joins_neighbours_on_the_same_cores():
    assert merge_axes([2, 4, 8], [[0], [0], [1]]) == ([8, 8], [[0], [1]])
    assert merge_axes([2, 4, 8], [[0], [1], [0]]) == ([2, 4, 8], [[0], [1], [0]])
    # one core holding factorized axes is dense, with dense's hash
    rel = P.graph([4, 16], [8, 8], [], [], [])
    d = sample_graph(FixedTrial(P.at("s", rel)), "s", GRAPH, 64, 64)
    assert MatrixSpec.from_dict({"btc": d}, (), 64, 64).hash() == MatrixSpec.from_dict(
        {"dense": {}}, (), 64, 64).hash()


# ---- theta and feature levels ----------------------------------------------------------------


def test_theta_exponents_sum_to_one_and_build():
    for i, trial in enumerate(_random_trials(100, seed=1)):
        t = sample_theta(trial, "m")
        assert abs(sum(t[:3]) - 1) < 0.01 and abs(sum(t[3:6]) - 1) < 0.01
        assert all(0 <= v <= 1 for v in t)
        n, m = [(64, 256), (256, 64), (48, 48)][i % 3]
        MatrixSpec.from_dict({"theta": {"exponents": t}}, (), n, m)


def test_theta_reaches_monarch_exponents():
    params = {"m.theta.alpha": 0.5, "m.theta.beta_share": 0.0, "m.theta.delta": 0.0,
              "m.theta.epsilon_share": 0.5, "m.theta.rho": 0.0}
    assert sample_theta(FixedTrial(params), "m") == [0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0]


def test_matrix_forms_and_feature_levels():
    opts = MatrixOptions(forms=("dense", "theta"))
    assert sample_matrix(FixedTrial({"m.form": "dense"}), "m", opts, 64, 256) == {"dense": {}}
    # MLR over features: levels of low rank with 1, 2, 4, 8 blocks = the mlr preset
    opts = MatrixOptions(feature_levels=4, max_blocks=8, ranks=(1, 64))
    levels = [(k, P.low_rank(64 >> k, 64 >> k, r)) for k, r in enumerate([4, 2, 1, 1])]
    d = sample_matrix(FixedTrial(P.at("m", P.matrix(levels))), "m", opts, 64, 64)
    mlr = {"mlr": {"ranks": [4, 2, 1, 1], "blocks": [1, 2, 4, 8]}}
    assert MatrixSpec.from_dict(d, (), 64, 64).hash() == MatrixSpec.from_dict(
        mlr, (), 64, 64).hash()


def test_feature_level_blocks_always_divide():
    opts = MatrixOptions(forms=("graph", "theta", "dense"), feature_levels=3, max_blocks=16)
    for i, trial in enumerate(_random_trials(80, seed=2)):
        n, m = [(48, 48), (64, 256), (24, 40)][i % 3]
        spec = MatrixSpec.from_dict(sample_matrix(trial, "m", opts, n, m), (), n, m)
        assert all(n % lv.blocks == 0 and m % lv.blocks == 0 for lv in spec.levels)


# ---- attention: head groups, sequence levels, windows ----------------------------------------


def test_split_heads_sums_and_gives_each_group_one():
    for heads in (1, 2, 3, 8):
        for groups in range(1, heads + 1):
            for u in (0.0, 0.3, 0.99, 1.0):
                params = {f"a.g{g}.share": u for g in range(groups)}
                parts = split_heads(FixedTrial(params), "a", heads, groups)
                assert sum(parts) == heads and min(parts) >= 1 and len(parts) == groups


def test_sampled_attention_always_builds_a_model():
    """The valid-proposal fraction of the attention distribution (issue 11 asks >= 90%)."""
    opts = AttentionOptions()
    built = 0
    cases = [(64, 64), (32, 64), (64, 48), (48, 128)]
    for i, trial in enumerate(_random_trials(120, seed=3)):
        width, T = cases[i % len(cases)]
        a = sample_attention(trial, "attention", opts, width, T)
        spec = ModelSpec.from_dict({"width": width, "depth": 1, "attention": a,
                                    "max_seq_len": T})
        built += 1
        for g in spec.layers[0].groups:
            sizes = [lv.block_size for lv in g.levels]
            assert sizes[0] is None
            assert all(b < T and (p or T) % b == 0 for p, b in zip(sizes, sizes[1:], strict=False))
    assert built == 120


def test_mixed_groups_and_windows():
    sc = P.matrix([(0, P.low_rank(64, 64, 16))])
    params = P.at("attention", P.attention(4, [P.group([(0, sc)]),
                                               P.group([(0, sc)], local=True, window_log2=3)],
                                           shares=(0.4,)))
    a = sample_attention(FixedTrial(params), "attention", AttentionOptions(), 64, 64)
    assert [g["heads"] for g in a["groups"]] == [2, 2]
    assert a["groups"][1]["window"] == 8 and "window" not in a["groups"][0]
    assert a["family"] == "global_window"


def test_heads_that_do_not_divide_width_are_repaired():
    opts = AttentionOptions(heads=(2, 3), groups=1, sequence_levels=1, windows=None,
                            score=MatrixOptions(cores=1, axes=1))
    a = sample_attention(FixedTrial({"a.heads": 3, "a.g0.l0.score.cores": 1}), "a", opts, 64, 64)
    assert a["groups"][0]["heads"] == 2
    assert math.gcd(64, a["groups"][0]["heads"]) == 2
