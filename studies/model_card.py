"""README.md of an export: what the model is, where it sits on the front, how to use it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlbtc_search.load import ARCHITECTURE
from mlbtc_search.model import ModelSpec

from .pareto import front as pareto_front
from .record import StudyInfo, TrialRecord


def _cost(t: TrialRecord) -> tuple[float, float]:
    assert t.point is not None
    return t.point


def _describe(spec: ModelSpec) -> str:
    layers = [f"{a.kind}, {a.heads} heads of dim {a.head_dim}" for a in spec.layers]
    if len(set(layers)) == 1:
        attn = f"{layers[0]} in every layer"
    else:
        attn = "; ".join(f"layer {i}: {s}" for i, s in enumerate(layers))
    a = spec.adapter
    return (f"- family: `{spec.family}`\n- width {spec.width}, depth {spec.depth}, MLP "
            f"{_mlp(spec)} x{spec.mlp_up.n_out // spec.width}, max_seq_len "
            f"{spec.max_seq_len}\n- attention: {attn}\n- adapter: {a.input_kind} input of dim "
            f"{a.input_dim} -> {a.output_dim} output(s) per position")


def front_position(recs: Sequence[TrialRecord], t: TrialRecord) -> str:
    """One sentence: the trial's rank by loss on the Pareto front and its relative FLOPs."""
    front = pareto_front([x for x in recs if x.exportable])
    lo, hi = _cost(front[0])[1], _cost(front[-1])[1]
    flops = _cost(t)[1]
    rel = f"{flops / lo:.3g}x the FLOPs/token of the cheapest front point and " \
          f"{flops / hi:.3g}x those of the most expensive"
    by_loss = sorted(front, key=lambda x: (_cost(x)[0], x.number))
    numbers = [x.number for x in by_loss]
    if t.number in numbers:
        return (f"On the Pareto front of {len(front)} non-dominated trials: rank "
                f"{numbers.index(t.number) + 1} of {len(front)} by loss (1 = lowest), {rel}.")
    return (f"Not on the Pareto front (dominated); the front has {len(front)} trials. "
            f"It costs {rel}.")


def retrain_command(out: Path, metrics: dict) -> str:
    """``mlbtc train OUT/architecture.yaml --budget B`` with the trial's seed, lr, batch size."""
    budget = metrics.get("budget_flops")
    train = metrics.get("train") or {}
    cmd = f"mlbtc train {out / ARCHITECTURE} --budget {_fmt(budget) if budget else 'B'}"
    for flag, value in (("--lr", train.get("lr")), ("--batch-size", train.get("batch_size")),
                        ("--seed", metrics.get("seed"))):
        if value is not None:
            cmd += f" {flag} {value}"
    return cmd


def model_card(study_name: str, info: StudyInfo, recs: Sequence[TrialRecord], t: TrialRecord,
               spec: ModelSpec, metrics: dict, out: Path) -> str:
    """README.md of an export."""
    task = info.task
    rows = [(k, metrics.get(k)) for k in ("val_loss", "metric", "flops_per_token", "params",
                                          "kv_cache_bytes_per_token", "budget_flops", "seed",
                                          "steps", "hash", "code_version")]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None)
    ev = metrics["evaluation"]
    return f"""# {spec.family} transformer, trial {t.number} of study `{study_name}`

A {spec.family} model (width {spec.width}, depth {spec.depth}) trained on the
`{task.get("name")}` task for {_fmt(metrics.get("budget_flops"))} FLOPs by `mlbtc search`.

{_describe(spec)}

{front_position(recs, t)}

| metric | value |
|---|---|
| metric_name | {metrics.get("metric_name")} |
{table}

## Load

```python
import mlbtc_search
model = mlbtc_search.load("{out}")   # eval mode; needs only the core (torch, pyyaml, safetensors)
```

`architecture.yaml` is the complete model spec, `model.safetensors` its weights; nothing here is
unpickled. The recorded validation numbers are reproduced by

```python
from trainers.tasks import get_task
spec_task = model.spec.to_dict()["task"]
task = get_task(spec_task["name"], **spec_task["options"])
task.evaluate(model, batches={ev["batches"]}, batch_size={ev["batch_size"]}, seed={ev["seed"]})
```

## Retrain

```sh
{retrain_command(out, metrics)}
```

The `task` key of `architecture.yaml` selects the task and its options; `metrics.json` has the
trial's full training settings (`train`).
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _mlp(spec: Any) -> str:
    """The MLP's family; ``up+down`` when its two halves differ."""
    up, down = spec.mlp_up.family, spec.mlp_down.family
    return up if up == down else f"{up}+{down}"


__all__ = ["front_position", "model_card", "retrain_command"]
