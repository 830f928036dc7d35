"""Structure leaves in the search-space DSL: where they stand, when, per_layer, replay, errors."""

from __future__ import annotations

import optuna
import pytest

from mlbtc_search.errors import SpecError
from studies.space import PreparedSpace, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

MATRIX = {"structure": "matrix", "forms": ["graph", "theta"], "cores": 2, "axes": 2}


def _space(space: dict, **top) -> PreparedSpace:
    return SearchSpace.from_dict({"task": {"name": "icl_regression", "options": {"n_dims": 4}},
                                  "budget": 2e9, "space": space, **top}).prepare()


def _samples(space: PreparedSpace, n: int = 12):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        yield trial, space.sample(trial)
        study.tell(trial, 0.0)


def test_matrix_structure_in_score_value_and_conditional_mlp():
    space = _space({
        "width": 32, "depth": {"int": [1, 2]},
        "attention": {"kind": "general", "value": {**MATRIX, "forms": ["theta"]},
                      "groups": [{"heads": 2, "levels": [{"score": MATRIX}]}]},
        "mlp": {"structure": "matrix", "forms": ["theta"], "when": {"/depth": 2}},
    })
    seen = set()
    for trial, cand in _samples(space):
        assert cand.spec is not None, cand.error
        seen.add(cand.model["depth"])
        assert ("mlp.theta.alpha" in cand.params) == (cand.model["depth"] == 2)
        assert "mlp" not in cand.model or cand.model["depth"] == 2
        assert any(k.startswith("attention.groups.0.levels.0.score.") for k in cand.params)
        assert "attention.value.theta.rho" in cand.params
        replay = space.sample(optuna.trial.FixedTrial(trial.params))
        assert replay.spec.hash() == cand.spec.hash() and replay.params == cand.params
    assert seen == {1, 2}


def test_mlp_graph_form_samples_an_up_and_a_down_graph():
    space = _space({"width": 32, "attention": "standard", "mlp_ratio": {"choice": [2, 4]},
                    "mlp": {"structure": "matrix", "forms": ["dense", "graph"], "cores": 3,
                            "axes": 2, "feature_levels": 2, "max_blocks": 4}})
    forms = set()
    for trial, cand in _samples(space, 16):
        assert cand.spec is not None, cand.error
        form = cand.params["mlp.form"]
        forms.add(form)
        hidden = 32 * cand.model["mlp_ratio"]
        up, down = cand.spec.mlp_up, cand.spec.mlp_down
        assert (up.n_in, up.n_out, down.n_in, down.n_out) == (32, hidden, hidden, 32)
        if form == "graph":
            assert set(cand.model["mlp"]) == {"up", "down"}
            assert {"mlp.up.levels", "mlp.down.levels"} <= set(cand.params)
        else:
            levels = cand.model["mlp"].get("levels", [cand.model["mlp"]])
            assert all("dense" in lv for lv in levels) and not any(
                k.startswith(("mlp.up", "mlp.down")) for k in cand.params)
        replay = space.sample(optuna.trial.FixedTrial(trial.params))
        assert replay.spec.hash() == cand.spec.hash() and replay.params == cand.params
    assert forms == {"dense", "graph"}


def test_per_layer_attention_structures_have_their_own_parameters():
    space = _space({"width": 32, "depth": 3,
                    "layers": {"per_layer": {"structure": "attention", "heads": [2, 4]}}})
    for _, cand in _samples(space, 4):
        assert cand.spec is not None, cand.error
        assert {"layers.0.heads", "layers.1.heads", "layers.2.heads"} <= set(cand.params)
        assert len(cand.spec.layers) == 3


@pytest.mark.parametrize("space, match", [
    ({"width": 32, "mlp": {"structure": "attention"}},
     r"space.mlp.structure: structure: attention stands for one layer's attention"),
    ({"width": 32, "attention": {"structure": "matrix"}},
     r"space.attention.structure: structure: matrix stands where a matrix spec stands"),
    ({"width": 32, "attention": {"structure": "attention", "groups": 0}},
     r"space.attention.groups: groups must be an integer >= 1"),
    ({"width": 32, "depth": {"int": [1, 2]}, "attention": {"structure": "attention"},
      "mlp": {"choice": [{"dense": {}}], "when": {"/attention": "standard"}}},
     r"'standard' is not a possible value of attention \(structure attention"),
])
def test_structure_errors_name_the_field(space, match):
    with pytest.raises(SpecError, match=match):
        _space(space)


def test_a_baseline_cannot_fix_a_structure_leaf():
    with pytest.raises(SpecError, match=r"baselines\[0\].attention: .* is not in the "
                                        r"distribution structure attention"):
        _space({"width": 32, "attention": {"structure": "attention"}},
               baselines=[{"attention": {"kind": "standard", "heads": 4}}])
