"""PED-ANOVA importances over parameters and descriptors (studies.importance)."""

from __future__ import annotations

import optuna

from studies.importance import descriptor_importances, format_importances, param_importances

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(n: int) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(t: optuna.Trial) -> tuple[float, float]:
        kind = t.suggest_categorical("kind", ["a", "b"])
        x = t.suggest_float("x", 0.0, 1.0)
        noise = t.suggest_float("noise", 0.0, 1.0)
        rank = t.suggest_int("rank", 1, 8) if kind == "a" else 1  # conditional
        return 10 * x + 0.01 * noise, float(rank)

    study.optimize(objective, n_trials=n)
    return study


def test_param_importances_find_the_parameter_that_matters():
    imp = param_importances(_study(40), ["val_loss", "flops_per_token"])
    assert set(imp) == {"val_loss", "flops_per_token"}
    loss = imp["val_loss"]
    assert max(loss, key=loss.get) == "x" and loss["x"] > 0.5
    assert abs(sum(loss.values()) - 1) < 1e-6
    assert "rank" in imp["flops_per_token"]  # conditional parameters are kept
    text = format_importances(imp, top=2)
    assert "for val_loss:" in text and text.count("\n") == 6


def test_too_few_trials_say_so():
    assert param_importances(_study(2), ["val_loss", "flops_per_token"]) == {}
    assert "not enough completed trials" in format_importances({})


def test_descriptor_importances():
    values = [(float(w) + 0.01 * i, 100.0 * c) for i, (w, c) in
              enumerate((w, c) for w in range(1, 6) for c in (1, 2, 3, 4))]
    descs = [{"qk_width": float(w), "cores": float(c), "constant": 1.0}
             for w in range(1, 6) for c in (1, 2, 3, 4)]
    imp = descriptor_importances(values, descs, ["val_loss", "flops_per_token"])
    assert max(imp["val_loss"], key=imp["val_loss"].get) == "qk_width"
    assert max(imp["flops_per_token"], key=imp["flops_per_token"].get) == "cores"
    assert "constant" not in imp["val_loss"]  # a descriptor that never varies says nothing


def test_feature_importances_take_categories_and_missing_values():
    values = [(1.0 + (i % 2), float(i)) for i in range(12)]
    feats = [{"kind": ["a", "b"][i % 2], "n": float(i)} | ({"opt": i % 3} if i % 3 else {})
             for i in range(12)]
    imp = descriptor_importances(values, feats, ["val_loss", "flops_per_token"])
    assert max(imp["val_loss"], key=imp["val_loss"].get) == "kind"
    assert set(imp["flops_per_token"]) == {"kind", "n", "opt"}  # a missing value is a regime
