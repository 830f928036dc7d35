"""Named families are points of the shipped neutral spaces (issue 11, item 2).

Each family is one parameter assignment (``optuna.trial.FixedTrial``) of a shipped neutral
space; the model it builds has the same canonical hash as the model written with the preset.
"""

from __future__ import annotations

import functools
from pathlib import Path

import _structure_params as P
import optuna
import pytest

from mlbtc_search.model import ModelSpec
from studies.space import PreparedSpace, load_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = {"mlbtc_icl": ("attention", 2), "mlbtc_text": ("layers.0", 1)}  # where, depth

D = 64


def _score(*levels: tuple[int, dict]) -> dict:
    return P.matrix(list(levels))


def _one(rel: dict) -> dict:
    return _score((0, rel))


def _global(heads: int, score: dict) -> dict:
    return P.attention(heads, [P.group([(0, score)])])


FAMILIES = {
    "standard": ({"kind": "standard", "heads": 4}, _global(4, _one(P.low_rank(D, D, 16)))),
    "low_rank": ({"kind": "standard", "heads": 4, "head_dim": 4},
                 _global(4, _one(P.low_rank(D, D, 4)))),
    "dense": ({"kind": "general", "groups": [{"heads": 2, "levels": [{"score": "dense"}]}]},
              _global(2, _one(P.dense(D, D)))),
    "kronecker": ({"kind": "general", "groups": [{"heads": 2, "levels": [
        {"score": {"kronecker": {}}}]}]}, _global(2, _one(P.kronecker([8, 8], [8, 8])))),
    "monarch": ({"kind": "general", "groups": [{"heads": 8, "levels": [
        {"score": {"monarch": {}}}]}]}, _global(8, _one(P.btt([8, 8], [8, 8], 1)))),
    "btt": ({"kind": "bilinear_btt", "heads": 8, "rank": 2},
            _global(8, _one(P.btt([8, 8], [8, 8], 2)))),
    "tensor_train": ({"kind": "general", "groups": [{"heads": 1, "levels": [
        {"score": {"tensor_train": {"cores": 3, "ranks": [2, 2]}}}]}]},
        _global(1, _one(P.tensor_train([4, 4, 4], [4, 4, 4], [2, 2])))),
    "bilinear_mlr": ({"kind": "bilinear_mlr", "heads": 8, "ranks": [4, 2, 1, 1]},
                     _global(8, _score(*[(k, P.low_rank(D >> k, D >> k, r))
                                         for k, r in enumerate([4, 2, 1, 1])]))),
    "mlr": ({"kind": "mlr", "heads": 8, "ranks": [4, 2, 1, 1]},
            P.attention(8, [P.group([(1, _one(P.low_rank(D, D, r))) for r in (4, 2, 1, 1)])])),
    "sliding_window": ({"kind": "sliding_window", "heads": 4, "window": 16},
                       P.attention(4, [P.group([(0, _one(P.low_rank(D, D, 16)))], local=True,
                                               window_log2=4)])),
}


@functools.cache
def _space(name: str) -> PreparedSpace:
    return load_space(ROOT / "search_spaces" / f"{name}.yaml").prepare()


@pytest.mark.filterwarnings("error:The value .* is out of the range:UserWarning")
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_named_family_is_a_point_of_the_neutral_space(space, family):
    preset, rel = FAMILIES[family]
    where, depth = SPACES[space]
    params = {**P.at(where, rel), "mlp.form": "dense", "depth": depth, "width": D,
              "train.lr": 3e-3}
    if space == "mlbtc_icl":
        params.pop("width")  # fixed at 64 in that space
    cand = _space(space).sample(optuna.trial.FixedTrial(params))
    assert cand.spec is not None, cand.error
    got = cand.spec
    want = ModelSpec.from_dict({"width": D, "depth": depth, "attention": preset,
                                "mlp": {"dense": {}}}, adapter=got.adapter,
                               seq_len=got.max_seq_len)
    assert got.hash() == want.hash()
    assert set(cand.params) >= set(params)  # every given parameter was used
    assert got.layers[0].kind == want.layers[0].kind or want.layers[0].kind == "general"


def test_text_space_reaches_graph_mlps_with_their_preset_hashes():
    """The MLP's ``graph`` form: a BTT up projection and a low-rank down projection."""
    hidden = 4 * D
    params = {**P.at("layers.0", FAMILIES["standard"][1]), "depth": 1, "width": D,
              "train.lr": 3e-3, "mlp.form": "graph",
              **P.at("mlp.up", P.btt([8, 8], [16, 16], 2)),
              **P.at("mlp.down", P.low_rank(hidden, D, 16))}
    cand = _space("mlbtc_text").sample(optuna.trial.FixedTrial(params))
    assert cand.spec is not None, cand.error
    want = ModelSpec.from_dict({"width": D, "depth": 1, "attention": FAMILIES["standard"][0],
                                "mlp": {"up": {"btt": {"rank": 2}},
                                        "down": {"low_rank": {"rank": 16}}}},
                               adapter=cand.spec.adapter, seq_len=cand.spec.max_seq_len)
    assert cand.spec.hash() == want.hash()
    assert set(cand.params) >= set(params)


def test_text_space_proposals_build_valid_models():
    """The valid-proposal fraction of mlbtc_text.yaml (issue 11 asks >= 90%), graph MLPs
    included."""
    space = _space("mlbtc_text")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    built = graphs = 0
    n = 40
    for _ in range(n):
        trial = study.ask()
        cand = space.sample(trial)
        built += cand.spec is not None
        graphs += cand.params.get("mlp.form") == "graph" and cand.spec is not None
        study.tell(trial, 0.0)
    assert built >= 0.9 * n and graphs >= 5, (built, graphs)
