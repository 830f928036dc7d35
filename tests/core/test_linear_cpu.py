"""The fused C++ CPU kernel for two-core BTT matrices (``linear_cpu``): built and used, exact
against the bmm path (``linear._BTT``) and the dense matrix for every gradient subset, in chunks
of rows over one and two threads, counted FLOPs equal to the bmm path's, and the shapes, dtypes,
switch and broken build that fall back."""

from __future__ import annotations

import pytest
import torch

from mlbtc_search import MatrixSpec, compile_matrix, flops, linear_cpu
from mlbtc_search.flopcount import flop_counter

needs_kernel = pytest.mark.usefixtures("btt_kernel")

# (dtype, blocks k, rank s, in factors (c, d), out factors (a, b)): lanes (8 in float64, 16 in
# float32) divide b and d
CASES = [
    (torch.float64, 1, 1, (3, 8), (5, 8)),
    (torch.float64, 2, 2, (2, 16), (3, 16)),
    (torch.float32, 1, 2, (4, 16), (6, 16)),
    (torch.float32, 2, 1, (2, 16), (4, 32)),
    (torch.float32, 1, 2, (33, 16), (3, 16)),  # C*S = 66 > 64: the second GEMM in K blocks
]


def _module(dtype, k, s, cd, ab, seed=0):
    c, d = cd
    a, b = ab
    spec = MatrixSpec.from_dict({"in": k * c * d, "out": k * a * b, "levels": [
        {"blocks": k, "btt": {"rank": s, "in_factors": [c, d], "out_factors": [a, b]}}]})
    torch.manual_seed(seed)
    return compile_matrix(spec).to(dtype), spec


def _run(m, x, go, need=(True, True, True)):
    """Output, the gradients asked for, and the FlopCounterMode counts per op."""
    x = x.detach().requires_grad_(need[0])
    for p, n in zip(m.cores, need[1:], strict=True):
        p.requires_grad_(n)
        p.grad = None
    with flop_counter() as counter:
        y = m(x)
        y.backward(go)
    grads = [t.grad for t, n in zip((x, *m.cores), need, strict=True) if n]
    return [y.detach(), *grads], counter


def _ops(counter) -> dict[str, int]:
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else \
        {"rtol": 2e-5, "atol": 2e-5}


@needs_kernel
@pytest.mark.parametrize("need", [(True, True, True), (False, True, True), (True, False, False),
                                  (False, False, True), (True, True, False)])
@pytest.mark.parametrize("rows", [1, 7, 23])
@pytest.mark.parametrize("dtype, k, s, cd, ab", CASES)
def test_kernel_equals_bmm_path_and_dense(dtype, k, s, cd, ab, rows, need, monkeypatch):
    """Chunks of 5 rows (N = 1, 7 and 23 rows: one chunk, a partial last one, several per
    thread; with N = 23 also one super-chunk per chunk), gradients for every subset of
    (x, R, L); the same FLOPs as the bmm path."""
    monkeypatch.setattr(linear_cpu, "MAX_CHUNK", 5)
    monkeypatch.setattr(linear_cpu, "SUPER_BYTES", 1 if rows == 23 else linear_cpu.SUPER_BYTES)
    m, spec = _module(dtype, k, s, cd, ab)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, spec.n_in, generator=g, dtype=dtype)
    go = torch.randn(rows, spec.n_out, generator=g, dtype=dtype)
    fused, counted = _run(m, x, go, need)
    assert "mlbtc_btt.btt_forward" in _ops(counted)
    assert ("mlbtc_btt.btt_backward" in _ops(counted)) == any(need)
    monkeypatch.setenv(linear_cpu.ENV, "0")
    ref, ref_counted = _run(m, x, go, need)
    assert "mlbtc_btt.btt_forward" not in _ops(ref_counted)
    assert counted.get_total_flops() == ref_counted.get_total_flops()
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))
    torch.testing.assert_close(fused[0], x @ m.materialize().T, **_tol(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype, k, s, cd, ab", CASES[1:3])
def test_two_threads_sum_their_partial_gradients(dtype, k, s, cd, ab, monkeypatch):
    """Two threads own a range of chunks each and their own partial weight gradients."""
    monkeypatch.setattr(linear_cpu, "MAX_CHUNK", 3)
    m, spec = _module(dtype, k, s, cd, ab)
    x = torch.randn(40, spec.n_in, dtype=dtype)
    go = torch.randn(40, spec.n_out, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused, _ = _run(m, x, go)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv(linear_cpu.ENV, "0")
    ref, _ = _run(m, x, go)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))


@needs_kernel
def test_counted_flops_equal_the_plan():
    """Forward plus backward (x and both cores) is 3 x flops(spec) per row, also for inputs with
    leading batch axes and non-contiguous inputs."""
    m, spec = _module(torch.float32, 2, 2, (2, 16), (3, 16))
    x = torch.randn(3, 4, 2 * spec.n_in)[..., ::2]  # (3, 4, n_in), not contiguous
    with flop_counter() as counter:
        m(x.requires_grad_()).sum().backward()
    assert "mlbtc_btt.btt_forward" in _ops(counter)
    assert counter.get_total_flops() == 3 * flops(spec) * 12


@needs_kernel
@pytest.mark.parametrize("case", ["lanes", "bfloat16", "autocast", "switch"])
def test_fallbacks_run_the_bmm_path_exactly(case, monkeypatch):
    """b not a multiple of the lanes (8 in float32), bfloat16, autocast and MLBTC_CPU_KERNEL=0
    run ``_BTT``; results still equal the dense matrix."""
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    ab = (4, 8) if case == "lanes" else (4, 16)
    m, spec = _module(dtype, 1, 1, (4, 16), ab)
    if case == "switch":
        monkeypatch.setenv(linear_cpu.ENV, "0")
    x = torch.randn(9, spec.n_in, dtype=dtype)
    with flop_counter() as counter, torch.autocast("cpu", torch.bfloat16,
                                                   enabled=case == "autocast"):
        y = m(x.requires_grad_())
        y.float().sum().backward()
    assert "mlbtc_btt.btt_forward" not in _ops(counter)
    assert counter.get_total_flops() == 3 * flops(spec) * 9
    if case in ("lanes", "switch"):
        ref = x.detach() @ m.materialize().T
        torch.testing.assert_close(y.detach(), ref, rtol=2e-5, atol=2e-5)


def test_unbuildable_kernel_warns_once_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "btt_linear.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setattr(linear_cpu, "SOURCE", broken)
    monkeypatch.setattr(linear_cpu, "_state", {})
    monkeypatch.delenv(linear_cpu.ENV, raising=False)  # (the attempt is what is tested)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    m, spec = _module(torch.float64, 1, 1, (3, 8), (5, 8))
    x = torch.randn(4, spec.n_in, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        y = m(x)
    assert linear_cpu._state == {"ok": False}
    torch.testing.assert_close(y, x @ m.materialize().T, rtol=1e-10, atol=1e-10)
