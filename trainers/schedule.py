"""The learning-rate schedule: a pure function of the step.

``lr_factor(step, total, warmup, kind)`` multiplies every parameter group's µP learning rate
(``base lr * group multiplier``). Linear warmup over ``warmup`` steps (step 0 already gets
``1 / warmup``, so no step is wasted at lr 0), then either ``"constant"`` (the paper's ICL and LM
runs) or ``"cosine"`` decay to ``MIN_FACTOR`` of the peak at the last step, or ``"wsd"``
(warmup-stable-decay): constant, then a ``1 - sqrt`` cooldown over the last ``WSD_COOLDOWN`` of
the steps (Hagele et al. 2024: it matches cosine, and its stable phase does not depend on the
horizon, so a run can continue to a larger budget from a stable-phase checkpoint).
"""

from __future__ import annotations

import math

from mlbtc_search.errors import SpecError

SCHEDULES = ("constant", "cosine", "wsd")
MIN_FACTOR = 0.1
WSD_COOLDOWN = 0.2  # fraction of the steps spent in the cooldown of "wsd"


def check_schedule(kind: str) -> str:
    """``kind`` if it is a known schedule, else a SpecError naming the valid ones."""
    if kind not in SCHEDULES:
        raise SpecError(
            f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {kind!r}",
            path=("schedule",),
        )
    return kind


def lr_factor(step: int, total: int, warmup: int, kind: str = "constant") -> float:
    """Learning-rate factor in ``(0, 1]`` for 0-based ``step`` of a ``total``-step run.

    >>> [lr_factor(s, 10, 4) for s in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
    >>> lr_factor(9, 10, 0, "cosine")
    0.1
    """
    check_schedule(kind)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        cool = cooldown_steps(total, warmup, kind)
        i = step - (total - cool)  # 0-based step of the cooldown; factor 1 - sqrt(i+1 / cool+1)
        return 1.0 if i < 0 else 1.0 - math.sqrt(min(i + 1, cool) / (cool + 1))
    span = total - 1 - warmup  # cosine runs from step `warmup` (factor 1) to `total - 1` (0.1)
    if span <= 0:
        return 1.0
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return MIN_FACTOR + (1.0 - MIN_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cooldown_steps(total: int, warmup: int, kind: str) -> int:
    """Steps at the end of a ``total``-step run whose factor depends on ``total`` (the
    cooldown of "wsd", 0 for "constant", every step after warmup for "cosine")."""
    check_schedule(kind)
    if kind == "constant":
        return 0
    if kind == "cosine":
        return max(total - warmup, 0)
    return min(math.ceil(WSD_COOLDOWN * total), max(total - warmup, 0))
