"""µP: per-core fans, init std, Adam multipliers, and a coordinate check across widths.

Rules under test (DESIGN §3, reference doc §4.2): each core's fans are the sizes it contracts and
produces at its step of the flow (batch/block axes excluded); init std is sqrt(min(fi, fo)) / fi;
the Adam multiplier is base_width / (fi * n_cores), which for a dense layer is base_width / d_in.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mlbtc_search import MatrixSpec, StructuredLinear, compile_matrix, make_adamw, param_groups
from mlbtc_search.mup import DEFAULT_BASE_WIDTH


def layer(doc: dict, seed: int = 0, **kwargs) -> StructuredLinear:
    torch.manual_seed(seed)
    return compile_matrix(MatrixSpec.from_dict(doc), **kwargs)


# ---- fans and init ---------------------------------------------------------------------------
@pytest.mark.parametrize("c,d,a,b,s", [(4, 8, 16, 2, 1), (8, 8, 8, 8, 3), (2, 16, 4, 8, 5)])
def test_btt_fans_match_the_paper(c, d, a, b, s):
    """R[i, j, b, s]: fan_in d, fan_out b*s; L[b, i, s, a]: fan_in c*s, fan_out a (the bmm0 rule:
    i is a batch index of R and b one of L)."""
    doc = {"in": c * d, "out": a * b,
           "btt": {"rank": s, "in_factors": [c, d], "out_factors": [a, b]}}
    module = layer(doc)
    btc = module.spec.levels[0].btc
    assert btc.fans(0) == (d, b * s)
    assert btc.fans(1) == (c * s, a)
    assert [(i.fan_in, i.fan_out) for i in module.infos] == [(d, b * s), (c * s, a)]


@pytest.mark.parametrize("doc,fans", [
    ({"in": 48, "out": 32, "dense": {}}, [(48, 32)]),
    ({"in": 48, "out": 32, "blocks": 4, "dense": {}}, [(12, 8)]),
    ({"in": 48, "out": 32, "low_rank": {"rank": 5}}, [(48, 5), (5, 32)]),
    ({"in": 12, "out": 20, "kronecker": {"in_factors": [3, 4], "out_factors": [4, 5]}},
     [(3, 4), (4, 5)]),
    ({"in": 24, "out": 24, "tensor_train": {"cores": 3, "ranks": [2, 3],
                                            "in_factors": [2, 3, 4], "out_factors": [4, 3, 2]}},
     [(2, 4 * 2), (2 * 3, 3 * 3), (3 * 4, 2)]),
])
def test_fans_of_other_structures(doc, fans):
    assert [(i.fan_in, i.fan_out) for i in layer(doc).infos] == fans


LARGE = {
    "dense": {"in": 512, "out": 256, "dense": {}},
    "low_rank": {"in": 1024, "out": 512, "low_rank": {"rank": 32}},
    "monarch": {"in": 4096, "out": 4096, "monarch": {}},
    "btt": {"in": 1024, "out": 1024, "btt": {"rank": 2}},
    "kronecker": {"in": 4096, "out": 1024, "kronecker": {}},
    "tensor_train": {"in": 4096, "out": 4096, "tensor_train": {"cores": 3, "ranks": 4}},
    "mlr": {"in": 1024, "out": 1024, "mlr": {"ranks": [32, 16], "blocks": [1, 4]}},
}


@pytest.mark.parametrize("doc", LARGE.values(), ids=list(LARGE))
def test_init_std_is_sqrt_min_fans_over_fan_in(doc):
    module = layer(doc)
    for p, info in zip(module.cores, module.infos, strict=True):
        expected = math.sqrt(min(info.fan_in, info.fan_out)) / info.fan_in
        assert info.init_std == pytest.approx(expected)
        if p.numel() >= 1000:
            assert p.std().item() == pytest.approx(expected, rel=0.1)
            assert abs(p.mean().item()) < 0.1 * expected


def test_zero_init_zeroes_only_the_last_core_of_each_level():
    module = layer({"in": 64, "out": 64, "levels": [{"btt": {"rank": 2}},
                                                    {"blocks": 4, "low_rank": {"rank": 2}}]},
                   zero_init=True)
    last = [i.core == len(module.spec.levels[i.level].btc.cores) - 1 for i in module.infos]
    assert last == [False, True, False, True]
    for p, is_last in zip(module.cores, last, strict=True):
        assert (torch.count_nonzero(p) == 0) == is_last
    # gradients reach the first cores once the last ones have moved
    opt = make_adamw(module, lr=1e-2)
    x, y = torch.randn(8, 64), torch.randn(8, 64)
    for _ in range(2):
        opt.zero_grad()
        (module(x) - y).square().mean().backward()
        opt.step()
    assert all(p.grad.abs().sum() > 0 for p in module.cores)


@pytest.mark.parametrize("structure", [{"dense": {}}, {"btt": {"rank": 1}}])
def test_spectral_norm_at_init_is_flat_in_width(structure):
    norms = []
    for width in (64, 256, 1024):
        w = layer({"in": width, "out": width, **structure}).materialize()
        norms.append(torch.linalg.matrix_norm(w, ord=2).item())
    assert max(norms) / min(norms) < 1.3, norms


# ---- learning-rate multipliers ---------------------------------------------------------------
def group_lr(groups: list[dict], name: str) -> float:
    (lr,) = [g["lr"] for g in groups if name in g["names"]]
    return lr


@pytest.mark.parametrize("width", [64, 128, 256, 512])
def test_dense_multiplier_is_base_over_fan_in(width):
    model = nn.ModuleDict({"structured": layer({"in": width, "out": 2 * width, "dense": {}}),
                           "linear": nn.Linear(width, 3)})
    groups = param_groups(model, lr=1.0)
    assert group_lr(groups, "structured.cores.0") == DEFAULT_BASE_WIDTH / width
    assert group_lr(groups, "linear.weight") == DEFAULT_BASE_WIDTH / width
    assert group_lr(groups, "linear.bias") == 1.0


def test_multiplier_halves_when_width_doubles():
    def lrs(width: int) -> list[float]:
        model = layer({"in": width, "out": width, "btt": {"rank": 2}})
        groups = param_groups(model, lr=3e-3, base_width=32)
        return [group_lr(groups, f"cores.{i}") for i in range(2)]

    # BTT fans grow like sqrt(width): multiplying width by 4 halves each core's multiplier
    for small, big in zip(lrs(64), lrs(256), strict=True):
        assert big == pytest.approx(small / 2)
    dense = [group_lr(param_groups(layer({"in": w, "out": w, "dense": {}}), lr=3e-3), "cores.0")
             for w in (64, 128, 256)]
    assert dense[1] == pytest.approx(dense[0] / 2) and dense[2] == pytest.approx(dense[1] / 2)


def test_core_multiplier_splits_one_over_fan_in_across_cores():
    module = layer({"in": 256, "out": 256, "btt": {"rank": 4}})  # R: 16 -> 64, L: 64 -> 16
    groups = param_groups(module, lr=1.0, base_width=64)
    assert group_lr(groups, "cores.0") == 64 / (16 * 2)
    assert group_lr(groups, "cores.1") == 64 / (64 * 2)


def test_norms_embeddings_and_fixed_parameters_get_multiplier_one():
    model = nn.ModuleDict({"emb": nn.Embedding(100, 32), "norm": nn.LayerNorm(32),
                           "read_in": nn.Linear(4, 32), "body": layer(
                               {"in": 32, "out": 32, "dense": {}})})
    groups = param_groups(model, lr=2.0, weight_decay=0.1, fixed_mult=("read_in",))
    for name in ("emb.weight", "norm.weight", "norm.bias", "read_in.weight", "read_in.bias"):
        (g,) = [g for g in groups if name in g["names"]]
        assert g["lr"] == 2.0 and g["weight_decay"] == 0.0, name
    (g,) = [g for g in groups if "body.cores.0" in g["names"]]
    assert g["lr"] == 2.0 * 64 / 32 and g["weight_decay"] == 0.1
    opt = make_adamw(model, lr=2.0, fixed_mult=("read_in",))
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(g["lr"] for g in groups)


# ---- coordinate check ------------------------------------------------------------------------
D_X = 16


class Net(nn.Module):
    """read-in (frozen) -> 2 structured hidden layers with tanh -> zero-init readout."""

    def __init__(self, width: int, structure: dict):
        super().__init__()
        self.read_in = nn.Linear(D_X, width, bias=False)
        nn.init.normal_(self.read_in.weight, std=D_X**-0.5)
        # frozen, so the activation change measures what the hidden cores learn
        self.read_in.weight.requires_grad_(False)
        doc = {"in": width, "out": width, **structure}
        self.hidden = nn.ModuleList([layer(doc, seed=1), layer(doc, seed=2)])
        self.read_out = compile_matrix(MatrixSpec.from_dict(
            {"in": width, "out": 1, "dense": {}}), zero_init=True)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.read_in(x)  # (B, width)
        acts = []
        for hidden in self.hidden:
            h = torch.tanh(hidden(h))  # (B, width)
            acts.append(h)
        return self.read_out(h), acts


def coordinates(width: int, structure: dict, steps: int = 5, lr: float = 1e-2,
                mult: str = "mup") -> tuple[float, float]:
    """(RMS, RMS of the change since init) of the last hidden activation after ``steps`` AdamW
    steps. ``mult``: "mup" (make_adamw), "standard" (no width scaling) or "dense" (every core
    gets the dense layer's multiplier base/d_in instead of base/(fan_in * n_cores))."""
    torch.manual_seed(0)
    net = Net(width, structure)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, D_X, generator=gen)
    y = torch.sin(x @ torch.randn(D_X, 1, generator=gen))  # (128, 1)
    if mult == "mup":
        opt = make_adamw(net, lr=lr)
    elif mult == "standard":
        opt = make_adamw(net, lr=lr, base_width=width)
    else:
        groups = [{"params": [p], "lr": lr * DEFAULT_BASE_WIDTH / width}
                  for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    with torch.no_grad():
        before = net(x)[1][-1]
    for _ in range(steps):
        opt.zero_grad()
        (net(x)[0] - y).square().mean().backward()
        opt.step()
    with torch.no_grad():
        after = net(x)[1][-1]
    return after.pow(2).mean().sqrt().item(), (after - before).pow(2).mean().sqrt().item()


WIDTHS = (64, 256, 1024)


@pytest.mark.parametrize("structure", [{"dense": {}}, {"btt": {"rank": 1}}],
                         ids=["dense", "btt"])
def test_coordinate_check_is_flat_across_widths(structure):
    rms, change = zip(*(coordinates(w, structure) for w in WIDTHS), strict=True)
    assert max(rms) / min(rms) < 2, rms
    assert max(change) / min(change) < 2, change
    assert min(change) > 0.05, "the hidden layers must actually learn"


@pytest.mark.parametrize("structure", [{"dense": {}}, {"btt": {"rank": 1}}],
                         ids=["dense", "btt"])
def test_coordinate_check_drifts_without_width_scaling(structure):
    change = [coordinates(w, structure, mult="standard")[1] for w in (WIDTHS[0], WIDTHS[-1])]
    assert change[1] / change[0] > 2.5, change


def test_coordinate_check_drifts_with_the_dense_multiplier_on_btt_cores():
    change = [coordinates(w, {"btt": {"rank": 1}}, mult="dense")[1]
              for w in (WIDTHS[0], WIDTHS[-1])]
    assert change[0] / change[1] > 2.5, change
