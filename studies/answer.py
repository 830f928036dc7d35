"""The answer to "which structure?", plainly: a per-family table, the front, one sentence, a PNG.

Pure functions over :class:`Entry` values (one per trained architecture, its seeds averaged), so
``mlbtc search`` (at the end), ``mlbtc pareto`` and tests share them.

- **Per-family table.** A family (``descriptors.family_label``) is compared on its *own* front
  at a matched compute: ``matched_flops`` is the largest of the families' cheapest FLOPs, so every
  family has at least one architecture at or under it, and each family's row gives its best loss
  at <= that FLOPs (and the FLOPs of that architecture), its best loss at any FLOPs, its number of
  architectures and trials, and for repeated seeds the spread (standard deviation over seeds) of
  its best architecture.
- **The front** (loss against FLOPs over all families) with the attributes that matter beside
  the structure: width, depth, heads, learning rate.
- **One sentence** saying which families hold which FLOPs range of the front.
- **A PNG** of every architecture (colour = family, error bars = seed spread) with the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.pareto import pareto_front
from studies.record import TrialRecord
from studies.storage import artifact_dir_for, sqlite_path


@dataclass(frozen=True)
class Entry:
    """One architecture: mean loss over its seeds, their standard deviation, FLOPs per token."""

    number: int
    family: str
    loss: float
    flops: float
    loss_std: float = 0.0
    seeds: int = 1
    label: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)  # width, depth, heads, lr, ...


@dataclass(frozen=True)
class FamilyRow:
    family: str
    architectures: int
    trials: int
    matched_loss: float
    matched_flops: float
    matched_std: float
    best_loss: float
    best_flops: float
    front: int  # points of the family's own front


def entries(recs: Sequence[TrialRecord]) -> list[Entry]:
    """One entry per COMPLETE trial: its structure label (else its recorded family), the mean
    loss over its seeds and their spread, FLOPs, and width / depth / heads / lr."""
    out = []
    for r in recs:
        if r.point is None:
            continue
        spec = r.spec or {}
        summary = (r.descriptors or {}).get("summary", {})
        attrs: dict[str, Any] = {k: spec[k] for k in ("width", "depth") if k in spec}
        if "heads" in summary:
            attrs["heads"] = int(summary["heads"])
        if "lr" in r.train:
            attrs["lr"] = r.train["lr"]
        out.append(Entry(r.number, r.structure or r.family or "unknown", r.point[0],
                         r.point[1], r.loss_std or 0.0, r.seeds or 1,
                         (r.descriptors or {}).get("label", ""), attrs))
    return out


def png_path(url: str, study_name: str, artifact_dir: str | None = None) -> Path:
    """Where the front's PNG goes: beside a SQLite file (``<db dir>/<study>-front.png``), else
    in the study's artifact directory (``artifact_dir``, the one the study recorded)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name) or "study"
    db = sqlite_path(url)
    if db is not None:
        return (db.parent / f"{safe}-front.png").resolve()
    return Path(artifact_dir or artifact_dir_for(url, study_name)) / "front.png"


def _ok(e: Entry) -> bool:
    return math.isfinite(e.loss) and math.isfinite(e.flops)


def front(entries: Sequence[Entry]) -> list[Entry]:
    """The non-dominated entries (loss and FLOPs minimized), by increasing FLOPs."""
    good = [e for e in entries if _ok(e)]
    return [good[i] for i in pareto_front([(e.flops, e.loss) for e in good])]


def matched_flops(entries: Sequence[Entry]) -> float:
    """The largest of the families' cheapest FLOPs (every family has a point at or under it)."""
    cheapest: dict[str, float] = {}
    for e in filter(_ok, entries):
        cheapest[e.family] = min(cheapest.get(e.family, math.inf), e.flops)
    return max(cheapest.values()) if cheapest else math.nan


def family_table(entries: Sequence[Entry]) -> list[FamilyRow]:
    """One row per family, best matched loss first."""
    good = [e for e in entries if _ok(e)]
    cap = matched_flops(good)
    rows = []
    for fam in sorted({e.family for e in good}):
        mine = [e for e in good if e.family == fam]
        own = front(mine)
        at = min((e for e in own if e.flops <= cap), key=lambda e: (e.loss, e.flops))
        best = min(own, key=lambda e: (e.loss, e.flops))
        rows.append(FamilyRow(fam, len(mine), sum(e.seeds for e in mine), at.loss, at.flops,
                              at.loss_std, best.loss, best.flops, len(own)))
    return sorted(rows, key=lambda r: (r.matched_loss, r.matched_flops, r.family))


def sentence(entries: Sequence[Entry]) -> str:
    """What the front is, in one sentence."""
    pts = front(entries)
    if not pts:
        return "No architecture finished, so there is no front yet."
    fams = list(dict.fromkeys(e.family for e in pts))
    runs: list[tuple[str, list[Entry]]] = []
    for e in pts:
        if runs and runs[-1][0] == e.family:
            runs[-1][1].append(e)
        else:
            runs.append((e.family, [e]))
    best = pts[-1]
    head = (f"The front has {len(pts)} point{'s' * (len(pts) != 1)} from {len(fams)} "
            f"famil{'ies' if len(fams) != 1 else 'y'}")
    if len(pts) == 1:
        return (f"The front is one point: #{best.number} ({best.family}, {best.flops:.3g} "
                f"FLOPs/token, loss {best.loss:.4g}); every other architecture costs more FLOPs "
                "and reaches a higher loss.")
    if len(runs) == 1:
        return (f"{head}: {fams[0]} is best at every FLOPs tried, from {pts[0].flops:.3g} to "
                f"{best.flops:.3g} FLOPs/token (lowest loss {best.loss:.4g}).")
    parts = []
    for i, (fam, run) in enumerate(runs):
        lo, hi = run[0].flops, run[-1].flops
        span = f"at {lo:.3g}" if lo == hi else f"from {lo:.3g} to {hi:.3g}"
        parts.append(f"{fam} {span}" + (" FLOPs/token" if i == 0 else ""))
    return (f"{head}: going up in compute, {', then '.join(parts)}; the lowest loss is "
            f"{best.loss:.4g} ({best.family}, {best.flops:.3g} FLOPs/token).")


def _loss(v: float, std: float, seeds: int) -> str:
    return f"{v:.4f}" + (f" ± {std:.4f}" if seeds > 1 else "")


def format_answer(entries: Sequence[Entry], png: str | Path | None = None) -> str:
    """The table, the front with its attributes, the sentence and the PNG path, as text."""
    good = [e for e in entries if _ok(e)]
    if not good:
        return "No architecture finished: nothing to compare yet."
    rows = family_table(good)
    seeds = max(e.seeds for e in good)
    cap = matched_flops(good)
    lines = [f"Per family (own front; matched = best loss at <= {cap:.3g} FLOPs/token, the "
             f"cheapest point of the costliest family; ± = std over {seeds} seeds)"
             if seeds > 1 else
             f"Per family (own front; matched = best loss at <= {cap:.3g} FLOPs/token, the "
             "cheapest point of the costliest family; one seed each, so small gaps are noise)"]
    w = max(len("family"), *(len(r.family) for r in rows))
    lines.append(f"  {'family':<{w}}  {'matched loss':>18}  {'at FLOPs':>9}  {'best loss':>9}  "
                 f"{'at FLOPs':>9}  {'archs':>5}  {'trials':>6}")
    for r in rows:
        lines.append(f"  {r.family:<{w}}  {_loss(r.matched_loss, r.matched_std, seeds):>18}  "
                     f"{r.matched_flops:>9.3g}  {r.best_loss:>9.4f}  {r.best_flops:>9.3g}  "
                     f"{r.architectures:>5}  {r.trials:>6}")
    lines.append("Front (all families):")
    for e in front(good):
        a = e.attrs
        extra = "  ".join(f"{k} {_fmt(a[k])}" for k in ("width", "depth", "heads", "lr")
                          if k in a)
        lines.append(f"  #{e.number:<4} {_loss(e.loss, e.loss_std, e.seeds):>18}  "
                     f"{e.flops:>9.3g} FLOPs/token  {e.family}  {extra}"
                     + (f"  [{e.label}]" if e.label and e.label != e.family else ""))
    lines.append(sentence(good))
    if png is not None:
        lines.append(f"Picture of the front: {png}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_front(entries: Sequence[Entry], path: str | Path, title: str = "") -> Path:
    """Every architecture (colour = family, error bars = seed spread) and the front, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [e for e in entries if _ok(e)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, fam in enumerate(sorted({e.family for e in good})):
        mine = [e for e in good if e.family == fam]
        ax.errorbar([e.flops for e in mine], [e.loss for e in mine],
                    yerr=[e.loss_std for e in mine], fmt="o", ms=5, capsize=2,
                    color=cmap(i % 10), label=fam, alpha=0.85)
    pts = front(good)
    if pts:
        ax.step([e.flops for e in pts], [e.loss for e in pts], where="post", color="black",
                lw=1, alpha=0.6)
        ax.scatter([e.flops for e in pts], [e.loss for e in pts], s=110, facecolors="none",
                   edgecolors="black", linewidths=1.3, label="front", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per token (non-embedding)")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(title or "loss against FLOPs")
    if good:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
