"""One prepared, resumable device run for issue 10 item 4 (CUDA): attention layers and BTT.

Measures, forward+backward in bf16 on one GPU, against ``F.scaled_dot_product_attention(
is_causal=True)`` in a plain layer: our standard attention, MLR (8 levels), sliding window 256 and
bilinear BTT, at T in {1024, 4096, 8192}, width 1024, 16 heads, batch 1; then BTT (rank 1) in bf16
against a dense ``nn.Linear`` GEMM at D=4096, 8192 rows.

The layers run the default CUDA path of ``attention_kernels`` (``attention_flex``: compiled
FlexAttention per score width with block masks, merged by log-sum-exp; a single region is one
SDPA call); each row records the backend and the first call's time (compilation included).
``flex_causal`` is the plain layer with one compiled flex call (causal block mask) in place of
SDPA: what flex itself costs against the fused SDPA kernel. ``MLBTC_ATTENTION_BACKEND=regions``
measures the unfused region kernel instead (write to another --out).

Every case runs in its own subprocess with its own timeout, appends one JSON line to the results
file as soon as it finishes (an OOM or a timeout is recorded too), and is skipped when the file
already has it: rerun the same command to resume. A summary table is printed at the end (also
from a partial file).

    python benchmarks/device_attention.py --out benchmarks/results/device_attention_h200.jsonl
    python benchmarks/device_attention.py --summary-only --out ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

T_VALUES = (1024, 4096, 8192)
WIDTH, HEADS = 1024, 16
LAYERS = ("sdpa", "flex_causal", "standard", "mlr8", "window256", "bilinear_btt")
MATRICES = ("dense", "btt")


def _attention_spec(name: str, T: int) -> dict:
    d = WIDTH // HEADS
    ranks = [d // 2] + [max(1, d // 2 // 7)] * 7
    return {
        "standard": {"kind": "standard", "heads": HEADS},
        "mlr8": {"kind": "mlr", "heads": HEADS, "ranks": ranks},
        "window256": {"kind": "sliding_window", "heads": HEADS, "window": 256},
        "bilinear_btt": {"kind": "bilinear_btt", "heads": HEADS},
    }[name]


def run_case(kind: str, name: str, T: int, repeats: int, dev: str = "cuda") -> dict:
    """Runs in the subprocess: one timed case on cuda, bf16 (``dev="cpu"``: a smoke check of the
    non-flex cases, float32)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mlbtc_search import MatrixSpec, compile_matrix
    from mlbtc_search.attention import Attention
    from mlbtc_search.attention_flex import compiled_flex, resolve_backend
    from mlbtc_search.attention_spec import AttentionSpec

    torch.manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    cuda = dev == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    backend = None
    if kind == "attention":
        backend = resolve_backend(torch.empty(0, device=dev))
        if name in ("sdpa", "flex_causal"):
            if name == "flex_causal":
                from torch.nn.attention.flex_attention import create_block_mask

                mask = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, T, T,
                                         device=dev)
                flex = compiled_flex()

                def attend(q, k, v):
                    return flex(q, k, v, block_mask=mask)
            else:
                def attend(q, k, v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            class Plain(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
                    self.out = nn.Linear(WIDTH, WIDTH, bias=False)

                def forward(self, x):
                    B, T_, D = x.shape
                    q, k, v = self.qkv(x).view(B, T_, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
                    y = attend(q, k, v)
                    return self.out(y.transpose(1, 2).reshape(B, T_, D))

            module: nn.Module = Plain()
        else:
            module = Attention(AttentionSpec.from_dict(_attention_spec(name, T), WIDTH, T))
        module = module.to(dev, dt)
        x = torch.randn(1, T, WIDTH, device=dev, dtype=dt, requires_grad=True)
        flops = None
    else:
        D, rows = 4096, 8192
        module = (nn.Linear(D, D, bias=False) if name == "dense"
                  else compile_matrix(MatrixSpec.from_dict({"in": D, "out": D,
                                                            "btt": {"rank": 1}})))
        module = module.to(dev, dt)
        x = torch.randn(rows, D, device=dev, dtype=dt, requires_grad=True)
        from mlbtc_search import flops as matrix_flops
        spec_flops = (2 * D * D if name == "dense" else
                      matrix_flops(MatrixSpec.from_dict({"in": D, "out": D, "btt": {"rank": 1}})))
        flops = 3 * spec_flops * rows

    def once() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).float().square().mean().backward()

    t0 = time.perf_counter()
    once()
    sync()
    first = time.perf_counter() - t0
    for _ in range(2):
        once()
    sync()
    if cuda:  # the peak of the timed steps, not of compiling and building block masks
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    out = {"ms": ms, "first_call_s": round(first, 2),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if backend is not None:
        out["backend"] = backend
    if flops is not None:
        out["tflops"] = flops / (ms / 1e3) / 1e12
    return out


def cases() -> list[tuple[str, str, int]]:
    out = [("attention", n, T) for T in T_VALUES for n in LAYERS]
    return out + [("matrix", n, 4096) for n in MATRICES]


def key(kind: str, name: str, T: int) -> str:
    return f"{kind}/{name}/{T}"


def load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def summary(results: dict[str, dict]) -> str:
    lines = [f"attention layers, width {WIDTH}, {HEADS} heads, batch 1, bf16, fwd+bwd "
             "(ms; x = ratio to plain causal SDPA)"]
    for T in T_VALUES:
        base = results.get(key("attention", "sdpa", T), {}).get("ms")
        cells = []
        for n in LAYERS:
            r = results.get(key("attention", n, T), {})
            if "ms" in r:
                ratio = f" ({r['ms'] / base:.2f}x)" if base else ""
                cells.append(f"{n} {r['ms']:.2f}{ratio}")
            else:
                cells.append(f"{n} {r.get('error', 'not run')}")
        lines.append(f"T={T}: " + "; ".join(cells))
    dense = results.get(key("matrix", "dense", 4096), {})
    btt = results.get(key("matrix", "btt", 4096), {})
    if "tflops" in dense and "tflops" in btt:
        ratio = btt["tflops"] / dense["tflops"]
        lines.append(f"D=4096, 8192 rows, bf16 fwd+bwd: dense {dense['tflops']:.1f} TFLOP/s, "
                     f"BTT rank 1 {btt['tflops']:.1f} TFLOP/s = {ratio:.2f} of dense "
                     "(target >= 0.5)")
    device = next((r["device"] for r in results.values() if "device" in r), "unknown device")
    backends = sorted({r["backend"] for r in results.values() if "backend" in r})
    lines.append(f"device: {device}; attention backend: {', '.join(backends) or 'unknown'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/device_attention.jsonl"))
    ap.add_argument("--case-timeout", type=float, default=240.0,
                    help="seconds per case, compilation included")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--case", nargs=3, metavar=("KIND", "NAME", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, name, T = args.case
        print(json.dumps(run_case(kind, name, int(T), args.repeats, args.device)))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = load(args.out)
    if not args.summary_only:
        for kind, name, T in cases():
            k = key(kind, name, T)
            if k in done:
                continue
            cmd = [sys.executable, __file__, "--case", kind, name, str(T),
                   "--repeats", str(args.repeats)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True,
                                   timeout=args.case_timeout)
                if p.returncode == 0:
                    row = {"key": k, **json.loads(p.stdout.strip().splitlines()[-1])}
                else:
                    last = (p.stderr.strip().splitlines() or ["?"])[-1]
                    row = {"key": k, "error": "OOM" if "out of memory" in p.stderr else last}
            except subprocess.TimeoutExpired:
                row = {"key": k, "error": f"timeout {args.case_timeout:.0f} s"}
            done[k] = row
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(summary(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
