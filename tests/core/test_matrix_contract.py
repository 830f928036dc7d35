"""The MatrixSpec contract, one suite for every structure family (STYLE rule 12).

``MatrixContract`` holds the tests; each ``Test<Family>`` subclass supplies only ``specs()``, a
hypothesis strategy of valid YAML documents of that family. For every drawn spec, in float64:

- the compiled module equals the spec's matrix (a one-shot ``torch.einsum`` of the cores, written
  here independently of the plan) and ``materialize()`` returns it, for any leading batch dims;
- ``flops(spec) * N`` equals ``FlopCounterMode``'s count on the forward exactly, and forward plus
  backward is exactly 3x the forward;
- ``params(spec)`` is the module's parameter count;
- the YAML (and sorted-key JSON) round trip is the identity; another process computes the same
  hash;
- gradients (input and cores) equal those of the reference matrix;
- ``zero_init`` gives 0 and one AdamW step moves it; ``rms_cap`` caps each core's RMS at its init
  std and leaves the layer unchanged below the cap.

Below the suite: ranks of the named structures and the spellings that must hash the same.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mlbtc_search import MatrixSpec, SpecError, StructuredLinear, compile_matrix, flops, params
from mlbtc_search.flopcount import flop_counter
from mlbtc_search.mup import make_adamw

REPO = Path(__file__).resolve().parents[2]
# The suite's methods run once per family (subclass): hence differing_executors, which is safe
# here because every family draws its specs through ``st.data()`` from its own strategy.
CONTRACT = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.differing_executors,
    ],
)
FEW = settings(CONTRACT, max_examples=6)


# ---- an independent reference: the matrix as one einsum over all cores ------------------------
def reference_matrix(module: StructuredLinear) -> Tensor:
    """M = sum_l BlockDiag(blocks of level l), each block one einsum over its cores (with grad)."""
    spec = module.spec
    total = None
    i = 0
    for level in spec.levels:
        btc, k = level.btc, level.blocks
        letter = dict(zip(btc.sizes, string.ascii_lowercase, strict=False))
        operands, terms = [], []
        for axes in btc.cores:
            operands.append(module.cores[i])  # (k, *core axes)
            terms.append("Z" + "".join(letter[a] for a in axes))
            i += 1
        out = "Z" + "".join(letter[a] for a, _ in btc.out_axes + btc.in_axes)
        blocks = torch.einsum(",".join(terms) + "->" + out, *operands)  # (k, *out, *in)
        blocks = blocks.reshape(k, btc.n_out, btc.n_in)  # (k, m/k, n/k)
        w = torch.block_diag(*blocks.unbind(0))  # (m, n)
        total = w if total is None else total + w
    assert total is not None
    return total


def build(doc: dict, seed: int = 0, **kwargs) -> tuple[MatrixSpec, StructuredLinear]:
    spec = MatrixSpec.from_dict(doc)
    torch.manual_seed(seed)
    return spec, compile_matrix(spec, **kwargs).double()


def rms(t: Tensor) -> Tensor:
    return t.pow(2).mean().sqrt()


HASH_ORACLE = """
import json, sys
from mlbtc_search import MatrixSpec
for line in sys.stdin:
    print(MatrixSpec.from_dict(json.loads(line)).hash(), flush=True)
"""


@pytest.fixture(scope="module")
def other_process_hash():
    """A second Python process (another PYTHONHASHSEED) that hashes specs sent to it as JSON."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HASH_ORACLE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(doc: dict) -> str:
        proc.stdin.write(json.dumps(doc) + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    yield ask
    proc.stdin.close()
    proc.wait(timeout=30)


# ---- the contract ----------------------------------------------------------------------------
class MatrixContract:
    """Subclasses set ``specs()``: a strategy of valid matrix documents of one family."""

    def specs(self) -> st.SearchStrategy[dict]:
        raise NotImplementedError

    @CONTRACT
    @given(data=st.data())
    def test_module_is_the_matrix(self, data):
        spec, module = build(data.draw(self.specs()))
        lead = data.draw(st.lists(st.integers(1, 3), max_size=3), label="lead")
        w_ref = reference_matrix(module).detach()
        w = module.materialize()
        assert w.shape == (spec.n_out, spec.n_in)
        torch.testing.assert_close(w, w_ref)
        x = torch.randn(*lead, spec.n_in, dtype=torch.float64)
        y = module(x)
        assert y.shape == (*lead, spec.n_out)
        torch.testing.assert_close(y, x @ w_ref.T)

    @CONTRACT
    @given(data=st.data())
    def test_flops_are_exact(self, data):
        spec, module = build(data.draw(self.specs()))
        rows = data.draw(st.integers(1, 5), label="rows")
        x = torch.randn(rows, spec.n_in, dtype=torch.float64, requires_grad=True)
        with flop_counter() as forward:
            module(x)
        with flop_counter() as both:
            module(x).square().sum().backward()
        assert forward.get_total_flops() == flops(spec) * rows
        assert both.get_total_flops() == 3 * flops(spec) * rows

    @CONTRACT
    @given(data=st.data())
    def test_params(self, data):
        spec, module = build(data.draw(self.specs()))
        assert params(spec) == spec.params == sum(p.numel() for p in module.parameters())

    @CONTRACT
    @given(data=st.data())
    def test_yaml_round_trip(self, data):
        spec = MatrixSpec.from_dict(data.draw(self.specs()))
        again = MatrixSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
        assert again == spec
        assert again.hash() == spec.hash() and hash(again) == hash(spec)
        assert again.to_dict() == spec.to_dict()
        via_json = MatrixSpec.from_dict(json.loads(json.dumps(spec.to_dict(), sort_keys=True)))
        assert via_json == spec

    @FEW
    @given(data=st.data())
    def test_hash_is_stable_across_processes(self, data, other_process_hash):
        spec = MatrixSpec.from_dict(data.draw(self.specs()))
        assert other_process_hash(spec.to_dict()) == spec.hash()

    @CONTRACT
    @given(data=st.data())
    def test_gradients_match_the_matrix(self, data):
        spec, module = build(data.draw(self.specs()))
        x = torch.randn(3, spec.n_in, dtype=torch.float64, requires_grad=True)
        g = torch.randn(3, spec.n_out, dtype=torch.float64)
        (module(x) * g).sum().backward()
        grads = [p.grad.clone() for p in module.cores]
        for p in module.cores:
            assert p.grad.abs().sum() > 0, "every core must get a gradient"
            p.grad = None
        x_ref = x.detach().clone().requires_grad_(True)
        (x_ref @ reference_matrix(module).T * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        for got, p in zip(grads, module.cores, strict=True):
            torch.testing.assert_close(got, p.grad)

    @FEW
    @given(data=st.data())
    def test_zero_init_starts_at_zero_and_learns(self, data):
        spec, module = build(data.draw(self.specs()), zero_init=True)
        x = torch.randn(4, spec.n_in, dtype=torch.float64)
        assert torch.count_nonzero(module(x)) == 0
        opt = make_adamw(module, lr=1e-2)
        target = torch.randn(4, spec.n_out, dtype=torch.float64)
        (module(x) - target).square().mean().backward()
        opt.step()
        assert torch.count_nonzero(module(x)) > 0

    @FEW
    @given(data=st.data())
    def test_rms_cap(self, data):
        doc = data.draw(self.specs())
        spec, capped = build(doc, rms_cap=True)
        _, plain = build(doc)
        i = data.draw(st.integers(0, len(capped.cores) - 1), label="core")
        x = torch.randn(3, spec.n_in, dtype=torch.float64)
        with torch.no_grad():
            for p, info in zip(capped.cores, capped.infos, strict=True):
                p.mul_(0.5 * info.init_std / rms(p))  # every core below its cap
            plain.load_state_dict(capped.state_dict())
            assert torch.equal(capped(x), plain(x)), "below the cap the layer is unchanged"
            # above the cap: RMS 10 x tau acts as the same core at RMS exactly tau
            tau = capped.infos[i].init_std
            capped.cores[i].mul_(20.0)
            plain.cores[i].copy_(capped.cores[i] * tau / rms(capped.cores[i]))
            torch.testing.assert_close(capped(x), plain(x))
        # a loss that depends on the capped core's direction (a sum of squares may not: with
        # one input the layer's squared norm is fixed by the cap, so its gradient is exactly 0)
        y = capped(x)
        (y * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(0))
         ).sum().backward()
        if capped.cores[i].numel() > 1:  # (a capped scalar is a constant)
            assert capped.cores[i].grad.abs().sum() > 0, "gradients flow through the cap"


# ---- strategies --------------------------------------------------------------------------------
dims = st.integers(16, 64)


def divisors_of(n: int, m: int, limit: int = 4) -> list[int]:
    return [k for k in range(1, limit + 1) if n % k == 0 and m % k == 0]


@st.composite
def dense_specs(draw):
    n, m = draw(dims), draw(dims)
    k = draw(st.sampled_from(divisors_of(n, m)))
    return {"in": n, "out": m, "blocks": k, "dense": {}}


@st.composite
def low_rank_specs(draw):
    n, m = draw(dims), draw(dims)
    return {"in": n, "out": m, "low_rank": {"rank": draw(st.integers(1, min(n, m)))}}


@st.composite
def kronecker_specs(draw):
    f = st.integers(2, 8)
    i1, i2, o1, o2 = draw(f), draw(f), draw(f), draw(f)
    return {
        "in": i1 * i2,
        "out": o1 * o2,
        "kronecker": {"in_factors": [i1, i2], "out_factors": [o1, o2]},
    }


@st.composite
def monarch_specs(draw):
    n, m = draw(dims), draw(dims)
    k = draw(st.sampled_from(divisors_of(n, m)))
    return {"in": n, "out": m, "blocks": k, "monarch": {}}


@st.composite
def btt_specs(draw):
    f = st.integers(1, 8)
    c, d, a, b = draw(f), draw(f), draw(f), draw(f)
    k = draw(st.integers(1, 2))
    return {
        "in": k * c * d,
        "out": k * a * b,
        "blocks": k,
        "btt": {"rank": draw(st.integers(1, 4)), "in_factors": [c, d], "out_factors": [a, b]},
    }


@st.composite
def tensor_train_specs(draw):
    cores = draw(st.integers(2, 3))
    f = st.lists(st.integers(1, 4), min_size=cores, max_size=cores)
    ins, outs = draw(f), draw(f)
    ranks = draw(st.lists(st.integers(1, 3), min_size=cores - 1, max_size=cores - 1))
    return {
        "in": prod(ins),
        "out": prod(outs),
        "tensor_train": {"cores": cores, "ranks": ranks, "in_factors": ins, "out_factors": outs},
    }


@st.composite
def structure_for(draw, n: int, m: int) -> dict:
    """One preset structure (default factors) for a block of size n -> m."""
    kind = draw(
        st.sampled_from(
            ["dense", "low_rank", "monarch", "btt", "kronecker", "tensor_train", "theta", "btc"]
        )
    )
    if kind == "low_rank":
        return {"low_rank": {"rank": draw(st.integers(1, min(n, m, 8)))}}
    if kind == "btt":
        return {"btt": {"rank": draw(st.integers(1, 3))}}
    if kind == "tensor_train":
        return {"tensor_train": {"cores": draw(st.integers(2, 3)), "ranks": 2}}
    if kind == "theta":
        return {"theta": {"exponents": draw(theta_exponents())}}
    if kind == "btc":  # a rank-2 factorization spelled out
        return {
            "btc": {
                "in_axes": {"p": n},
                "out_axes": {"q": m},
                "bonds": {"r": 2},
                "cores": [["p", "r"], ["r", "q"]],
            }
        }
    return {kind: {}}


@st.composite
def block_diag_specs(draw):
    k = draw(st.integers(1, 4))
    n, m = k * draw(st.integers(4, 16)), k * draw(st.integers(4, 16))
    inner = draw(structure_for(n // k, m // k))
    return {"in": n, "out": m, "block_diag": {"blocks": k, "structure": inner}}


@st.composite
def mlr_specs(draw):
    n, m = 4 * draw(st.integers(4, 16)), 4 * draw(st.integers(4, 16))
    n_levels = draw(st.integers(1, 3))
    blocks = draw(st.lists(st.sampled_from([1, 2, 4]), min_size=n_levels, max_size=n_levels))
    ranks = [draw(st.integers(1, min(n, m) // k)) for k in blocks]
    return {"in": n, "out": m, "mlr": {"ranks": ranks, "blocks": blocks}}


@st.composite
def theta_exponents(draw) -> list[float]:
    """(alpha|beta|gamma|delta|epsilon|phi|rho) on a grid of eighths, each group summing to 1."""
    a = draw(st.integers(0, 8))
    b = draw(st.integers(0, 8 - a))
    d = draw(st.integers(0, 8))
    e = draw(st.integers(0, 8 - d))
    r = draw(st.integers(0, 4))
    return [a / 8, b / 8, (8 - a - b) / 8, d / 8, e / 8, (8 - d - e) / 8, r / 8]


@st.composite
def theta_specs(draw):
    return {"in": draw(dims), "out": draw(dims), "theta": {"exponents": draw(theta_exponents())}}


@st.composite
def general_btc_specs(draw):
    """A random valid contraction: 1-2 input and output axes, 0-2 bonds, 1-3 cores; axis names
    in random (often unsorted) order so the round trip must keep the declared order."""
    names = draw(st.permutations(list("ijkpqrstuv")))
    n_in, n_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n_cores = draw(st.integers(1, 3))
    n_bonds = draw(st.integers(0, 2)) if n_cores > 1 else 0
    in_axes = {names.pop(): draw(st.integers(2, 5)) for _ in range(n_in)}
    out_axes = {names.pop(): draw(st.integers(2, 5)) for _ in range(n_out)}
    bonds = {names.pop(): draw(st.integers(1, 3)) for _ in range(n_bonds)}
    cores: list[list[str]] = [[] for _ in range(n_cores)]
    members = st.lists(st.integers(0, n_cores - 1), min_size=1, max_size=n_cores, unique=True)
    for axis in list(in_axes) + list(out_axes):
        for c in draw(members):
            cores[c].append(axis)
    bond_members = st.lists(st.integers(0, n_cores - 1), min_size=2, max_size=n_cores, unique=True)
    for axis in bonds:
        for c in draw(bond_members):
            cores[c].append(axis)
    for c in cores:
        c[:] = draw(st.permutations(c))
    k = draw(st.integers(1, 2))
    doc = {
        "in": k * prod(in_axes.values()),
        "out": k * prod(out_axes.values()),
        "levels": [
            {
                "blocks": k,
                "btc": {"in_axes": in_axes, "out_axes": out_axes, "bonds": bonds, "cores": cores},
            }
        ],
    }
    try:
        MatrixSpec.from_dict(doc)
    except SpecError:  # an empty core or a disconnected graph: draw again
        assume(False)
    return doc


@st.composite
def multi_level_specs(draw):
    """2-3 levels of different structures and block counts summed into one matrix."""
    n, m = 4 * draw(st.integers(4, 12)), 4 * draw(st.integers(4, 12))
    levels = []
    for _ in range(draw(st.integers(2, 3))):
        k = draw(st.sampled_from(divisors_of(n, m)))
        levels.append({"blocks": k, **draw(structure_for(n // k, m // k))})
    return {"in": n, "out": m, "levels": levels}


class TestDense(MatrixContract):
    def specs(self):
        return dense_specs()


class TestLowRank(MatrixContract):
    def specs(self):
        return low_rank_specs()


class TestKronecker(MatrixContract):
    def specs(self):
        return kronecker_specs()


class TestMonarch(MatrixContract):
    def specs(self):
        return monarch_specs()


class TestBTT(MatrixContract):
    def specs(self):
        return btt_specs()


class TestTensorTrain(MatrixContract):
    def specs(self):
        return tensor_train_specs()


class TestBlockDiag(MatrixContract):
    def specs(self):
        return block_diag_specs()


class TestMLR(MatrixContract):
    def specs(self):
        return mlr_specs()


class TestTheta(MatrixContract):
    def specs(self):
        return theta_specs()


class TestGeneralBTC(MatrixContract):
    def specs(self):
        return general_btc_specs()


class TestMultiLevel(MatrixContract):
    def specs(self):
        return multi_level_specs()


# ---- ranks -----------------------------------------------------------------------------------
def rank_of(doc: dict, seed: int = 0) -> int:
    _, module = build(doc, seed)
    return int(torch.linalg.matrix_rank(module.materialize()).item())


@pytest.mark.parametrize("root", [4, 6, 8])
def test_rank_one_btt_with_balanced_factors_is_full_rank(root):
    n = root * root
    assert rank_of({"in": n, "out": n, "btt": {"rank": 1}}) == n
    assert rank_of({"in": n, "out": n, "monarch": {}}) == n


@settings(CONTRACT)
@given(n=dims, m=dims, data=st.data())
def test_low_rank_has_its_rank(n, m, data):
    r = data.draw(st.integers(1, min(n, m)))
    assert rank_of({"in": n, "out": m, "low_rank": {"rank": r}}) == r


@settings(CONTRACT)
@given(data=st.data())
def test_mlr_rank(data):
    """rank <= min(n, sum_l blocks_l * r_l), with equality for random cores when the sum fits."""
    n = 64
    blocks = data.draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4))
    ranks = [data.draw(st.integers(1, min(12, n // k))) for k in blocks]
    total = sum(k * r for k, r in zip(blocks, ranks, strict=True))
    rank = rank_of({"in": n, "out": n, "mlr": {"ranks": ranks, "blocks": blocks}})
    assert rank <= min(n, total)
    if total <= n:
        assert rank == total


def test_kronecker_is_torch_kron_of_its_cores():
    doc = {"in": 12, "out": 20, "kronecker": {"in_factors": [3, 4], "out_factors": [4, 5]}}
    spec, module = build(doc)
    a, b = module.cores[0][0], module.cores[1][0]  # A[o1, i1] (4 x 3), B[o2, i2] (5 x 4)
    assert spec.levels[0].btc.cores == (("o1", "i1"), ("o2", "i2"))
    assert a.shape == (4, 3) and b.shape == (5, 4)
    torch.testing.assert_close(module.materialize(), torch.kron(a, b).detach())


# ---- spellings that hash the same ------------------------------------------------------------
def spec_hash(doc: dict) -> str:
    return MatrixSpec.from_dict(doc).hash()


@pytest.mark.parametrize("n", [16, 36, 64, 48])
def test_monarch_is_btt_of_rank_one(n):
    assert spec_hash({"in": n, "out": n, "monarch": {}}) == spec_hash(
        {"in": n, "out": n, "btt": {"rank": 1}}
    )
    assert spec_hash({"in": n, "out": n, "monarch": {}}) != spec_hash(
        {"in": n, "out": n, "btt": {"rank": 2}}
    )


def test_low_rank_is_its_general_spelling():
    general = {
        "in": 32,
        "out": 48,
        "levels": [
            {
                "blocks": 1,
                "btc": {
                    "in_axes": {"x": 32},
                    "out_axes": {"y": 48},
                    "bonds": {"k": 4},
                    "cores": [["k", "x"], ["y", "k"]],
                },
            }
        ],
    }
    assert spec_hash({"in": 32, "out": 48, "low_rank": {"rank": 4}}) == spec_hash(general)
    assert spec_hash({"in": 32, "out": 48, "low_rank": {"rank": 5}}) != spec_hash(general)


def test_mlr_is_its_explicit_levels():
    mlr = {"in": 64, "out": 64, "mlr": {"ranks": [8, 4, 2]}}  # default blocks 1, 2, 4
    levels = {
        "in": 64,
        "out": 64,
        "levels": [
            {"blocks": 4, "low_rank": {"rank": 2}},
            {"blocks": 1, "low_rank": {"rank": 8}},
            {"blocks": 2, "low_rank": {"rank": 4}},
        ],
    }
    assert spec_hash(mlr) == spec_hash(levels)


def test_size_one_axes_do_not_change_the_hash():
    plain = {
        "in": 8,
        "out": 8,
        "levels": [{"btc": {"in_axes": {"i": 8}, "out_axes": {"o": 8}, "cores": [["o", "i"]]}}],
    }
    padded = {
        "in": 8,
        "out": 8,
        "levels": [
            {
                "btc": {
                    "in_axes": {"u": 1, "i": 8},
                    "out_axes": {"o": 8},
                    "cores": [["i", "u", "o"]],
                }
            }
        ],
    }
    assert spec_hash(plain) == spec_hash(padded) == spec_hash({"in": 8, "out": 8, "dense": {}})


def test_different_structures_hash_differently():
    docs = [
        {"in": 64, "out": 64, k: v}
        for k, v in [
            ("dense", {}),
            ("monarch", {}),
            ("low_rank", {"rank": 8}),
            ("kronecker", {}),
            ("tensor_train", {"cores": 3, "ranks": 2}),
            ("btt", {"rank": 2}),
        ]
    ]
    assert len({spec_hash(d) for d in docs}) == len(docs)


def test_btt_row_chunks_are_exact_with_exact_flops():
    """Above 2 * BTT_ROW_CHUNK rows (CPU) the BTT runs in row chunks inside one autograd node:
    the same matrix, the same gradients, the same bmm FLOPs (weight gradients accumulate in
    place, counted through flopcount's baddbmm_ formula)."""
    spec = MatrixSpec.from_dict(
        {"in": 64, "out": 128, "levels": [{"blocks": 2, "btt": {"rank": 3}}]})
    module = compile_matrix(spec).double()
    for p in module.parameters():
        torch.nn.init.normal_(p)
    w = module.materialize()
    x = torch.randn(1100, 64, dtype=torch.float64, requires_grad=True)
    y = module(x)
    torch.testing.assert_close(y, x @ w.T)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *module.parameters()], g)
    small = [module(xc) for xc in x.split(300)]  # <= 2 chunks' worth: one pass each
    want = torch.autograd.grad(small, [x, *module.parameters()], list(g.split(300)))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    xf = torch.randn(1100, 64, requires_grad=True)
    mf = compile_matrix(spec)
    with flop_counter() as both:
        mf(xf).square().sum().backward()
    assert both.get_total_flops() == 3 * flops(spec) * 1100
