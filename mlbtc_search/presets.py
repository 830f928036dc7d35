"""Named structures, each written as a block tensor contraction (no special code paths in specs).

Every preset is a function ``(n_in, n_out, **params) -> BTC``; ``PRESETS`` maps YAML keys to them
with the parameters each one accepts. The exponent parameterization of the einsum-search paper
(``theta``) is one more way to *sample* BTCs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

from .btc import BTC, MAX_CORES
from .errors import SpecError


def prime_factors(n: int) -> dict[int, int]:
    """{prime: exponent} by trial division up to sqrt(n) (at most 4,096 steps for sizes up to
    MAX_SIZE = 2^24; the caller checks the size first)."""
    out: dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending, from its prime factorization (not by trying 1..n)."""
    divs = [1]
    for p, e in prime_factors(n).items():
        divs = [d * p**k for d in divs for k in range(e + 1)]
    return sorted(divs)


def balanced_factors(n: int, k: int = 2) -> list[int]:
    """Split n into k factors as equal as possible, smallest first (64 -> [8, 8], 32 -> [4, 8])."""
    if k == 1:
        return [n]
    target = n ** (1.0 / k)
    best = min(divisors(n), key=lambda d: (abs(d - target), -d if d <= target else d))
    # the first factor is the largest divisor not above the k-th root (ties go small)
    small = [d for d in divisors(n) if d <= target + 1e-9]
    first = max(small) if small else best
    return sorted([first] + balanced_factors(n // first, k - 1))


def _factors(n: int, factors: Sequence[int] | None, k: int, path: tuple, what: str) -> list[int]:
    if factors is None:
        return balanced_factors(n, k)
    if not isinstance(factors, list | tuple) or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors):
        raise SpecError(f"{what} must be a list of positive integers, got {factors!r}",
                        path + (what,))
    if len(factors) != k:
        raise SpecError(f"{what} must have {k} entries, got {len(factors)}", path + (what,))
    if prod(factors) != n:
        raise SpecError(f"the product of {what} must be {n}, got {list(factors)} "
                        f"(product {prod(factors)})", path + (what,))
    return list(factors)


def _rank(rank: object, path: tuple, name: str = "rank", upper: int | None = None) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise SpecError(f"{name} must be an integer >= 1, got {rank!r}", path + (name,))
    if rank < 1 or (upper is not None and rank > upper):
        bound = f" and <= {upper} (min(in, out))" if upper is not None else ""
        raise SpecError(f"{name} must be >= 1{bound}, got {name}={rank}", path + (name,))
    return rank


def dense(n: int, m: int, path: tuple = ()) -> BTC:
    """y = W x with W[o, i]."""
    return BTC((("i", n),), (("o", m),), (), (("o", "i"),))


def low_rank(n: int, m: int, rank: int, path: tuple = ()) -> BTC:
    """y = V (U x) with U[i, r], V[r, o]: rank r."""
    r = _rank(rank, path, upper=min(n, m))
    return BTC((("i", n),), (("o", m),), (("r", r),), (("i", "r"), ("r", "o")))


def kronecker(n: int, m: int, in_factors: Sequence[int] | None = None,
              out_factors: Sequence[int] | None = None, path: tuple = ()) -> BTC:
    """W = A (x) B with A[o1, i1], B[o2, i2] (equals torch.kron(A, B))."""
    n1, n2 = _factors(n, in_factors, 2, path, "in_factors")
    m1, m2 = _factors(m, out_factors, 2, path, "out_factors")
    return BTC((("i1", n1), ("i2", n2)), (("o1", m1), ("o2", m2)), (),
               (("o1", "i1"), ("o2", "i2")))


def btt(n: int, m: int, rank: int = 1, in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None, path: tuple = ()) -> BTC:
    """Two-core Block Tensor-Train of rank s.

    x over (i, j), y over (a, b): R[i, j, b, s] maps each input chunk i from j to (b, s);
    L[b, i, s, a] maps, for each output chunk b, (i, s) to a::

        M[(a, b), (i, j)] = sum_s L[b, i, s, a] * R[i, j, b, s]
    """
    s = _rank(rank, path)
    c, d = _factors(n, in_factors, 2, path, "in_factors")
    a, b = _factors(m, out_factors, 2, path, "out_factors")
    return BTC((("i", c), ("j", d)), (("a", a), ("b", b)), (("s", s),),
               (("i", "j", "b", "s"), ("b", "i", "s", "a")))


def monarch(n: int, m: int, path: tuple = ()) -> BTC:
    """Monarch: BTT of rank 1 with balanced factors."""
    return btt(n, m, 1, path=path)


def tensor_train(n: int, m: int, cores: int = 3, ranks: Sequence[int] | int = 1,
                 in_factors: Sequence[int] | None = None,
                 out_factors: Sequence[int] | None = None, path: tuple = ()) -> BTC:
    """Tensor-train (matrix product operator) with c >= 2 cores G_k[r_{k-1}, i_k, o_k, r_k]."""
    if isinstance(cores, bool) or not isinstance(cores, int) or not 2 <= cores <= MAX_CORES:
        raise SpecError(f"cores must be an integer between 2 and {MAX_CORES}, got {cores!r}",
                        path + ("cores",))
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [ranks] * (cores - 1)
    if not isinstance(ranks, list | tuple) or len(ranks) != cores - 1:
        raise SpecError(f"ranks must be an integer or a list of {cores - 1} integers "
                        f"(cores - 1), got {ranks!r}", path + ("ranks",))
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise SpecError(f"ranks[{k}] must be an integer >= 1, got {r!r}",
                            path + ("ranks", k))
    rs = list(ranks)
    ns = _factors(n, in_factors, cores, path, "in_factors")
    ms = _factors(m, out_factors, cores, path, "out_factors")
    core_axes = []
    for k in range(cores):
        axes = ([f"r{k - 1}"] if k > 0 else []) + [f"i{k}", f"o{k}"]
        axes += [f"r{k}"] if k < cores - 1 else []
        core_axes.append(tuple(axes))
    return BTC(tuple((f"i{k}", v) for k, v in enumerate(ns)),
               tuple((f"o{k}", v) for k, v in enumerate(ms)),
               tuple((f"r{k}", v) for k, v in enumerate(rs)), tuple(core_axes))


def _nearest_divisor(n: int, target: float) -> int:
    return min(divisors(n), key=lambda d: (abs(d - target), d))


def theta(n: int, m: int, exponents: Sequence[float] | str, path: tuple = ()) -> BTC:
    """The einsum-search exponent space: theta = (a|b|g|d|e|f|r) in [0, 1]^7.

    x is viewed over (g, b, a) and y over (f, e, d); two cores A[f, d, r, g, a] and
    B[f, e, r, g, b] (size-1 axes dropped). Input exponents a+b+g and output exponents d+e+f must
    each sum to 1 (within 0.01). Sizes are the divisors nearest to n^theta so that products are
    exact (the original rounds and pads; exact factors keep every matrix square and unpadded).
    """
    if isinstance(exponents, str):
        try:
            exponents = [float(t) for t in exponents.strip("() ").split("|")]
        except ValueError:
            raise SpecError(f"theta must look like '(a|b|g|d|e|f|r)', got {exponents!r}",
                            path + ("exponents",)) from None
    if not isinstance(exponents, list | tuple) or len(exponents) != 7 or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1
            for t in exponents):
        raise SpecError(f"theta needs 7 exponents in [0, 1] (alpha, beta, gamma, delta, "
                        f"epsilon, phi, rho), got {exponents!r}", path + ("exponents",))
    ta, tb, tg, td, te, tf, tr = (float(t) for t in exponents)
    if abs(ta + tb + tg - 1) > 0.01 or abs(td + te + tf - 1) > 0.01:
        raise SpecError("theta's input exponents (alpha+beta+gamma) and output exponents "
                        f"(delta+epsilon+phi) must each sum to 1, got {ta + tb + tg:.3f} and "
                        f"{td + te + tf:.3f}", path + ("exponents",))
    na = _nearest_divisor(n, n ** ta)
    nb = _nearest_divisor(n // na, n ** tb)
    ng = n // (na * nb)
    nd = _nearest_divisor(m, m ** td)
    ne = _nearest_divisor(m // nd, m ** te)
    nf = m // (nd * ne)
    nr = max(1, round(min(n, m) ** tr))
    sizes = {"a": na, "b": nb, "g": ng, "d": nd, "e": ne, "f": nf, "r": nr}

    def keep(axes: str) -> tuple[str, ...]:
        return tuple(x for x in axes if sizes[x] > 1)

    in_axes = tuple((x, sizes[x]) for x in "gba" if sizes[x] > 1) or (("a", na),)
    out_axes = tuple((x, sizes[x]) for x in "fed" if sizes[x] > 1) or (("d", nd),)
    core_a, core_b = keep("fdrga"), keep("ferg" + "b")
    bonds = (("r", nr),) if nr > 1 else ()
    if not core_a or not core_b:  # a corner such as (1|0|0|1|0|0|0): one dense core
        return BTC(in_axes, out_axes, (), (core_a or core_b,))
    if not set(core_a) & set(core_b):
        # the cores share no axis (e.g. a rank-1 outer product): join them by the rank axis,
        # kept even at size 1 so that the contraction graph stays connected
        core_a = core_a if "r" in core_a else core_a + ("r",)
        core_b = core_b if "r" in core_b else core_b + ("r",)
        bonds = (("r", nr),)
    return BTC(in_axes, out_axes, bonds, (core_a, core_b))


# YAML key -> (builder, accepted parameter names)
PRESETS: dict[str, tuple[Callable[..., BTC], tuple[str, ...]]] = {
    "dense": (dense, ()),
    "low_rank": (low_rank, ("rank",)),
    "kronecker": (kronecker, ("in_factors", "out_factors")),
    "monarch": (monarch, ()),
    "btt": (btt, ("rank", "in_factors", "out_factors")),
    "tensor_train": (tensor_train, ("cores", "ranks", "in_factors", "out_factors")),
    "theta": (theta, ("exponents",)),
}
REQUIRED = {"low_rank": ("rank",), "theta": ("exponents",)}


def build_preset(name: str, params: object, n: int, m: int, path: tuple) -> BTC:
    builder, accepted = PRESETS[name]
    if params is None:
        params = {}
    if name == "theta" and isinstance(params, str | list):
        params = {"exponents": params}
    if not isinstance(params, dict):
        raise SpecError(f"{name} takes a mapping of parameters {list(accepted) or '{}'}, got "
                        f"{params!r}", path)
    for key in params:
        if key not in accepted:
            valid = ", ".join(accepted) if accepted else "none"
            raise SpecError(f"unknown key {key!r} for {name}; valid keys: {valid}",
                            path + (key,))
    for key in REQUIRED.get(name, ()):
        if key not in params:
            raise SpecError(f"{name} needs {key!r}", path)
    try:
        return builder(n, m, **params, path=path)
    except SpecError as err:
        raise err if err.path[: len(path)] == path else err.prefixed(path) from None
