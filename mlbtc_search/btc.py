"""Block tensor contractions (BTCs): the building block of every structured matrix.

A BTC maps R^n -> R^m. The input index is reshaped into named input axes (product n, first axis
slowest), the output index into named output axes (product m); named bond axes carry ranks; each
core is a tensor over a subset of those axes. The value is::

    y[out] = sum over input and bond axes of prod(cores) * x[in]

An axis that a core shares with x (or y) *and* with another core acts as a block index: that is how
BTT and Monarch get their block structure. Cores are listed in *flow order* (the input side
first); the order fixes each core's fan-in/fan-out for µP, not the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from .errors import SpecError

Axis = tuple[str, int]


MAX_SIZE = 1 << 24  # largest matrix dimension or axis size (a dense 2^24 x 2^24 has 2^48 weights)
MAX_CORES = 12  # bilinear cuts and contraction orders search over core subsets


def _check_size(value: object, path: tuple, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be an integer >= 1, got {value!r}", path)
    if not 1 <= value <= MAX_SIZE:
        raise SpecError(f"{what} must be between 1 and {MAX_SIZE:,} (2^24), got {value}", path)
    return value


def reachable(nodes: list[set[str]]) -> set[int]:
    """Indices of the nodes joined to node 0 through shared axes (the contraction graph's
    connected component of x's leg, when ``nodes`` are the x and y legs and then the cores)."""
    seen, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for j, axes in enumerate(nodes):
            if j not in seen and nodes[i] & axes:
                seen.add(j)
                frontier.append(j)
    return seen


@dataclass(frozen=True)
class BTC:
    """One block tensor contraction R^n -> R^m (validated at construction)."""

    in_axes: tuple[Axis, ...]
    out_axes: tuple[Axis, ...]
    bonds: tuple[Axis, ...]
    cores: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        sizes: dict[str, int] = {}
        kinds: dict[str, str] = {}
        for group, axes in (("in_axes", self.in_axes), ("out_axes", self.out_axes),
                            ("bonds", self.bonds)):
            for name, size in axes:
                if not isinstance(name, str) or not name.isidentifier():
                    raise SpecError(f"axis names must be identifiers, got {name!r}", (group,))
                _check_size(size, (group, name), "axis size")
                if name in kinds:
                    raise SpecError(
                        f"axis {name!r} is declared twice (in {kinds[name]} and {group}); "
                        "every axis needs one unique name", (group, name))
                sizes[name] = size
                kinds[name] = group
        if not self.in_axes or not self.out_axes:
            raise SpecError("a contraction needs at least one input and one output axis")
        if not self.cores:
            raise SpecError("a contraction needs at least one core", ("cores",))
        if len(self.cores) > MAX_CORES:
            raise SpecError(f"a contraction may have at most {MAX_CORES} cores, got "
                            f"{len(self.cores)}", ("cores",))
        uses: dict[str, int] = {name: 0 for name in sizes}
        for c, axes in enumerate(self.cores):
            if not axes:
                raise SpecError("a core needs at least one axis", ("cores", c))
            if len(set(axes)) != len(axes):
                raise SpecError(f"a core lists an axis twice: {list(axes)}", ("cores", c))
            for a in axes:
                if a not in sizes:
                    raise SpecError(
                        f"unknown axis {a!r}; declared axes are {sorted(sizes)}", ("cores", c))
                uses[a] += 1
        for name, n in uses.items():
            if n == 0:
                raise SpecError(f"axis {name!r} is used by no core; every axis must appear in "
                                "at least one core", (kinds[name], name))
            if kinds[name] == "bonds" and n < 2:
                raise SpecError(f"bond {name!r} is used by only one core; a bond must join "
                                "two or more cores", ("bonds", name))
        self._check_connected()

    def _check_connected(self) -> None:
        # cores plus the x and y legs; joined when they share an axis
        nodes = [set(a for a, _ in self.in_axes), set(a for a, _ in self.out_axes)]
        nodes += [set(c) for c in self.cores]
        seen = reachable(nodes)
        if len(seen) != len(nodes):
            lonely = [j - 2 for j in range(2, len(nodes)) if j not in seen]
            raise SpecError(
                f"the contraction graph is disconnected: cores {lonely} share no axis with the "
                "input or output (every core must be reachable from x and y)", ("cores",))

    # ---- sizes -------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.in_axes + self.out_axes + self.bonds)

    @property
    def n_in(self) -> int:
        return prod(s for _, s in self.in_axes)

    @property
    def n_out(self) -> int:
        return prod(s for _, s in self.out_axes)

    def core_shape(self, c: int) -> tuple[int, ...]:
        sizes = self.sizes
        return tuple(sizes[a] for a in self.cores[c])

    @property
    def params(self) -> int:
        return sum(prod(self.core_shape(c)) for c in range(len(self.cores)))

    def fans(self, c: int) -> tuple[int, int]:
        """(fan_in, fan_out) of core ``c``: the sizes it contracts and produces in flow order.

        Upstream = axes of x and of earlier cores; downstream = axes of y and of later cores. A
        core axis that is upstream and downstream is a batch (block) index; upstream only is
        contracted (fan-in); not upstream is produced (fan-out).
        """
        sizes = self.sizes
        up = {a for a, _ in self.in_axes}
        for k in range(c):
            up |= set(self.cores[k])
        down = {a for a, _ in self.out_axes}
        for k in range(c + 1, len(self.cores)):
            down |= set(self.cores[k])
        fan_in = prod(sizes[a] for a in self.cores[c] if a in up and a not in down)
        fan_out = prod(sizes[a] for a in self.cores[c] if a not in up)
        return fan_in, fan_out

    # ---- canonical form ----------------------------------------------------------------
    def canonical(self) -> dict:
        """Axis names replaced by position, size-1 axes dropped, core axes sorted.

        Two spellings of the same contraction give the same canonical dict.
        """
        sizes = self.sizes
        rename: dict[str, str] = {}
        for i, (a, _) in enumerate((a, s) for a, s in self.in_axes if s > 1):
            rename[a] = f"i{i}"
        for i, (a, _) in enumerate((a, s) for a, s in self.out_axes if s > 1):
            rename[a] = f"o{i}"
        # bonds numbered by (first core, size, cores holding it): not by their order inside a
        # core, so [i, s, t] and [i, t, s] name s and t alike (bonds equal on all three are
        # interchangeable, so either naming gives the same form)
        holders = {a: tuple(c for c, axes in enumerate(self.cores) if a in axes)
                   for a in sizes if a not in rename and sizes[a] > 1}
        for n_bond, a in enumerate(sorted(holders, key=lambda a: (holders[a][0], sizes[a],
                                                                   holders[a]))):
            rename[a] = f"b{n_bond}"

        def keep(a: str) -> bool:
            return sizes[a] > 1

        return {
            "in": [[rename[a], s] for a, s in self.in_axes if s > 1],
            "out": [[rename[a], s] for a, s in self.out_axes if s > 1],
            "bonds": sorted([rename[a], s] for a, s in self.bonds if s > 1),
            "cores": [sorted(rename[a] for a in axes if keep(a)) for axes in self.cores],
        }

    def to_dict(self) -> dict:
        """Axes as lists of [name, size] pairs: their order is the reshape order, and a
        mapping's order would not survive serializers that sort keys (yaml.safe_dump, json)."""
        return {
            "in_axes": [[a, s] for a, s in self.in_axes],
            "out_axes": [[a, s] for a, s in self.out_axes],
            "bonds": [[a, s] for a, s in self.bonds],
            "cores": [list(c) for c in self.cores],
        }

    @classmethod
    def from_dict(cls, d: object, path: tuple = ()) -> BTC:
        if not isinstance(d, dict):
            raise SpecError(f"btc must be a mapping with in_axes, out_axes, bonds, cores, got "
                            f"{type(d).__name__}", path)
        allowed = {"in_axes", "out_axes", "bonds", "cores"}
        for key in d:
            if key not in allowed:
                raise SpecError(f"unknown key {key!r}; valid keys are {sorted(allowed)}",
                                path + (key,))
        for key in ("in_axes", "out_axes", "cores"):
            if key not in d:
                raise SpecError(f"missing key {key!r} (btc needs in_axes, out_axes, cores; "
                                "bonds is optional)", path)

        def axes(key: str) -> tuple[Axis, ...]:
            # a mapping (YAML order) or a list of [name, size] pairs (what to_dict writes)
            val = d.get(key) or {}
            if isinstance(val, dict):
                items = list(val.items())
            elif isinstance(val, list) and all(isinstance(p, list) and len(p) == 2
                                               for p in val):
                items = [(a, s) for a, s in val]
            else:
                raise SpecError(f"{key} must be a mapping of axis name to size, e.g. "
                                "{i: 4, j: 16}, or a list of [name, size] pairs", path + (key,))
            return tuple((str(a), _check_size(s, path + (key, a), "axis size"))
                         for a, s in items)

        cores = d["cores"]
        if not isinstance(cores, list) or not all(isinstance(c, list) for c in cores):
            raise SpecError("cores must be a list of lists of axis names, e.g. "
                            "[[i, j, b], [b, a]]", path + ("cores",))
        in_axes, out_axes, bonds = axes("in_axes"), axes("out_axes"), axes("bonds")
        try:
            return cls(in_axes, out_axes, bonds, tuple(tuple(str(a) for a in c) for c in cores))
        except SpecError as err:
            raise err.prefixed(path) from None
