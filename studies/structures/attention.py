"""Sample one layer's attention (an AttentionSpec YAML dict in the explicit ``groups`` form).

Heads come in groups, each group its own structure (heterogeneous heads):

- ``heads``: a categorical over the allowed totals (a total that does not divide the width is
  repaired to the largest allowed one that does);
- ``groups``: 1..G groups (at most one per head); the heads are split by stick breaking, every
  group gets at least one;
- per group: ``local`` (a sliding-window group: one global level and a window 2^k) or ``levels``
  nested sequence levels: level 0 is global, level l has blocks of the previous size halved
  ``halvings`` times (the divisor rule keeps them exact and nested; a level that cannot shrink
  further ends the list);
- per level: the bilinear score matrix from the matrix distribution (``sample_matrix``).

The result carries ``family``: the attention preset it equals when it equals one (standard,
mlr, sliding_window, bilinear_btt, bilinear_mlr), else ``general``; the spec's hash ignores it.
"""

from __future__ import annotations

import math
from typing import Any

from studies.descriptors import attention_family  # one classifier for sampler and reports

from .matrix import nearest_divisor, sample_matrix
from .options import AttentionOptions


def split_heads(trial: Any, name: str, heads: int, groups: int) -> list[int]:
    """``heads`` split into ``groups`` parts >= 1 by stick breaking over the spare heads."""
    parts, left = [], heads
    for g in range(groups - 1):
        spare = left - (groups - g)  # heads beyond one per remaining group
        u = trial.suggest_float(f"{name}.g{g}.share", 0.0, 1.0)
        h = 1 + min(spare, int(u * (spare + 1)))
        parts.append(h)
        left -= h
    parts.append(left)
    return parts


def sample_attention(trial: Any, name: str, opts: AttentionOptions, width: int,
                     seq_len: int) -> dict:
    """An attention dict for ``AttentionSpec.from_dict`` (``kind: general``)."""
    raw = trial.suggest_categorical(f"{name}.heads", list(opts.heads))
    ok = [h for h in opts.heads if width % h == 0 and h <= raw] or [1]
    heads = raw if width % raw == 0 else max(ok)
    n_groups = 1
    if opts.groups > 1:
        n_groups = min(trial.suggest_int(f"{name}.groups", 1, opts.groups), heads)
    sizes = split_heads(trial, name, heads, n_groups)
    groups = [_group(trial, f"{name}.g{g}", opts, h, width, seq_len)
              for g, h in enumerate(sizes)]
    out: dict[str, Any] = {"kind": "general", "groups": groups}
    for key in ("value", "output"):
        m = getattr(opts, key)
        out[key] = {"dense": {}} if m is None else sample_matrix(trial, f"{name}.{key}", m,
                                                                 width, width)
    out["family"] = attention_family(out, width, seq_len)
    return out


def _group(trial: Any, p: str, opts: AttentionOptions, heads: int, width: int,
           seq_len: int) -> dict:
    local = False
    if opts.windows is not None:
        local = trial.suggest_categorical(f"{p}.local", [False, True])
    if local:
        lo, hi = (int(math.log2(w)) for w in opts.windows or (4, 4))
        window = 2 ** trial.suggest_int(f"{p}.window_log2", lo, hi)
        score = sample_matrix(trial, f"{p}.l0.score", opts.score, width, width)
        return {"heads": heads, "levels": [{"block_size": None, "score": score}],
                "window": window}
    n_levels = 1
    if opts.sequence_levels > 1:
        n_levels = trial.suggest_int(f"{p}.levels", 1, opts.sequence_levels)
    levels: list[dict] = []
    prev = seq_len
    for lv in range(n_levels):
        block: int | None = None
        if lv > 0:
            h = trial.suggest_int(f"{p}.l{lv}.halvings", 1, opts.halvings)
            smaller = [d for d in _proper_divisors(prev)]
            if not smaller:
                break  # blocks of one position cannot be split further
            block = nearest_divisor(prev, prev / 2 ** h)
            if block == prev:
                block = max(smaller)
            prev = block
        score = sample_matrix(trial, f"{p}.l{lv}.score", opts.score, width, width)
        levels.append({"block_size": block, "score": score})
    return {"heads": heads, "levels": levels}


def _proper_divisors(n: int) -> list[int]:
    return [d for d in range(1, n) if n % d == 0]
