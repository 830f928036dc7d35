"""Pure data functions: trials in, plain JSON-safe rows and numbers out.

Nothing here touches the storage, Dash or Plotly. A trial is a
:class:`studies.record.TrialRecord`; its row is :meth:`TrialRecord.row` (the same row as
``mlbtc pareto --json``) plus display columns (width, depth, heads, attention, MLP, a one-line
architecture). Fronts, hypervolume and summaries are those of :mod:`studies.pareto`. Non-finite
floats (NaN, inf) become ``None`` in every row, and :func:`fmt` shows them as ``"n/a"``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from studies.pareto import default_reference, front, hypervolume_history
from studies.pareto import study_summary as _summary
from studies.record import StudyInfo, TrialRecord

NA = "n/a"

Point = tuple[float, float]


# ---- numbers ----------------------------------------------------------------------------------
def finite(value: Any) -> float | None:
    """A finite float, or None (for None, NaN, inf, and anything that is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A number for people: ``"n/a"`` for missing or non-finite, ``digits`` significant."""
    v = finite(value)
    if v is None:
        return NA
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{v:.{digits}g}"


def fmt_si(value: Any, unit: str = "") -> str:
    """``1.23e6`` -> ``"1.23 M"`` (k, M, G, T, P); ``"n/a"`` when not finite."""
    v = finite(value)
    if v is None:
        return NA
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def fmt_time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else NA


def matrix_label(m: Any) -> str:
    """A MatrixSpec dict in a few characters: ``"btt(rank=1)"``, ``"4x low_rank(rank=2)"``."""
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "?"
    levels = m.get("levels")
    if not isinstance(levels, list):
        levels = [m]
    parts = []
    for lv in levels:
        if not isinstance(lv, dict):
            return "?"
        kinds = [k for k in lv if k not in ("blocks", "in", "out")]
        if not kinds:
            continue
        kind = kinds[0]
        params = lv[kind] if isinstance(lv[kind], dict) else {}
        inner = ",".join(f"{k}={_short(v)}" for k, v in params.items())
        blocks = lv.get("blocks", 1)
        parts.append((f"{blocks}x " if blocks not in (1, None) else "")
                     + kind + (f"({inner})" if inner else ""))
    return " + ".join(parts) or "?"


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "/".join(str(x) for x in v)
    return str(v)


def _low_rank(m: Any) -> int | None:
    """The rank of a one-level, one-block low-rank matrix dict, else None."""
    try:
        (lv,) = m["levels"]
        return int(lv["low_rank"]["rank"]) if lv.get("blocks", 1) == 1 else None
    except (KeyError, TypeError, ValueError):
        return None


def attention_label(a: Any) -> tuple[int | None, str]:
    """``(heads, structure)`` of an attention dict (expanded ``groups`` form or a preset)."""
    if not isinstance(a, dict):
        return None, "?"
    groups = a.get("groups")
    if not isinstance(groups, list):  # a preset as written in YAML
        keys = [f"{k}={_short(a[k])}" for k in ("rank", "ranks", "window", "head_dim",
                                                "block_sizes") if k in a]
        return a.get("heads"), " ".join(keys)
    heads, parts = 0, []
    for g in groups:
        heads += int(g.get("heads", 0))
        levels = g.get("levels") or []
        ranks = [_low_rank(lv.get("score")) for lv in levels]
        blocks = ["global" if lv.get("block_size") is None else str(lv["block_size"])
                  for lv in levels]
        if ranks and all(r is not None for r in ranks):
            if len(ranks) == 1:
                text = f"rank {ranks[0]}"
            else:
                text = f"ranks {'/'.join(map(str, ranks))} @ {'/'.join(blocks)}"
        else:
            text = " | ".join(matrix_label(lv.get("score")) for lv in levels)
        if g.get("window") is not None:
            text += f" window {g['window']}"
        parts.append(f"{g.get('heads')}h {text}" if len(groups) > 1 else text)
    for name in ("value", "output"):
        label = matrix_label(a.get(name))
        if label != "dense":
            parts.append(f"W_{name[0].upper()} {label}")
    return heads, "; ".join(parts)


def describe_spec(spec: Any) -> dict[str, Any]:
    """Width, depth, heads, attention and MLP structure of a ModelSpec dict, for tables."""
    out: dict[str, Any] = {"width": None, "depth": None, "heads": None, "attention": NA,
                           "mlp": NA}
    if not isinstance(spec, dict):
        return out
    out["width"] = spec.get("width") if isinstance(spec.get("width"), int) else None
    out["depth"] = spec.get("depth") if isinstance(spec.get("depth"), int) else None
    attn = spec.get("attention")
    layers = spec.get("layers")
    if attn is None and isinstance(layers, list) and layers:
        attn = layers[0]
        heads, text = attention_label(attn)
        text += " (layer 0; layers differ)"
    else:
        heads, text = attention_label(attn)
    out["heads"], out["attention"] = heads, text or NA
    mlp = matrix_label(spec.get("mlp", "dense"))
    ratio = spec.get("mlp_ratio")
    out["mlp"] = f"{mlp} x{ratio}" if ratio else mlp
    return out


def architecture_line(family: str, desc: dict[str, Any], flops: Any, loss: Any) -> str:
    """One line for hover text: family, sizes, structure, FLOPs, loss."""
    return (f"{family} · D={desc.get('width') or NA} L={desc.get('depth') or NA} "
            f"H={desc.get('heads') or NA} · attn: {desc.get('attention')} · mlp: "
            f"{desc.get('mlp')} · {fmt_si(flops, 'FLOPs/tok')} · loss {fmt(loss)}")


DESCRIPTOR_PREFIX = "d_"


def descriptor_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The numeric descriptor columns that vary over the rows (what the front can show)."""
    values: dict[str, set] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(DESCRIPTOR_PREFIX) and finite(v) is not None:
                values.setdefault(k, set()).add(v)
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def importances(recs: Sequence[TrialRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """PED-ANOVA importances for loss and FLOPs of the sampled parameters and of the structure
    descriptors, from the records alone (``studies.importance.descriptor_importances``)."""
    from studies.importance import descriptor_importances

    done = [r for r in recs if r.point is not None]
    values = [r.point for r in done]
    objectives = ["val_loss", "flops_per_token"]
    return {"params": descriptor_importances(values, [r.sampled for r in done], objectives),
            "descriptors": descriptor_importances(
                values, [(r.descriptors or {}).get("summary", {}) for r in done], objectives)}


def trial_row(rec: TrialRecord) -> dict[str, Any]:
    """The table row of one trial: :meth:`TrialRecord.row` plus the display columns."""
    row = rec.row()
    desc = describe_spec(rec.spec)
    row.update(width=desc["width"], depth=desc["depth"], heads=desc["heads"],
               attention=desc["attention"], mlp=desc["mlp"],
               arch=architecture_line(row["structure"], desc, rec.flops_per_token,
                                      rec.val_loss),
               on_front=False)
    for key, value in (rec.descriptors or {}).get("summary", {}).items():
        row[DESCRIPTOR_PREFIX + key] = value  # colour / size the front by these
    return row


# ---- a whole study ----------------------------------------------------------------------------
@dataclass
class StudyView:
    """Everything a study page shows, computed once per change of the study's trials."""

    rows: list[dict[str, Any]]
    front: list[int]  # trial numbers on the Pareto front, cheapest first
    reference: tuple[float, float] | None  # in (val_loss, log10 FLOPs/token)
    hv_history: list[tuple[int, float]]  # (trial number, hypervolume) per COMPLETE trial
    summary: dict[str, Any]  # studies.pareto.study_summary
    last_update: dt.datetime | None
    families: list[str] = field(default_factory=list)
    descriptors: list[str] = field(default_factory=list)  # keys of rows (DESCRIPTOR_PREFIX...)
    importances: dict[str, Any] = field(default_factory=dict)  # see importances()

    @property
    def n_trials(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> dict[str, int]:
        return self.summary["states"]

    @property
    def best_loss(self) -> float | None:
        return self.summary["best_loss"]

    @property
    def hypervolume(self) -> float | None:
        return self.summary["hypervolume"]


def study_view(recs: Sequence[TrialRecord], name: str = "", info: StudyInfo | None = None
               ) -> StudyView:
    """Rows, front, hypervolume history and summary of one study's records."""
    recs = sorted(recs, key=lambda r: r.number)
    rows = [trial_row(r) for r in recs]
    on_front = [r.number for r in front(recs)]
    for row in rows:
        row["on_front"] = row["number"] in set(on_front)
    history = hypervolume_history(recs)
    points = [(r.val_loss, math.log10(r.flops_per_token)) for r in recs
              if r.point is not None and r.flops_per_token > 0]  # type: ignore[operator]
    times = [t for r in recs for t in (r.completed, r.started) if t is not None]
    return StudyView(
        rows=rows, front=on_front,
        reference=default_reference(points) if points else None, hv_history=history,
        summary=_summary(name, info or StudyInfo(), recs),
        last_update=max(times) if times else None,
        families=sorted({r["family"] for r in rows}),
        descriptors=descriptor_keys(rows), importances=importances(recs),
    )


def front_rows(view: StudyView) -> list[dict[str, Any]]:
    """The rows of the front's trials, cheapest first."""
    by_number = {r["number"]: r for r in view.rows}
    return [by_number[n] for n in view.front]


def filter_rows(rows: Sequence[dict[str, Any]], families: Sequence[str] | None,
                states: Sequence[str] | None) -> list[dict[str, Any]]:
    """Rows whose family and state are selected (an empty selection keeps everything)."""
    fam, st = set(families or ()), set(states or ())
    return [r for r in rows if (not fam or r["family"] in fam) and (not st or r["state"] in st)]


def study_summary(name: str, info: StudyInfo, view: StudyView) -> dict[str, Any]:
    """One line of the studies page: :func:`studies.pareto.study_summary`, flattened for the
    table (a count per state, the front size as ``front``, the time formatted)."""
    summary = {**view.summary, "name": name, "task": info.task_name or NA,
               "budget_flops": info.budget_flops}
    return {**summary, **summary["states"], "front": summary["front_size"],
            "last_update": fmt_time(view.last_update)}


def curve_series(curve: Any) -> dict[str, list[tuple[float, float]]]:
    """``{"train_loss": [(flops, loss), ...], "val_loss": [...], "metric": [...]}``.

    Entries without FLOPs, and non-finite values, are dropped (a NaN run still plots its
    finite part).
    """
    out: dict[str, list[tuple[float, float]]] = {"train_loss": [], "val_loss": [], "metric": []}
    if not isinstance(curve, list):
        return out
    for entry in curve:
        if not isinstance(entry, dict):
            continue
        x = finite(entry.get("flops"))
        if x is None:
            continue
        for key, series in out.items():
            y = finite(entry.get(key))
            if y is not None:
                series.append((x, y))
    return out


def trial_metrics(rec: TrialRecord) -> list[tuple[str, str]]:
    """(label, formatted value) pairs for the trial page."""
    items: list[tuple[str, str]] = [
        ("state", rec.state),
        ("family", rec.family or NA),
        ("validation loss", fmt(rec.val_loss, 6)),
        (rec.metric_name or "metric", fmt(rec.metric, 6)),
        ("FLOPs / token (forward)", fmt_si(rec.flops_per_token)),
        ("parameters (non-embedding)", fmt(rec.params)),
        ("KV-cache bytes / token", fmt(rec.kv_cache_bytes_per_token)),
        ("training FLOPs", fmt_si(rec.train_flops)),
        ("budget FLOPs", fmt_si(rec.budget_flops)),
        ("steps", fmt(rec.steps)),
        ("seed", str(rec.seed if rec.seed is not None else NA)),
        ("duration", f"{fmt(rec.duration_s, 3)} s" if rec.duration_s is not None else NA),
        ("architecture hash", rec.hash or NA),
        ("started", fmt_time(rec.started)),
        ("completed", fmt_time(rec.completed)),
        ("code version", rec.code_version or NA),
    ]
    if rec.duplicate_of is not None:
        items.append(("duplicate of trial", str(rec.duplicate_of)))
    if rec.seed_results:
        items.append(("seeds (loss each)", ", ".join(
            f"{r.get('seed')}: {fmt(r.get('val_loss'), 4)}" for r in rec.seed_results)))
        items.append(("loss spread over seeds (std)", fmt(rec.loss_std, 4)))
    desc = rec.descriptors or {}
    if desc:
        items.append(("structure", desc.get("label") or rec.structure or NA))
        for layer, lay in enumerate(desc.get("layers", [])):
            for g, group in enumerate(lay.get("groups", [])):
                levels = "; ".join(
                    f"{'global' if lv.get('block_size') is None else lv['block_size']}: "
                    f"{lv.get('family')} rank {lv.get('rank')} q.k {lv.get('qk_width')}"
                    for lv in group.get("levels", []))
                window = f", window {group['window']}" if group.get("window") else ""
                items.append((f"layer {layer} group {g} ({group.get('heads')} heads{window})",
                              levels))
        for key, value in desc.get("summary", {}).items():
            items.append((f"descriptor: {key.replace('_', ' ')}", fmt(value)))
    return items
