"""ModelSpec and the transformer: exact FLOPs and params, KV-cache decoding, YAML round trips and
stable hashes, µP zero outputs at init, and errors that name the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mlbtc_search.errors import SpecError
from mlbtc_search.flopcount import count_flops
from mlbtc_search.model import (
    AdapterSpec,
    ModelSpec,
    Transformer,
    build_model,
    kv_cache_bytes,
    model_flops,
    model_params,
    model_report,
)

REPO = Path(__file__).resolve().parents[2]
D, T_MAX = 32, 32

# Every attention preset, the explicit general form (two head groups, a window group, fixed
# scale, structured value/output) and a per-layer list; all with width D and max_seq_len T_MAX.
ATTENTION: dict[str, dict] = {
    "standard": {"kind": "standard", "heads": 4},
    "bilinear_btt": {"kind": "bilinear_btt", "heads": 4},
    "bilinear_mlr": {"kind": "bilinear_mlr", "heads": 2, "ranks": [8, 2, 1]},
    "mlr": {"kind": "mlr", "heads": 4, "ranks": [4, 2, 1, 1]},
    "sliding_window": {"kind": "sliding_window", "heads": 4, "window": 6},
    "global_window": {"kind": "global_window", "heads": 4, "window": 8},
    "general": {
        "kind": "general",
        "groups": [
            {
                "heads": 2,
                "levels": [
                    {"block_size": None, "score": {"btt": {"rank": 1}}},
                    {"block_size": 8, "score": {"low_rank": {"rank": 2}}, "scale": 0.5},
                ],
            },
            {
                "heads": 1,
                "levels": [
                    {"block_size": 12, "score": {"low_rank": {"rank": 4}}},
                    {"block_size": 4, "score": {"mlr": {"ranks": [2, 1]}}},
                ],
            },
            {"heads": 1, "window": 5, "levels": [{"score": {"low_rank": {"rank": 4}}}]},
        ],
        "value": {"monarch": {}},
        "output": {"low_rank": {"rank": 8}},
    },
}
LAYERS = [ATTENTION["mlr"], ATTENTION["sliding_window"], ATTENTION["bilinear_btt"]]

TOKENS = {"input_kind": "tokens", "input_dim": 11, "output_dim": 11}
VECTOR = {"input_kind": "vector", "input_dim": 5, "output_dim": 2}


def model_doc(attention: dict | None = None, adapter: dict | None = None, **extra) -> dict:
    doc: dict = {"width": D, "depth": 2, "max_seq_len": T_MAX, **extra}
    if "layers" not in doc:
        doc["attention"] = attention or ATTENTION["standard"]
    if adapter is not None:
        doc["adapter"] = adapter
    return doc


def variant_doc(name: str, adapter: dict | None = None) -> dict:
    if name == "layers":
        return model_doc(adapter=adapter, depth=3, layers=LAYERS, mlp={"btt": {"rank": 1}})
    return model_doc(ATTENTION[name], adapter)


VARIANTS = sorted(ATTENTION) + ["layers"]


def inputs(spec: ModelSpec, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = spec.adapter
    assert a is not None
    if a.input_kind == "tokens":
        return torch.randint(0, a.input_dim, (B, T), generator=g)
    return torch.randn(B, T, a.input_dim, generator=g, dtype=torch.float64)


def randomized(spec: ModelSpec, seed: int = 0) -> Transformer:
    """A float64 model with no zero-initialized weights (µP zero-init would make every check
    trivially pass)."""
    torch.manual_seed(seed)
    model = build_model(spec).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.2)
    return model


# ---- FLOPs and parameters are exact -------------------------------------------------------------
@pytest.mark.parametrize("adapter", [TOKENS, VECTOR], ids=["tokens", "vector"])
@pytest.mark.parametrize("name", VARIANTS)
def test_flops_and_params_are_exact(name, adapter):
    spec = ModelSpec.from_dict(variant_doc(name, adapter))
    model = build_model(spec)
    B = 2
    for T in (24, T_MAX, 7):  # partial blocks and windows at 24 and 7
        x = (
            inputs(spec, B, T).to(torch.get_default_dtype())
            if adapter is VECTOR
            else inputs(spec, B, T)
        )
        counted = count_flops(lambda x=x: model(x))
        assert counted == B * T * model_flops(spec, T, embedding=True), T
    assert model_flops(spec) == model_flops(spec, T_MAX)
    assert model_params(spec, embedding=True) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("adapter", [TOKENS, VECTOR], ids=["tokens", "vector"])
@pytest.mark.parametrize("name", VARIANTS)
def test_training_flops_are_exact(name, adapter):
    """Forward + backward of one step, as FlopCounterMode counts it, equals the plan's price."""
    spec = ModelSpec.from_dict(variant_doc(name, adapter))
    model = build_model(spec)
    B = 2
    for T in (T_MAX, 13):
        x = inputs(spec, B, T)
        x = x.to(torch.get_default_dtype()) if adapter is VECTOR else x
        counted = count_flops(lambda x=x: model(x).square().sum().backward())
        assert counted == B * T * model_flops(spec, T, embedding=True, backward=True), T


def test_costs_are_pure_data_and_fast_for_huge_models():
    """No module is built for the costs: a 16k-wide, 48-layer model prices in well under a
    second (building it would allocate ~150 GB)."""
    import time

    doc = {"width": 16384, "depth": 48, "max_seq_len": 4096, "adapter": TOKENS,
           "attention": {"kind": "mlr", "heads": 64, "ranks": [128, 64, 32, 32]}}
    t0 = time.perf_counter()
    spec = ModelSpec.from_dict(doc)
    assert model_params(spec) > 10**11 and model_flops(spec) > 0
    assert time.perf_counter() - t0 < 5


def test_float64_models_hold_exact_logit_scales():
    doc = model_doc({"kind": "standard", "heads": 4, "head_dim": 3}, TOKENS)
    attn = build_model(ModelSpec.from_dict(doc)).double().blocks[0].attn
    scale = attn._scale(0)
    assert scale.dtype == torch.float64
    assert scale[0].item() == 8.0 / 3  # not float32-rounded
    assert attn.float()._scale(0).dtype == torch.float32


def test_non_embedding_conventions():
    spec = ModelSpec.from_dict(model_doc(adapter=VECTOR))
    a = spec.adapter
    assert model_flops(spec, embedding=True) - model_flops(spec) == 2 * D * (
        a.input_dim + a.output_dim
    )
    model = build_model(spec)
    non_embedding = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith(("read_in", "read_out", "pos"))
    )
    assert model_params(spec) == non_embedding
    # a token embedding is a lookup: no FLOPs, but its parameters count with embedding=True
    tok = ModelSpec.from_dict(model_doc(adapter=TOKENS))
    assert model_flops(tok, embedding=True) - model_flops(tok) == 2 * D * TOKENS["output_dim"]


def test_costs_need_a_length_the_model_can_run():
    spec = ModelSpec.from_dict(model_doc(ATTENTION["mlr"]))
    for fn in (model_flops, kv_cache_bytes, model_report):
        with pytest.raises(
            SpecError,
            match=r"at max_seq_len: the sequence length must be "
            r"between 1 and max_seq_len=32 .*, got 33",
        ):
            fn(spec, T_MAX + 1)
    assert model_flops(spec, 1) < model_flops(spec, T_MAX)


def test_report_agrees_with_the_functions():
    spec = ModelSpec.from_dict(variant_doc("layers"))
    r = model_report(spec, seq_len=16)
    assert r["flops_per_token"] == model_flops(spec, 16)
    assert r["params"] == model_params(spec)
    assert r["kv_cache_bytes_per_token"] == kv_cache_bytes(spec, 16)
    assert [c["attention"] for c in r["layers"]] == ["mlr", "sliding_window", "bilinear_btt"]
    assert r["family"] == "mlr+sliding_window+bilinear_btt/mlp:btt"
    assert sum(c["params"] for c in r["layers"]) + D == r["params"]
    json.dumps(r, allow_nan=False)


# ---- incremental decoding reproduces the forward ------------------------------------------------
@pytest.mark.parametrize("adapter", [TOKENS, VECTOR], ids=["tokens", "vector"])
@pytest.mark.parametrize("name", VARIANTS)
def test_step_by_step_decoding_equals_forward(name, adapter):
    spec = ModelSpec.from_dict(variant_doc(name, adapter))
    model = randomized(spec)
    B, T = 2, T_MAX
    x = inputs(spec, B, T)
    with torch.no_grad():
        full = model(x)
    caches = model.init_cache(B)
    steps = torch.cat([model.step(x[:, t : t + 1], caches, t) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full)
    # after T tokens the caches hold the bytes per token that the spec reports (for float32;
    # these caches are float64)
    held = sum(c.nbytes() for layer in caches for c in layer)
    assert held == B * T * kv_cache_bytes(spec, T) * 8 / 4


def test_mlr_caches_fewer_bytes_than_standard():
    mlr = ModelSpec.from_dict(model_doc(ATTENTION["mlr"]))
    std = ModelSpec.from_dict(model_doc(ATTENTION["standard"]))
    # per layer and head, float32: standard keeps 8 key + 8 value floats per token; MLR keeps
    # the rank-4 global keys, the current blocks' keys of levels 16/8/4 and all 8 values
    per_head_mlr = (4 * 32 + 2 * 16 + 1 * 8 + 1 * 4 + 8 * 32) / 32 * 4
    assert kv_cache_bytes(std) == 2 * 4 * (8 + 8) * 4 == 512
    assert kv_cache_bytes(mlr) == 2 * 4 * per_head_mlr == 428
    assert kv_cache_bytes(mlr) < kv_cache_bytes(std)
    window = ModelSpec.from_dict(model_doc(ATTENTION["sliding_window"]))
    assert kv_cache_bytes(window, 32) < kv_cache_bytes(window, 16) < kv_cache_bytes(std)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_bytes_are_what_the_caches_hold(name):
    """For every variant and length (partial blocks and windows too), the plan's KV bytes per
    token times T equal the bytes the decoding caches hold after T steps."""
    spec = ModelSpec.from_dict(variant_doc(name, TOKENS))
    model = build_model(spec)
    B = 2
    caches = model.init_cache(B)
    for t in range(T_MAX):
        model.step(torch.full((B, 1), t % 11), caches, t)
        T = t + 1
        if T in (1, 7, 20, T_MAX):
            held = sum(c.nbytes() for layer in caches for c in layer)
            assert held == pytest.approx(kv_cache_bytes(spec, T) * T * B, rel=1e-12), T


def test_mlr_cache_evicts_fine_level_keys():
    spec = ModelSpec.from_dict(model_doc(ATTENTION["mlr"], TOKENS))
    model = build_model(spec)
    caches = model.init_cache(1)
    for t in range(20):
        model.step(torch.tensor([[t % 11]]), caches, t)
    cache = caches[0][0]
    # t = 19: level 0 holds 20 keys, level 1 (blocks of 16) 4, level 2 (8) 4, level 3 (4) 4
    floats = 4 * 20 + 2 * 4 + 1 * 4 + 1 * 4 + 8 * 20
    assert cache.nbytes() == 4 * floats * 4


def test_generate_matches_greedy_forward():
    spec = ModelSpec.from_dict(model_doc(ATTENTION["mlr"], TOKENS))
    model = randomized(spec)
    prompt = inputs(spec, 2, 5)
    out = model.generate(prompt, new_tokens=10)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(logits[:, 4:].argmax(-1), out[:, 5:], rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate(prompt, 6, temperature=1.0, generator=g1)
    b = model.generate(prompt, 6, temperature=1.0, generator=g2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < TOKENS["input_dim"]


def test_generate_needs_a_token_model_and_room():
    spec = ModelSpec.from_dict(model_doc(adapter=VECTOR))
    with pytest.raises(SpecError, match=r"at adapter\.input_kind: generate needs a token model"):
        build_model(spec).generate(torch.zeros(1, 2, dtype=torch.long), 1)
    tok = build_model(ModelSpec.from_dict(model_doc(adapter=TOKENS)))
    with pytest.raises(
        SpecError,
        match=r"at max_seq_len: sequence length 33 exceeds "
        r"max_seq_len=32",
    ):
        tok(torch.zeros(1, 33, dtype=torch.long))


# ---- causality through the whole model ----------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_model_is_causal(name):
    spec = ModelSpec.from_dict(variant_doc(name, VECTOR))
    model = randomized(spec)
    x = inputs(spec, 2, 20)
    with torch.no_grad():
        y = model(x)
        for t in (3, 12):
            x2 = x.clone()
            x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
            y2 = model(x2)
            torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


# ---- µP: zero-initialized residual outputs and read-out -----------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_model_outputs_exactly_zero(name):
    spec = ModelSpec.from_dict(variant_doc(name, TOKENS))
    model = build_model(spec)
    for block in model.blocks:
        x = torch.randn(2, 9, D)
        assert torch.count_nonzero(block.attn(x)) == 0
        assert torch.count_nonzero(block.mlp(x)) == 0
    assert torch.count_nonzero(model(inputs(spec, 2, 9))) == 0


def test_initial_icl_predictions_are_zero():
    from trainers.tasks import get_task

    task = get_task("icl_regression", n_dims=8, curriculum=False)
    a = task.adapter
    spec = ModelSpec.from_dict(
        {"width": D, "depth": 2, "attention": ATTENTION["mlr"]},
        adapter=AdapterSpec(a.input_kind, a.input_dim, a.output_dim),
        seq_len=a.seq_len,
    )
    assert spec.max_seq_len == 32 and spec.adapter.input_kind == "vector"
    model = build_model(spec)
    x, y = task.batch("val", 4, torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (4, 32, 1) and torch.count_nonzero(out) == 0
    torch.testing.assert_close(task.loss(out, y), y.square().mean())


# ---- YAML round trip and hashes -----------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_yaml_round_trip(name):
    doc = variant_doc(name, VECTOR)
    doc["task"] = {"name": "icl_regression", "options": {"n_dims": 5, "curriculum": False}}
    spec = ModelSpec.from_dict(doc)
    again = ModelSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    assert again == spec and again.hash() == spec.hash()
    assert again.to_dict() == spec.to_dict()
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.family.split("/")[0] == (
        "mlr+sliding_window+bilinear_btt" if name == "layers" else name
    )


def test_per_layer_lists_round_trip_and_collapse():
    spec = ModelSpec.from_dict(variant_doc("layers"))
    assert "layers" in spec.to_dict() and len(spec.to_dict()["layers"]) == 3
    same = ModelSpec.from_dict(model_doc(layers=[ATTENTION["mlr"]] * 2))
    assert same == ModelSpec.from_dict(model_doc(ATTENTION["mlr"]))
    assert "attention" in same.to_dict()


def test_hash_is_the_architecture():
    base = ModelSpec.from_dict(model_doc(ATTENTION["mlr"]))
    explicit = ModelSpec.from_dict(
        model_doc(
            {
                "groups": [
                    {
                        "heads": 4,
                        "levels": [
                            {"block_size": None, "score": {"low_rank": {"rank": 4}}},
                            {"block_size": 16, "score": {"low_rank": {"rank": 2}}},
                            {"block_size": 8, "score": {"low_rank": {"rank": 1}}},
                            {"block_size": 4, "score": {"low_rank": {"rank": 1}}},
                        ],
                    }
                ]
            }
        )
    )
    assert explicit.family == "general" and base.family == "mlr"
    assert explicit.hash() == base.hash()
    # mlr with a single rank is standard attention
    one = ModelSpec.from_dict(model_doc({"kind": "mlr", "heads": 4, "ranks": [8]}))
    assert one.hash() == ModelSpec.from_dict(model_doc(ATTENTION["standard"])).hash()
    # the task recorded with the model is metadata, not architecture
    tagged = ModelSpec.from_dict({**model_doc(ATTENTION["mlr"]), "task": {"name": "text"}})
    assert tagged != base and tagged.hash() == base.hash()
    hashes = {base.hash()}
    for change in (
        {"width": 64},
        {"depth": 3},
        {"max_seq_len": 64},
        {"mlp_ratio": 2},
        {"mlp": {"low_rank": {"rank": 8}}},
        {"positions": "none"},
        {"adapter": TOKENS},
        {"base_width": 32},
        {"rms_cap": True},
        {"attention": {**ATTENTION["mlr"], "ranks": [4, 2, 2]}},
        {"attention": {**ATTENTION["mlr"], "qk_norm": False}},
        {"attention": {**ATTENTION["mlr"], "logit_mult": 1.0}},
    ):
        hashes.add(ModelSpec.from_dict({**model_doc(ATTENTION["mlr"]), **change}).hash())
    assert len(hashes) == 13


HASH_ORACLE = """
import json, sys
from mlbtc_search.model import ModelSpec
for line in sys.stdin:
    print(ModelSpec.from_dict(json.loads(line)).hash(), flush=True)
"""


def test_hash_is_stable_across_processes():
    specs = [ModelSpec.from_dict(variant_doc(n, VECTOR)) for n in VARIANTS]
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    lines = "".join(json.dumps(s.to_dict()) + "\n" for s in specs)
    proc = subprocess.run(
        [sys.executable, "-c", HASH_ORACLE],
        input=lines,
        text=True,
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=True,
    )
    assert proc.stdout.split() == [s.hash() for s in specs]


def test_adapter_and_length_from_the_task():
    doc = {"width": D, "attention": "standard"}
    spec = ModelSpec.from_dict(doc, adapter=VECTOR, seq_len=48)
    assert spec.max_seq_len == 48 and spec.adapter == AdapterSpec("vector", 5, 2)
    assert spec.depth == 2 and spec.mlp_up.n_out == 4 * D
    bare = ModelSpec.from_dict({**doc, "max_seq_len": 16})
    assert bare.adapter is None
    moved = bare.with_adapter(AdapterSpec("tokens", 7, 7), seq_len=64)
    assert moved.adapter.input_kind == "tokens" and moved.max_seq_len == 64
    assert ModelSpec.from_dict({"model": {**doc, "max_seq_len": 16}}) == bare
    with pytest.raises(SpecError, match=r"at adapter: the model has no adapter"):
        build_model(bare)


# ---- errors name the field ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "doc,match",
    [
        (model_doc(colour="red"), r"at colour: unknown key 'colour'; valid keys: width, depth"),
        (model_doc({"kind": "sparse"}), r"at attention\.kind: unknown attention kind 'sparse'"),
        (
            model_doc({"kind": "standard", "heads": 3}),
            r"at attention\.heads: heads must divide "
            r"width=32, got heads=3",
        ),
        (model_doc(layers=[ATTENTION["mlr"]] * 3), r"at layers: layers must be a list of depth=2"),
        (
            model_doc(layers=[ATTENTION["mlr"], {"kind": "bad"}]),
            r"at layers\[1\]\.kind: unknown attention kind 'bad'",
        ),
        ({**model_doc(), "layers": [ATTENTION["mlr"]] * 2}, r"give exactly one of attention"),
        (
            model_doc(
                {
                    "groups": [
                        {
                            "heads": 4,
                            "levels": [
                                {"block_size": 8, "score": {"low_rank": {"rank": 2}}},
                                {"block_size": 6, "score": {"low_rank": {"rank": 2}}},
                            ],
                        }
                    ]
                }
            ),
            r"at attention\.groups\[0\]\.levels\[1\]\.block_size: block sizes must be nested",
        ),
        (
            model_doc(
                {
                    "groups": [
                        {
                            "heads": 4,
                            "window": 4,
                            "levels": [
                                {"score": {"low_rank": {"rank": 2}}},
                                {"block_size": 4, "score": {"low_rank": {"rank": 2}}},
                            ],
                        }
                    ]
                }
            ),
            r"at attention\.groups\[0\]\.window: a sliding window goes with exactly one "
            r"global level",
        ),
        (
            {**model_doc({"kind": "mlr", "ranks": [2, 2, 2]}), "max_seq_len": 30},
            r"at attention\.ranks: max_seq_len=30 must be divisible by 2\^\(levels-1\)=4",
        ),
        (
            model_doc(adapter={"input_kind": "image", "input_dim": 3, "output_dim": 1}),
            r"at adapter\.input_kind: input_kind must be one of vector, tokens, series",
        ),
        (model_doc(adapter={**VECTOR, "dims": 3}), r"at adapter\.dims: unknown key 'dims'"),
        (
            {"depth": 2, "attention": "standard", "max_seq_len": 8},
            r"at width: width must be an "
            r"integer >= 1, got None",
        ),
        ({"width": D, "attention": "standard"}, r"at max_seq_len: max_seq_len is needed"),
        (model_doc(mlp={"low_rank": {"rank": 99}}), r"at mlp\.low_rank\.rank"),
        (model_doc(mlp=[1]), r"at mlp: mlp must be a matrix structure"),
        (model_doc(positions="rotary"), r"at positions: positions must be 'learned' or 'none'"),
        (model_doc(rms_cap="yes"), r"at rms_cap: rms_cap must be true or false"),
        (model_doc(task="text"), r"at task: task must be a mapping"),
        ({"model": model_doc(colour=1)}, r"at model\.colour: unknown key"),
    ],
)
def test_spec_errors_name_the_field(doc, match):
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_dict(doc)


def test_adapter_must_fit_the_task():
    doc = model_doc(adapter=VECTOR)
    with pytest.raises(
        SpecError,
        match=r"at adapter: the model's adapter .* does not fit the "
        r"task, which needs",
    ):
        ModelSpec.from_dict(doc, adapter=TOKENS)
    assert ModelSpec.from_dict(doc, adapter=VECTOR).adapter == AdapterSpec("vector", 5, 2)


def test_depth_must_match_layers_on_construction():
    spec = ModelSpec.from_dict(model_doc())
    with pytest.raises(SpecError, match=r"at layers: layers must have depth=3 entries, got 2"):
        ModelSpec(D, 3, spec.layers, spec.mlp_up, spec.mlp_down, T_MAX)
