"""Budget rungs and the asynchronous multi-objective promotion rule (MO-ASHA, written here).

A multi-fidelity search names its budgets and a reduction factor::

    budgets: [1e11, 3e11, 1e12]   # training FLOPs of rung 0, 1, 2
    promote: {eta: 3}

Every architecture trains at rung 0. A trial that has finished rung ``k`` is promoted to rung
``k + 1`` when it is among the best ``floor(n_k / eta)`` of the ``n_k`` results recorded at rung
``k`` so far. The decision is asynchronous, as in ASHA (Li et al. 2020): whenever a worker is
free, :meth:`Ladder.next_promotion` looks at the rungs from the top down and hands out the first
trial that qualifies and has not been promoted yet; when none does, the worker starts a new
architecture at rung 0. Nobody waits for a rung to fill, and a promotion is never taken back.

"Best" is a total order over the rung's points ``(loss, FLOPs per token)``, both minimised:

1. non-dominated sorting: front 0 is the Pareto front of the rung, front 1 that of the rest, ...
2. inside a front, NSGA-II crowding distance on normalised objectives (loss min-max scaled over
   the rung's finite points, FLOPs as ``log10`` min-max scaled: FLOPs span orders of magnitude).
   The two ends of a front get infinite distance, so the cheapest and the most accurate
   architectures of a front go first and the front's spread is kept when it is cut;
3. then the lower loss, then the earlier result (arrival order), so the order is total.

A point with a non-finite loss or FLOPs (a NaN or diverged run) is ranked after every finite
point and is never promoted. Syne Tune's ``MOASHA`` (0.16) reads an ordering as a priority and,
with its default priority, stops a result that dominates its whole rung; the test suite checks
that here such a result is promoted (``tests/studies/test_rungs.py``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlbtc_search.errors import SpecError

Point = tuple[float, float]
DEFAULT_ETA = 3
PROMOTE_KEYS = ("eta",)
MAX_RUNGS = 16


def _budget(value: Any, path: tuple) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < math.inf):
        raise SpecError(f"a budget must be a positive number of FLOPs (e.g. 1e11), "
                        f"got {value!r}", path)
    return float(value)


@dataclass(frozen=True)
class RungSchedule:
    """The budgets (training FLOPs per rung, strictly increasing) and the reduction factor."""

    budgets: tuple[float, ...]
    eta: int = DEFAULT_ETA

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, (tuple, list)) or not self.budgets:
            raise SpecError(f"budgets must be a non-empty list of FLOPs, got {self.budgets!r}",
                            ("budgets",))
        if len(self.budgets) > MAX_RUNGS:
            raise SpecError(f"budgets must have at most {MAX_RUNGS} rungs, got "
                            f"{len(self.budgets)}", ("budgets",))
        budgets = tuple(_budget(b, ("budgets", i)) for i, b in enumerate(self.budgets))
        for i in range(1, len(budgets)):
            if not budgets[i] > budgets[i - 1]:
                raise SpecError(f"budgets must increase strictly, got {budgets[i]:g} after "
                                f"{budgets[i - 1]:g}", ("budgets", i))
        object.__setattr__(self, "budgets", budgets)
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise SpecError(f"eta must be an integer >= 2, got {self.eta!r}", ("promote", "eta"))

    @classmethod
    def parse(cls, budgets: Any, promote: Any = None) -> RungSchedule:
        """From the YAML values of ``budgets`` and ``promote`` (``None``: ``{eta: 3}``)."""
        if not isinstance(budgets, list | tuple):
            raise SpecError(f"budgets must be a list of FLOPs like [1e11, 3e11, 1e12], got "
                            f"{budgets!r}", ("budgets",))
        promote = {} if promote is None else promote
        if not isinstance(promote, Mapping):
            raise SpecError(f"promote must be a mapping like {{eta: 3}}, got {promote!r}",
                            ("promote",))
        unknown = sorted(set(map(str, promote)) - set(PROMOTE_KEYS))
        if unknown:
            raise SpecError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(PROMOTE_KEYS)}",
                            ("promote", unknown[0]))
        return cls(tuple(budgets), promote.get("eta", DEFAULT_ETA))

    def to_dict(self) -> dict[str, Any]:
        return {"budgets": list(self.budgets), "promote": {"eta": self.eta}}

    @property
    def top(self) -> int:
        """Index of the highest rung."""
        return len(self.budgets) - 1

    def quota(self, recorded: int) -> int:
        """How many of ``recorded`` results at a rung are promoted: ``floor(recorded / eta)``."""
        return recorded // self.eta


# ---- the order inside a rung --------------------------------------------------------------
def _finite(p: Point) -> bool:
    return math.isfinite(p[0]) and math.isfinite(p[1]) and p[1] > 0


def normalise(points: Sequence[Point]) -> list[Point]:
    """``(loss, log10 FLOPs)`` min-max scaled to [0, 1] over the finite points (a coordinate
    that does not vary maps to 0); non-finite points map to ``(inf, inf)``."""
    finite = [(float(p[0]), math.log10(p[1])) for p in points if _finite(p)]
    if not finite:
        return [(math.inf, math.inf)] * len(points)
    lo = [min(q[j] for q in finite) for j in range(2)]
    span = [max(q[j] for q in finite) - lo[j] for j in range(2)]
    out = []
    for p in points:
        if not _finite(p):
            out.append((math.inf, math.inf))
            continue
        q = (float(p[0]), math.log10(p[1]))
        out.append(tuple((q[j] - lo[j]) / span[j] if span[j] > 0 else 0.0 for j in range(2)))
    return out


def nondominated_ranks(points: Sequence[Point]) -> list[int]:
    """Front index of every point (0 = non-dominated); non-finite points get one rank past the
    last front of the finite ones. Equal points do not dominate each other (same rank).

    O(n log n): in ``(loss, flops)`` order, a distinct point joins the first front whose least
    FLOPs so far exceeds its own (every earlier point has a loss no larger, so one with FLOPs no
    larger dominates it); those least FLOPs never decrease from one front to the next.
    """
    distinct = sorted({(float(p[0]), float(p[1])) for p in points if _finite(p)})
    least: list[float] = []  # least FLOPs of each front so far
    rank_of: dict[Point, int] = {}
    for p in distinct:
        f = bisect.bisect_right(least, p[1])
        if f == len(least):
            least.append(p[1])
        else:
            least[f] = p[1]
        rank_of[p] = f
    last = len(least)
    return [rank_of[(float(p[0]), float(p[1]))] if _finite(p) else last for p in points]


def crowding_distances(normalised: Sequence[Point], members: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each of ``members`` (one front) in ``normalised`` space:
    the sum over objectives of the gap between its two neighbours; the ends get ``inf``."""
    out = {i: 0.0 for i in members}
    if len(members) <= 2:
        return {i: math.inf for i in members}
    for j in range(2):
        order = sorted(members, key=lambda i: (normalised[i][j], normalised[i][1 - j], i))
        out[order[0]] = out[order[-1]] = math.inf
        for k in range(1, len(order) - 1):
            out[order[k]] += normalised[order[k + 1]][j] - normalised[order[k - 1]][j]
    return out


def promotion_order(points: Sequence[Point]) -> list[int]:
    """Indices of ``points`` best first: front, then crowding distance (larger first), then
    loss, then index (arrival order). Non-finite points come last."""
    ranks = nondominated_ranks(points)
    norm = normalise(points)
    crowd: dict[int, float] = {}
    for r in set(ranks):
        members = [i for i in range(len(points)) if ranks[i] == r and _finite(points[i])]
        crowd.update(crowding_distances(norm, members))
    return sorted(range(len(points)), key=lambda i: (
        ranks[i], -crowd.get(i, -math.inf), points[i][0] if _finite(points[i]) else math.inf, i))


# ---- the ledger ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RungResult:
    """One finished rung of one trial. ``spent_flops`` is the training compute this rung cost
    (less than the budget when it continued from the previous rung's weights)."""

    trial: Hashable
    rung: int
    loss: float
    flops: float
    spent_flops: float = 0.0

    @property
    def point(self) -> Point:
        return (self.loss, self.flops)


@dataclass
class Ladder:
    """The rungs of one study: what each trial reached, and who is promoted next.

    Pure bookkeeping (no Optuna, no Ray): the runner calls :meth:`record` when a rung finishes
    and :meth:`next_promotion` when a worker is free. After a restart, replaying the finished
    rungs with :meth:`record` (and the started ones with :meth:`mark_promoted`) rebuilds it.
    """

    schedule: RungSchedule
    _results: list[dict[Hashable, RungResult]] = field(default_factory=list, repr=False)
    _promoted: list[set[Hashable]] = field(default_factory=list, repr=False)
    _closed: set[Hashable] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        n = len(self.schedule.budgets)
        self._results = [{} for _ in range(n)]
        self._promoted = [set() for _ in range(n)]
        self._closed = set()

    def _check_rung(self, rung: int) -> None:
        if isinstance(rung, bool) or not isinstance(rung, int) or not (
                0 <= rung <= self.schedule.top):
            raise ValueError(f"rung must be an integer in [0, {self.schedule.top}], got {rung!r}")

    def record(self, trial: Hashable, rung: int, loss: float, flops: float,
               spent_flops: float = 0.0) -> RungResult:
        """Record that ``trial`` finished ``rung``; a NaN loss (failed run) is kept, ranked last.

        Rung ``k > 0`` needs the trial to have been promoted from ``k - 1``; recording the same
        rung twice is an error (a retried rung replaces nothing: the runner records it once).
        """
        self._check_rung(rung)
        if trial in self._results[rung]:
            raise ValueError(f"trial {trial!r} already has a result at rung {rung}")
        if rung > 0 and trial not in self._promoted[rung - 1]:
            raise ValueError(f"trial {trial!r} was not promoted to rung {rung}")
        loss = float(loss) if loss is not None else math.nan
        result = RungResult(trial, rung, loss, float(flops), float(spent_flops))
        self._results[rung][trial] = result
        return result

    def mark_promoted(self, trial: Hashable, rung: int) -> None:
        """Mark ``trial`` as promoted from ``rung`` (a resumed runner replays its promotions)."""
        self._check_rung(rung)
        if rung == self.schedule.top:
            raise ValueError(f"rung {rung} is the top rung; nothing is promoted from it")
        if trial not in self._results[rung]:
            raise ValueError(f"trial {trial!r} has no result at rung {rung}")
        self._promoted[rung].add(trial)

    def promotable(self, rung: int) -> list[Hashable]:
        """Trials at ``rung`` in the current top ``floor(n / eta)`` and not promoted yet, best
        first (empty at the top rung)."""
        self._check_rung(rung)
        if rung == self.schedule.top:
            return []
        results = list(self._results[rung].values())
        order = promotion_order([r.point for r in results])
        top = order[: self.schedule.quota(len(results))]
        return [results[i].trial for i in top if _finite(results[i].point)
                and results[i].trial not in self._promoted[rung]
                and results[i].trial not in self._closed]

    def next_promotion(self) -> tuple[Hashable, int] | None:
        """``(trial, rung)``: the trial to run at ``rung`` next (marked promoted), looking from
        the highest rung down; ``None`` when nothing qualifies (start a new trial at rung 0)."""
        for rung in range(self.schedule.top - 1, -1, -1):
            ready = self.promotable(rung)
            if ready:
                self._promoted[rung].add(ready[0])
                return ready[0], rung + 1
        return None

    def close(self, trial: Hashable) -> None:
        """Never promote ``trial`` again (its Optuna trial was told and cannot change); it still
        counts and ranks at the rungs it finished."""
        self._closed.add(trial)

    def max_results(self, future: int) -> list[int]:
        """An upper bound on the results each rung can still reach, when at most ``future``
        more results (new trials, and those training now) can arrive at rung 0."""
        out = [len(self._results[0]) + future]
        for k in range(1, len(self._results)):
            out.append(max(len(self._promoted[k - 1]), self.schedule.quota(out[-1])))
        return out

    def settled(self, trial: Hashable, future: int) -> bool:
        """Whether ``trial`` will certainly train no further rung: it reached the top rung, or
        its last rung failed, or more results dominate it there than that rung can ever
        promote (domination only grows, and a dominated point ranks behind its dominators);
        ``future`` as in :meth:`max_results`. False while it is promoted and training."""
        rung = self.highest_rung(trial)
        if rung is None or trial in self._promoted[rung]:
            return False
        mine = self._results[rung][trial]
        if rung == self.schedule.top or not _finite(mine.point):
            return True
        p = mine.point
        beaten = sum(1 for r in self._results[rung].values() if _finite(r.point) and (
            r.point[0] <= p[0] and r.point[1] <= p[1] and r.point != p))
        return beaten >= self.schedule.quota(self.max_results(future)[rung])

    # ---- reading ---------------------------------------------------------------------------
    def results(self, rung: int) -> list[RungResult]:
        """The results at ``rung`` in arrival order."""
        self._check_rung(rung)
        return list(self._results[rung].values())

    def trial_results(self, trial: Hashable) -> list[RungResult]:
        """The rungs ``trial`` finished, lowest first."""
        return [r[trial] for r in self._results if trial in r]

    def highest_rung(self, trial: Hashable) -> int | None:
        rungs = [r.rung for r in self.trial_results(trial)]
        return max(rungs) if rungs else None

    def is_promoted(self, trial: Hashable, rung: int) -> bool:
        self._check_rung(rung)
        return trial in self._promoted[rung]

    def in_flight(self) -> list[tuple[Hashable, int]]:
        """``(trial, rung)`` promoted to ``rung`` but without a result there yet."""
        return [(t, k + 1) for k in range(self.schedule.top) for t in sorted(
            self._promoted[k] - set(self._results[k + 1]), key=repr)]

    def spent_flops(self) -> float:
        """Training compute recorded over every rung."""
        return sum(r.spent_flops for rung in self._results for r in rung.values())

    def counts(self) -> list[int]:
        """Results per rung."""
        return [len(r) for r in self._results]




def fidelity_settings(budget: Any, budgets: Any, promote: Any, confirm: Any
                      ) -> tuple[float | None, RungSchedule | None, int]:
    """The search YAML's ``budget`` / ``budgets`` + ``promote`` / ``confirm`` keys ->
    ``(budget, schedule, confirm_seeds)``: exactly one of ``budget`` (one fidelity) and
    ``budgets`` (rungs) must be given; with rungs ``budget`` is the top rung's."""
    if budget is not None and budgets is not None and not (
            isinstance(budgets, list | tuple) and budgets and budget == budgets[-1]):
        raise SpecError("give either budget (one budget) or budgets (rungs of a multi-fidelity "
                        "search), not both", ("budgets",))
    if budgets is None:
        for key, value in (("promote", promote), ("confirm", confirm)):
            if value is not None:
                raise SpecError(f"{key} needs budgets: [...] (rungs of a multi-fidelity search)",
                                (key,))
        if budget is None:
            raise SpecError("missing required key 'budget' (training FLOPs per trial), or "
                            "'budgets' for a multi-fidelity search", ("budget",))
        return budget, None, 1
    schedule = RungSchedule.parse(budgets, promote)
    confirm = {} if confirm is None else confirm
    if not isinstance(confirm, Mapping) or set(map(str, confirm)) - {"seeds"}:
        raise SpecError(f"confirm must be a mapping like {{seeds: 3}}, got {confirm!r}",
                        ("confirm",))
    seeds = confirm.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise SpecError(f"seeds must be an integer in [1, 100], got {seeds!r}",
                        ("confirm", "seeds"))
    return schedule.budgets[-1], schedule, seeds


__all__ = [
    "DEFAULT_ETA", "Ladder", "RungResult", "RungSchedule", "crowding_distances",
    "fidelity_settings", "nondominated_ranks", "normalise", "promotion_order",
]
