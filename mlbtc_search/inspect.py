"""``mlbtc inspect``: what a matrix or model spec costs and what it can express."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from .errors import SpecError
from .linear import compile_matrix
from .matrix import MatrixSpec
from .plan import bilinear_cut, flops, graph_text, plan
from .yamlio import load_yaml

RANK_LIMIT = 4096


def is_model_document(data: Any) -> bool:
    return isinstance(data, dict) and ("width" in data or "attention" in data or
                                       "model" in data)


def matrix_report(spec: MatrixSpec, seed: int = 0) -> dict:
    """Everything ``inspect`` says about a matrix, as plain data."""
    rank = None
    if spec.n_in <= RANK_LIMIT and spec.n_out <= RANK_LIMIT:
        torch.manual_seed(seed)
        w = compile_matrix(spec).double().materialize()
        rank = int(torch.linalg.matrix_rank(w).item())
    levels = []
    for lv, p in zip(spec.levels, plan(spec), strict=True):
        cut = bilinear_cut(lv.btc) if spec.n_in == spec.n_out else None
        levels.append({
            "blocks": lv.blocks, "structure": lv.preset, "executor": p.kind,
            "params": lv.blocks * lv.btc.params, "flops": 2 * p.macs,
            "order": [f"G{c}" for c in p.order],
            "steps": [{"core": f"G{s.core}", "before": list(s.before), "after": list(s.after),
                       "flops": 2 * lv.blocks * s.macs} for s in p.steps],
            "bilinear_width": None if cut is None else lv.blocks * cut.width,
            "graph": graph_text(lv.btc),
        })
    return {"kind": "matrix", "in": spec.n_in, "out": spec.n_out, "family": spec.family,
            "params": spec.params, "flops": flops(spec), "rank": rank,
            "hash": spec.hash(), "levels": levels}


def format_matrix_report(r: dict) -> str:
    dense = r["in"] * r["out"]
    lines = [
        f"matrix {r['in']} -> {r['out']}  ({r['family']}, hash {r['hash']})",
        f"  params           {r['params']:,}  ({r['params'] / dense:.3g} x dense)",
        f"  FLOPs / vector   {r['flops']:,}  ({r['flops'] / (2 * dense):.3g} x dense)",
        f"  numerical rank   {r['rank'] if r['rank'] is not None else 'n/a (too large)'}"
        f" of {min(r['in'], r['out'])}",
    ]
    for i, lv in enumerate(r["levels"]):
        lines.append(f"  level {i}: {lv['structure']} x {lv['blocks']} blocks, executor "
                     f"{lv['executor']}, {lv['params']:,} params, {lv['flops']:,} FLOPs")
        lines.append("    contraction order: x -> " + " -> ".join(lv["order"]) + " -> y")
        for s in lv["steps"]:
            lines.append(f"      {s['core']}: ({', '.join(s['before'])}) -> "
                         f"({', '.join(s['after'])})  {s['flops']:,} FLOPs")
        if lv["bilinear_width"] is not None:
            lines.append(f"    as a bilinear form x^T M x': q.k width {lv['bilinear_width']}")
        lines.append("    graph:")
        lines.extend("      " + g for g in lv["graph"].splitlines())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .cli import print_json

    doc = load_yaml(args.file)
    if is_model_document(doc.data):
        from .model import ModelSpec, format_model_report, model_report

        try:
            spec = ModelSpec.from_dict(doc.data)
        except SpecError as err:
            raise doc.locate(err) from None
        report = model_report(spec, seq_len=args.seq_len)
        text = format_model_report(report)
    else:
        try:
            spec = MatrixSpec.from_dict(doc.data)
        except SpecError as err:
            raise doc.locate(err) from None
        report = matrix_report(spec)
        text = format_matrix_report(report)
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(text + "\n")
    return 0
