"""Named families are points of the shipped neutral spaces (issue 11, item 2).

Each family is one parameter assignment (``optuna.trial.FixedTrial``) of a shipped neutral
space; the model it builds has the same canonical hash as the model written with the preset.
"""

from __future__ import annotations

from pathlib import Path

import _structure_params as P
import optuna
import pytest
import yaml

from mlbtc_search.model import ModelSpec
from studies.structures import parse_options, sample_attention, sample_matrix

ROOT = Path(__file__).resolve().parents[2]
SPACES = {"mlbtc_icl": ("attention", 64, 64), "mlbtc_text": ("layers.0", 64, 64)}

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


def _space(name: str) -> dict:
    return yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())["space"]


def _sample(name: str, params: dict) -> ModelSpec:
    raw = _space(name)
    where, width, T = SPACES[name]
    trial = optuna.trial.FixedTrial(params)
    attn_raw = raw["attention"] if where == "attention" else raw["layers"]["per_layer"]
    attn = sample_attention(trial, where, parse_options(attn_raw), width, T)
    mlp = sample_matrix(trial, "mlp", parse_options(raw["mlp"]), width, 4 * width)
    return ModelSpec.from_dict({"width": width, "depth": 1, "attention": attn, "mlp": mlp,
                                "max_seq_len": T})


@pytest.mark.filterwarnings("error:The value .* is out of the range:UserWarning")
@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_named_family_is_a_point_of_the_neutral_space(space, family):
    preset, rel = FAMILIES[family]
    where = SPACES[space][0]
    params = {**P.at(where, rel), "mlp.form": "dense"}
    got = _sample(space, params)
    want = ModelSpec.from_dict({"width": D, "depth": 1, "attention": preset,
                                "mlp": {"dense": {}}, "max_seq_len": 64})
    assert got.hash() == want.hash()
    assert got.layers[0].kind == want.layers[0].kind or want.layers[0].kind == "general"
