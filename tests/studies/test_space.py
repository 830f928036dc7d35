"""Search-space YAML -> SearchSpace -> define-by-run sampling (studies.space, studies.sampling)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from mlbtc_search.errors import SpecError, UsageError
from mlbtc_search.model import kv_cache_bytes, model_flops, model_params
from studies.space import (
    Candidate,
    PreparedSpace,
    SearchSpace,
    load_space,
    make_sampler,
    model_costs,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)

# One key per line (space: last), so a test can swap a section and know its line.
BASE = {
    "name": "tiny",
    "task": "{name: icl_regression, options: {n_dims: 4}}",
    "budget": "2e9",
    "objectives": "[val_loss, flops_per_token]",
    "sampler": "{name: tpe, seed: 0}",
    "trials": "4",
    "train": "{batch_size: 8}",
    "constraints": "{max_flops: 1.0e6}",
    "baselines": "[{attention.kind: standard, attention.heads: 4, mlp: {dense: {}}}]",
    "space": """
  width: 16
  depth: {int: [1, 2]}
  attention:
    kind: {choice: [standard, bilinear_btt, mlr]}
    heads: {choice: [2, 4]}
    rank: {int: [1, 2], when: {kind: bilinear_btt}}
    ranks: {choice: [[2, 1], [1, 1]], when: {kind: mlr}}
  mlp: {choice: [{dense: {}}, {btt: {rank: 1}}]}
  train.lr: {float: [1.0e-4, 1.0e-2], log: true}""",
}


def write(tmp_path: Path, filename: str = "space.yaml", **sections: str | None) -> Path:
    """BASE with some top-level sections replaced (None drops one); returns the file."""
    keys = {**BASE, **sections}
    text = "".join(f"{k}: {v}\n" for k, v in keys.items() if v is not None and k != "space")
    if keys.get("space") is not None:
        text += f"space:{keys['space']}\n"
    path = tmp_path / filename
    path.write_text(text)
    return path


def line_of(path: Path, prefix: str) -> int:
    """1-based number of the first line of ``path`` that starts with ``prefix``."""
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.lstrip().startswith(prefix))


def prepared(path: Path, overrides: dict | None = None) -> PreparedSpace:
    """Both steps: parse (pure) then prepare (task, sampler, baselines, dry run)."""
    return load_space(path, overrides).prepare()


def random_candidates(space: PreparedSpace, n: int = 20, seed: int = 0
                      ) -> list[tuple[optuna.trial.Trial, Candidate]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, space.sample(trial)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> PreparedSpace:
    return prepared(write(tmp_path_factory.mktemp("tiny")))


# ---- shipped spaces -------------------------------------------------------------------------


def test_every_shipped_space_is_listed():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "icl_regression", "text_lm", "timeseries"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_loads_and_samples(path: Path):
    space = prepared(path)
    assert space.name == path.stem
    assert space.objectives[:2] == ("val_loss", "flops_per_token")
    candidates = [c for _, c in random_candidates(space)]
    assert any(c.feasible for c in candidates)
    for c in candidates:
        assert (c.spec is not None) or (c.reason and c.error)
        assert c.feasible == (c.reason is None)
        if c.spec is not None:
            assert c.spec.max_seq_len == c.model["max_seq_len"]
            assert c.flops_per_token == model_flops(c.spec)
    for baseline in space.baselines:  # every shipped baseline is a full, feasible assignment
        c = space.sample(optuna.trial.FixedTrial(space.fixed_params(baseline)))
        assert c.feasible, c.reason


def test_quickstart_is_small():
    space = prepared(ROOT / "search_spaces" / "quickstart.yaml")
    assert space.task["name"] == "text" and space.trials <= 12 and space.workers == 2
    families = {space.sample(optuna.trial.FixedTrial(space.fixed_params(b))).spec.family
                for b in space.baselines}
    assert families == {"standard", "mlr"}


# ---- sampling ---------------------------------------------------------------------------------


def test_param_names_are_yaml_paths(tiny: PreparedSpace):
    assert tiny.param_names == ["depth", "attention.kind", "attention.heads", "attention.rank",
                                "attention.ranks", "mlp", "train.lr"]
    for trial, c in random_candidates(tiny):
        assert set(trial.params) <= set(tiny.param_names)
        assert trial.params == c.params
        assert c.model["attention"]["kind"] == trial.params["attention.kind"]
        assert c.train == {"lr": trial.params["train.lr"], "batch_size": 8}
        assert "train" not in c.model and c.model["max_seq_len"] == 16


def test_when_false_params_are_not_suggested(tiny: PreparedSpace):
    kinds = set()
    for trial, c in random_candidates(tiny, n=30):
        kind = trial.params["attention.kind"]
        kinds.add(kind)
        assert ("attention.rank" in trial.params) == (kind == "bilinear_btt")
        assert ("attention.ranks" in trial.params) == (kind == "mlr")
        assert ("rank" in c.model["attention"]) == (kind == "bilinear_btt")
        assert ("ranks" in c.model["attention"]) == (kind == "mlr")
    assert kinds == {"standard", "bilinear_btt", "mlr"}


def test_absolute_when_and_per_layer(tmp_path: Path):
    space = prepared(write(tmp_path, baselines="[]", space="""
  width: 16
  depth: {int: [1, 3]}
  layers:
    per_layer:
      kind: {choice: [standard, sliding_window]}
      heads: {fixed: 2, when: {/depth: [2, 3]}}
      window: {choice: [4, 8], when: {kind: sliding_window}}"""))
    seen = set()
    for trial, c in random_candidates(space, n=30):
        depth = trial.params["depth"]
        seen.add(depth)
        assert len(c.model["layers"]) == depth
        for i in range(3):
            assert (f"layers.{i}.kind" in trial.params) == (i < depth)
        for i, layer in enumerate(c.model["layers"]):
            assert ("heads" in layer) == (depth >= 2)
            sliding = trial.params[f"layers.{i}.kind"] == "sliding_window"
            assert (f"layers.{i}.window" in trial.params) == sliding
        assert c.feasible, c.reason
    assert seen == {1, 2, 3}


def test_replay_with_fixed_trial_gives_the_same_model(tiny: PreparedSpace):
    for trial, c in random_candidates(tiny):
        again = tiny.sample(optuna.trial.FixedTrial(trial.params))
        assert again.model == c.model and again.train == c.train and again.params == c.params
        assert again.spec.hash() == c.spec.hash()


def test_non_primitive_choices_are_canonical_json(tiny: PreparedSpace, tmp_path: Path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        tiny.sample(study.ask())
    dist = study.trials[0].distributions["mlp"]
    assert dist.choices == ('{"dense":{}}', '{"btt":{"rank":1}}')
    # the same space written with dotted keys: same parameters, same distributions, same hash
    dotted = prepared(write(tmp_path, space="""
  width: 16
  depth: {int: [1, 2]}
  attention.kind: {choice: [standard, bilinear_btt, mlr]}
  attention.heads: {choice: [2, 4]}
  attention.rank: {int: [1, 2], when: {kind: bilinear_btt}}
  attention.ranks: {choice: [[2, 1], [1, 1]], when: {kind: mlr}}
  mlp: {choice: [{dense: {}}, {btt: {rank: 1}}]}
  train: {lr: {float: [1.0e-4, 1.0e-2], log: true}}"""))
    assert dotted.hash() == tiny.hash()
    for trial in study.trials:
        c = dotted.sample(optuna.trial.FixedTrial(trial.params))
        for name, d in trial.distributions.items():
            optuna.distributions.check_distribution_compatibility(d, d)
            assert name in c.params


def test_baselines_enqueue_and_sample_the_baseline(tiny: PreparedSpace, tmp_path: Path):
    assert tiny.baselines == ({"attention.kind": "standard", "attention.heads": 4,
                               "mlp": {"dense": {}}},)
    fixed = tiny.fixed_params({"attention": {"kind": "bilinear_btt", "heads": 2, "rank": 2},
                               "mlp": {"btt": {"rank": 1}}, "depth": 2, "train.lr": 1e-3})
    assert fixed == {"attention.kind": "bilinear_btt", "attention.heads": 2, "attention.rank": 2,
                     "mlp": '{"btt":{"rank":1}}', "depth": 2, "train.lr": 1e-3}
    study = optuna.create_study(sampler=make_sampler(tiny), directions=["minimize"] * 2)
    study.enqueue_trial(tiny.fixed_params(tiny.baselines[0]))
    study.enqueue_trial(fixed)
    first, second = tiny.sample(study.ask()), tiny.sample(study.ask())
    assert first.model["attention"] == {"kind": "standard", "heads": 4}
    assert first.model["mlp"] == {"dense": {}}
    assert second.model["attention"] == {"kind": "bilinear_btt", "heads": 2, "rank": 2}
    assert second.model["depth"] == 2 and second.train["lr"] == 1e-3


def test_invalid_architecture_is_infeasible_not_an_error(tiny: PreparedSpace, tmp_path: Path):
    c = tiny.sample(optuna.trial.FixedTrial(
        {"depth": 1, "attention.kind": "mlr", "attention.heads": 4, "attention.ranks": "[2,1]",
         "mlp": '{"dense":{}}', "train.lr": 1e-3}))
    assert c.feasible and c.error is None
    space = prepared(write(tmp_path, baselines="[]", space="""
  width: 16
  attention: {kind: standard, heads: {choice: [3, 4]}}"""))
    bad = space.sample(optuna.trial.FixedTrial({"attention.heads": 3}))
    assert bad.spec is None and not bad.feasible and bad.flops_per_token is None
    assert re.fullmatch(r"at attention\.heads: heads must divide width=16, got heads=3", bad.error)
    assert bad.reason == bad.error


def test_constraints_make_candidates_infeasible(tmp_path: Path):
    space = prepared(write(tmp_path, constraints="{max_flops: 1.0e4, max_params: 4000}",
                             baselines="[]"))
    reasons = [c.reason for _, c in random_candidates(space) if c.spec is not None]
    assert any(r and re.fullmatch(r"flops_per_token [\d.e+]+ > max_flops 1e\+04(; .*)?", r)
               for r in reasons)
    assert any(r and re.search(r"params \d+ > max_params 4000", r) for r in reasons)
    for _, c in random_candidates(space):
        if c.spec is not None:
            over = c.flops_per_token > 1e4 or c.params_count > 4000
            assert c.feasible == (not over)


def test_model_costs_agree_with_the_core(tiny: PreparedSpace):
    for _, c in random_candidates(tiny, n=5):
        assert model_costs(c.spec) == (model_flops(c.spec), model_params(c.spec),
                                       kv_cache_bytes(c.spec))
        assert (c.flops_per_token, c.params_count, c.kv_cache_bytes) == model_costs(c.spec)


def test_tpe_study_runs_on_a_conditional_space(tiny: PreparedSpace):
    study = optuna.create_study(sampler=make_sampler(tiny), directions=["minimize"] * 2)

    def objective(trial):
        c = tiny.sample(trial)
        return c.params_count / 1e4, c.flops_per_token

    study.optimize(objective, n_trials=12)
    assert len(study.trials) == 12
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler),
                                       ("nsga2", optuna.samplers.NSGAIISampler),
                                       ("gp", optuna.samplers.GPSampler),
                                       ("random", optuna.samplers.RandomSampler)])
def test_make_sampler(tmp_path: Path, name: str, cls: type):
    space = prepared(write(tmp_path, sampler=f"{{name: {name}, seed: 3}}"))
    assert isinstance(make_sampler(space), cls)
    assert space.sampler == {"name": name, "seed": 3}


# ---- settings, precedence, round trip ------------------------------------------------------


def test_defaults_and_number_strings(tmp_path: Path):
    space = prepared(write(tmp_path, filename="my_study.yaml", **{"name": None, "trials": None}))
    assert space.name == "my_study"  # default: the file name
    assert (space.trials, space.workers, space.seed, space.storage) == (20, 1, 0, None)
    assert space.resources == {"cpus": 1.0, "gpus": 0.0}
    assert space.budget_flops == 2e9  # 2e9 is a float (YAML 1.1 would read it as text)
    nums = prepared(write(tmp_path, constraints="{max_params: 1e6}", sampler=None,
                            train="{batch_size: 8, weight_decay: 1e-2}"))
    assert nums.constraints == {"max_flops": None, "max_params": 1000000}
    assert nums.train == {"batch_size": 8, "weight_decay": 0.01}
    assert nums.sampler == {"name": "tpe", "seed": 0}


def test_precedence_cli_over_file_over_default(tmp_path: Path):
    path = write(tmp_path, storage="sqlite:///file.db")
    space = prepared(path, {"trials": 9, "workers": None, "name": "cli", "storage": None})
    assert (space.trials, space.workers, space.name, space.storage) == (
        9, 1, "cli", "sqlite:///file.db")
    space = prepared(path, {"storage": "postgresql://u:secret@h/db", "workers": 3})
    assert (space.trials, space.workers, space.storage) == (4, 3, "postgresql://u:secret@h/db")
    assert space.to_dict()["storage"] == "postgresql://u:***@h/db"
    with pytest.raises(UsageError, match=r"--trials must be an integer >= 1, got 0"):
        prepared(path, {"trials": 0})
    with pytest.raises(UsageError, match=r"unknown override 'seed'"):
        prepared(path, {"seed": 1})
    space = prepared(path, {"budget": 1e9, "seeds": 3})  # mlbtc search --budget --seeds
    assert (space.budget_flops, space.seeds) == (1e9, 3)
    with pytest.raises(UsageError, match=r"--budget must be a positive number of FLOPs"):
        prepared(path, {"budget": -1.0})


def test_to_dict_round_trips(tiny: PreparedSpace):
    d = tiny.to_dict()
    again = SearchSpace.from_dict(d)
    assert again.to_dict() == d and again.hash() == tiny.hash()
    assert d["space"]["train"] == {"lr": {"float": [1e-4, 1e-2], "log": True}}
    assert d["budget"] == 2e9 and d["constraints"] == {"max_flops": 1e6, "max_params": None}


def test_parsing_is_pure_and_prepare_is_the_second_step(tmp_path: Path):
    path = write(tmp_path, task="{name: text, options: {path: missing.txt}}")
    space = load_space(path)  # the task's data are not read yet
    assert isinstance(space, SearchSpace) and space.task["options"] == {"path": "missing.txt"}
    assert space == load_space(path) and space.param_names[0] == "depth"
    with pytest.raises(UsageError, match=r"text data path 'missing.txt' does not exist"):
        space.prepare()
    bad = write(tmp_path, "bad.yaml", task="{name: icl_regression, options: {n_dims: 0}}")
    with pytest.raises(SpecError, match=rf"^at {re.escape(str(bad))}:2 task\.options\.n_dims: "):
        load_space(bad).prepare()
    ready = load_space(write(tmp_path)).prepare()
    assert ready.prepare() is ready and ready.space.prepare() == ready  # idempotent, pure
    assert (ready.adapter.input_dim, ready.seq_len) == (4, 16)
    assert ready.name == "tiny" and ready.to_dict() == ready.space.to_dict()


def test_direct_construction_needs_normalized_settings():
    from studies.settings import resolve_settings

    d = resolve_settings({"task": "icl_regression", "budget": 1e9, "space": {"width": 16}},
                         None, "s")
    d["baselines"] = tuple(d["baselines"])
    with pytest.raises(SpecError, match=r"SearchSpace needs normalized settings"):
        SearchSpace(**d)


def test_missing_file_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match="file not found"):
        prepared(tmp_path / "nope.yaml")


# ---- bad input: SpecError with file:line and the key path -----------------------------------

SPACE_HEADS = """
  width: 16
  attention:
    kind: {choice: [standard, bilinear_btt]}
    heads: HEADS
    rank: {int: [1, 2], when: {kind: bilinear_btt}}"""

BAD = [
    ({"budgett": "1e9"}, "budgett", r"budgett: unknown key 'budgett'; valid keys: name, task"),
    ({"trials": "many"}, "trials", r"trials: trials must be an integer >= 1, got 'many'"),
    ({"budget": "-5"}, "budget", r"budget: budget must be a positive number"),
    ({"budget": None}, None, r"budget: missing required key 'budget'"),
    ({"task": "{name: icl, options: {}}"}, "task", r"task\.name: unknown task 'icl'"),
    ({"task": "{name: icl_regression, options: {n_dimz: 4}}"}, "task",
     r"task\.options\.n_dimz: unknown option 'n_dimz' for task 'icl_regression'"),
    ({"sampler": "{name: cmaes}"}, "sampler",
     r"sampler\.name: unknown sampler 'cmaes'; valid samplers: tpe, nsga2, gp, random"),
    ({"sampler": "{name: tpe, population_size: 4}"}, "sampler",
     r"sampler\.population_size: unknown option 'population_size' for the tpe sampler"),
    ({"objectives": "[val_loss, flops_per_token, accuracy]"}, "objectives",
     r"objectives\[2\]: unknown objective 'accuracy'"),
    ({"objectives": "[flops_per_token, val_loss]"}, "objectives",
     r"objectives: the first two objectives must be val_loss, flops_per_token"),
    ({"train": "{lrr: 0.1}"}, "train", r"train\.lrr: unknown train option 'lrr'"),
    ({"train": "{lr: -1.0}"}, "train", r"train\.lr: lr must be a positive number"),
    ({"constraints": "{max_latency: 3}"}, "constraints",
     r"constraints\.max_latency: unknown constraint 'max_latency'"),
    ({"resources": "{cpus: 0}"}, "resources",
     r"resources\.cpus: resources\.cpus must be a finite number > 0"),
    ({"resources": "{gpus: .inf}"}, "resources",
     r"resources\.gpus: resources\.gpus must be a finite number >= 0"),
    ({"budget": "\"2e9\""}, "budget", r"budget: budget must be a positive number .*got .2e9."),
    ({"space": "\n  width: 16\n  depth: {int: [1, 1000000000]}\n  layers: {per_layer: "
               "{kind: standard}}"}, "depth:",  # refused by the depth limit, nothing built
     r"space\.depth\.int: no sampled architecture is valid .*depth must be an integer >= 1 "
     r"and <= 1024"),
    ({"baselines": "[{attention.knd: standard}]"}, "baselines",
     r"baselines\[0\]\.attention\.knd: unknown parameter 'attention\.knd'; the space has: "),
    ({"baselines": "[{attention.heads: 3}]"}, "baselines",
     r"baselines\[0\]\.attention\.heads: 3 is not in the distribution choice \[2, 4\]"),
    ({"baselines": "[{width: 32}]"}, "baselines",
     r"baselines\[0\]\.width: width is fixed to 16 in the space, got 32"),
    ({"baselines": "[{depth: 1, attention.kind: standard, attention.heads: 2, attention.rank: 1,"
                   " mlp: {dense: {}}, train.lr: 0.001}]"}, "baselines",
     r"baselines\[0\]\.attention\.rank: attention\.rank is not used by this baseline"),
    ({"space": "\n  width: 16\n  attention: {kind: standard, heads: {choice: []}}"},
     "attention", r"space\.attention\.heads\.choice: choice must be a non-empty list"),
    ({"space": "\n  width: 16\n  depth: {int: [3, 2]}\n  attention: {kind: standard}"},
     "depth", r"space\.depth\.int: lo <= hi must hold, got \[3, 2\]"),
    ({"space": "\n  width: 16\n  attention: {kind: standard}\n  train.lr: {float: [0, 1], log: "
               "true}"}, "train.lr", r"space\.train\.lr\.float: log needs lo > 0"),
    ({"space": "\n  width: 16\n  depth: {int: [1, 2], step: 2}\n  attention: {kind: standard}"},
     "depth", r"space\.depth\.int: hi - lo must be a multiple of step=2"),
    ({"space": "\n  width: 16\n  attention: {kind: standard}\n  train.momentum: 0.9"},
     "train.momentum", r"space\.train\.momentum: unknown train option 'momentum'"),
    ({"space": "\n  width: 16\n  attention: {kind: standard}\n  adapter: {}"}, "adapter",
     r"space\.adapter: adapter is set by the task, not searched"),
    ({"space": "\n  widht: 16\n  attention: {kind: standard}"}, "widht",
     r"space\.widht: unknown model key 'widht'"),
    ({"space": SPACE_HEADS.replace("kind: bilinear_btt}", "knd: bilinear_btt}")}, "rank:",
     r"space\.attention\.rank\.when\.knd: when refers to 'knd', which is not a value or "
     r"parameter of the space \(siblings: kind, heads\)"),
    ({"space": SPACE_HEADS.replace("kind: bilinear_btt}", "kind: bilinear_bt}")}, "rank:",
     r"space\.attention\.rank\.when\.kind: 'bilinear_bt' is not a possible value of "
     r"attention\.kind"),
    ({"space": SPACE_HEADS.replace("HEADS", "{choice: [3, 5]}")}, "heads:",
     r"space\.attention\.heads\.choice: no sampled architecture is valid \(20 random samples\)"
     r", e\.g\.: heads must divide width=16, got heads=(3|5)"),
    ({"space": SPACE_HEADS.replace("HEADS", "{choice: [2, 2]}")}, "heads:",
     r"space\.attention\.heads\.choice\[1\]: choices must be distinct, got 2 twice"),
    ({"space": SPACE_HEADS.replace("HEADS", "{choice: [{int: [1, 2]}]}")}, "heads:",
     r"space\.attention\.heads\.choice\[0\]: choices are plain values"),
    ({"space": SPACE_HEADS.replace("HEADS", "{choice: [2], log: true}")}, "heads:",
     r"space\.attention\.heads\.log: log only applies to int and float distributions"),
    ({"space": SPACE_HEADS.replace("HEADS", "{choice: [2], when: {rank: 1}}")
      .replace("{kind: bilinear_btt}", "{heads: 2}")}, "heads:",
     r"space\.attention\.heads\.when: `when` conditions form a cycle"),
    ({"space": "\n  width: 16\n  layers: {per_layer: {kind: standard}}"}, "layers",
     r"space\.layers: per_layer needs depth in the space"),
]


@pytest.mark.parametrize("sections, line_prefix, message", BAD,
                         ids=[m[:40] for _, _, m in BAD])
def test_bad_input_is_a_spec_error_with_file_line_and_path(
        tmp_path: Path, sections: dict, line_prefix: str | None, message: str):
    sections = {k: (v.replace("HEADS", "{choice: [2, 4]}") if v else v)
                for k, v in sections.items()}
    if "space" in sections and "baselines" not in sections:
        sections["baselines"] = "[]"
    path = write(tmp_path, **sections)
    line = line_of(path, line_prefix) if line_prefix else 1
    with pytest.raises(SpecError, match=rf"^at {re.escape(str(path))}:{line} {message}") as info:
        prepared(path)
    assert info.value.source == f"{path}:{line}"
