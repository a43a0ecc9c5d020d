"""Singular values, condition numbers and log-determinants of per-sample Jacobians.

The Jacobian of a sample is the matrix J (m x n) of all selected outputs, flattened and
concatenated, with respect to all selected inputs, flattened and concatenated (one pair:
the usual per-sample Jacobian, flattened).

Two solvers:

* **full** — J is materialised (by the block-wise engine in ``jacobian.py``) one block of
  samples at a time, and decomposed by LAPACK in float64: every singular value (``svd``),
  or an LU factorisation (``det``).
* **matrix-free** — J is never formed. Only the protocol's JVP (J V) and VJP (Jᵀ U) are
  used, on blocks of vectors for every sample at once (the block axis folds into the batch
  axis, so one backend call serves all samples). A block Krylov method with thick restarts
  (block Lanczos with full reorthogonalisation, Rayleigh–Ritz on the Gram operator of the
  smaller side) finds the top (and optionally bottom) k singular values. Every value comes
  with a certified error bound: for a Ritz pair of the Gram operator with residual e, some
  true singular value lies within min(‖e‖/σ, √‖e‖) of σ; for a final triplet with
  J v = σ u, within ‖Jᵀu - σ v‖. Iteration stops when the bounds meet ``tol``·σ (plus a
  floor set by the model's precision), or the residuals reach rounding level (the
  method itself, on plain matrices, in ``krylov.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable

import numpy as np

from ..errors import InputError
from ..model import Model
from . import jacobian as jac
from . import krylov, strategies

DEFAULT_K = 6  # singular values computed matrix-free when J is too large and no -k is given
FULL_MAX_DIM = 512  # with -k, the full SVD is used (exact, and cheaper) when min(m, n) is at most this
DEFAULT_TOL = 1e-6  # relative accuracy asked of matrix-free singular values
LOG_MAX = float(np.log(np.finfo(np.float64).max))
LOG_TINY = float(np.log(np.finfo(np.float64).smallest_subnormal))
RANK_ROUNDINGS = 4  # see rank_floor


@dataclass(frozen=True)
class Layout:
    """Where each selected input/output sits in the flat per-sample vectors of J."""

    ins: list[tuple[str, tuple[int, ...], int]]  # (name, per-sample shape, offset)
    outs: list[tuple[str, tuple[int, ...], int]]
    m: int
    n: int

    @classmethod
    def of(cls, plan: jac.Plan) -> "Layout":
        def place(shapes):
            out, off = [], 0
            for name, shape in shapes:
                out.append((name, tuple(shape), off))
                off += prod(shape)
            return out, off

        first = plan.pairs[0].of
        ins, n = place([(p.wrt, p.in_shape) for p in plan.pairs if p.of == first])
        outs, m = place([(o, next(p.out_shape for p in plan.pairs if p.of == o)) for o in plan.of])
        return cls(ins, outs, m, n)


def eps(plan: jac.Plan) -> float:
    """Unit roundoff of the precision the model computes in."""
    return float(np.finfo(plan.dtype).eps)


def singular_rule(plan: jac.Plan, tol: float | None) -> str:
    """When ``det`` calls J singular, in words (for metadata)."""
    if tol is not None:
        return f"sigma_min/sigma_max <= {tol:.6g}"
    return f"sigma_min <= {RANK_ROUNDINGS}*eps*||J||_F (eps = {eps(plan):.6g}, the rank criterion of svd)"


def rank_floor(sigma: np.ndarray, unit: float) -> np.ndarray:
    """Singular values (S, r) at most this (S, 1) cannot be told apart from 0 at the model's
    precision ``unit``: they are within what RANK_ROUNDINGS rounding errors in each entry of
    J move them (Weyl: |δσ| ≤ ‖δJ‖₂ ≤ ‖δJ‖_F = RANK_ROUNDINGS·unit·‖J‖_F). The rank criterion
    of ``svd`` and the singular verdict of ``det`` both."""
    return RANK_ROUNDINGS * unit * np.sqrt(np.sum(sigma**2, axis=1, keepdims=True))


# --- results --------------------------------------------------------------------------
@dataclass
class SvdResult:
    """Singular values per sample, largest first; ``smallest``: the bottom k, also largest
    first (the last is σ_min). ``condition_number``: σ_max/σ_min; inf where σ_min cannot be
    told apart from 0, NaN where σ_min is unknown (matrix-free without ``smallest``).
    ``rank`` (full solver): the number of σ above ``rank_floor``. Matrix-free:
    ``error_bound``/``smallest_error_bound`` hold a certified bound on each value's absolute
    error, ``converged`` whether a sample met the tolerance before the iteration limit."""

    solver: str
    m: int
    n: int
    k: int | None
    singular_values: np.ndarray  # (S, r)
    condition_number: np.ndarray  # (S,)
    smallest: np.ndarray | None = None  # (S, k)
    rank: np.ndarray | None = None  # (S,)
    converged: np.ndarray | None = None  # (S,) bool
    error_bound: np.ndarray | None = None  # (S, k), for singular_values
    smallest_error_bound: np.ndarray | None = None  # (S, k), for smallest
    iterations: int = 0
    products: int = 0  # J·V and Jᵀ·U vectors per sample (matrix-free)
    mode: str | None = None  # the mode that computed J (full solver)

    @property
    def sigma_max(self) -> np.ndarray:
        return self.singular_values[:, 0]

    def samples_json(self) -> list[dict]:
        out = []
        for i in range(len(self.singular_values)):
            d = {"index": i, "singular_values": _num(self.singular_values[i]),
                 "condition_number": _num(self.condition_number[i])}
            if self.smallest is not None:
                d["smallest_singular_values"] = _num(self.smallest[i])
            if self.rank is not None:
                d["rank"] = int(self.rank[i])
            if self.converged is not None:
                d["converged"] = bool(self.converged[i])
                d["error_bounds"] = _num(self.error_bound[i])
            if self.smallest_error_bound is not None:
                d["smallest_error_bounds"] = _num(self.smallest_error_bound[i])
            out.append(d)
        return out

    def summary(self) -> dict:
        return {"sigma_max": spread(self.sigma_max), "condition_number": spread(self.condition_number)}


@dataclass
class DetResult:
    """Per sample: ``sign`` (-1, 0, +1), ``logabsdet`` = log|det J|, ``det`` =
    sign·exp(logabsdet) (±inf only where |det J| exceeds float64's range, see
    ``overflow``; 0 where it underflows, see ``underflow``); ``condition_number`` κ₂ =
    σ_max/σ_min and ``rcond`` = 1/κ₂, from the singular values, as ``svd`` reports them.
    ``singular`` where J is rank deficient at the model's precision (σ_min at most
    ``rank_floor``, as ``svd`` finds it; or rcond ≤ ``tol`` when a tolerance is given): then
    sign = 0, det = 0, logabsdet = -inf. Elsewhere
    log|det J| is reported with ``logabsdet_error``, a first-order estimate of its error
    from the rounding of J at the model's precision ``unit`` (``error_estimate``), and
    ``ill_conditioned`` where κ₂ ≥ 1/√unit: more than half the model's digits are lost in
    J⁻¹ (the determinant itself may still be accurate: see its error estimate)."""

    n: int
    tol: float | None
    unit: float
    sign: np.ndarray
    logabsdet: np.ndarray
    det: np.ndarray
    rcond: np.ndarray
    condition_number: np.ndarray
    logabsdet_error: np.ndarray
    mode: str | None = None  # the mode that computed J
    singular: np.ndarray = field(init=False)
    ill_conditioned: np.ndarray = field(init=False)
    overflow: np.ndarray = field(init=False)
    underflow: np.ndarray = field(init=False)

    def __post_init__(self):
        finite = np.isfinite(self.logabsdet)
        self.singular = self.sign == 0
        self.ill_conditioned = finite & (self.condition_number * np.sqrt(self.unit) >= 1)
        self.overflow = finite & (self.logabsdet > LOG_MAX)
        self.underflow = finite & (self.logabsdet < LOG_TINY)

    def samples_json(self) -> list[dict]:
        return [{"index": i, "sign": int(self.sign[i]) if np.isfinite(self.sign[i]) else "NaN",
                 "logabsdet": _num(self.logabsdet[i]), "det": _num(self.det[i]),
                 "logabsdet_error": _num(self.logabsdet_error[i]), "singular": bool(self.singular[i]),
                 "ill_conditioned": bool(self.ill_conditioned[i]), "rcond": _num(self.rcond[i]),
                 "condition_number": _num(self.condition_number[i]),
                 "det_overflow": bool(self.overflow[i]), "det_underflow": bool(self.underflow[i])}
                for i in range(len(self.sign))]

    def summary(self) -> dict:
        return {"logabsdet": spread(self.logabsdet), "singular": int(self.singular.sum()),
                "ill_conditioned": int(self.ill_conditioned.sum())}


def spread(values: np.ndarray) -> dict:
    """max / median / min over samples, ignoring NaN (NaN if nothing is left)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return {"max": "NaN", "median": "NaN", "min": "NaN"}
    return {"max": _num(v.max()), "median": _num(np.median(v)), "min": _num(v.min())}


def _num(v):
    """JSON-ready numbers: non-finite floats become the strings "Infinity", "-Infinity", "NaN"."""
    if isinstance(v, np.ndarray):
        return [_num(x) for x in v.tolist()]
    v = float(v)
    return v if np.isfinite(v) else "NaN" if np.isnan(v) else "Infinity" if v > 0 else "-Infinity"


# --- choosing a solver and naming the output arrays -------------------------------------
def choose_solver(model: Model, plan: jac.Plan, k: int | None, solver: str, method: str, budget: int | None) -> str:
    """``full`` or ``matrix-free``, from what was asked and the size of J."""
    budget = budget or jac.DEFAULT_BUDGET
    lay = Layout.of(plan)
    d = min(lay.m, lay.n)
    if k is not None and not 1 <= k <= d:
        raise InputError(f"-k {k}: J has min(m, n) = {d} singular values per sample (J is {lay.m}x{lay.n})")
    fits = _dense_bytes(lay) <= budget
    if solver == "auto":
        small = k is None or d <= FULL_MAX_DIM
        solver = "full" if (fits and small) or method == "fd" else "matrix-free"
    if solver == "full" and not fits:
        raise InputError(
            f"J is {lay.m}x{lay.n} per sample ({_dense_bytes(lay) / 2**20:.0f} MiB to decompose), more than "
            "--max-memory allows; use -k K for the top K singular values matrix-free, or raise --max-memory"
        )
    if solver == "matrix-free" and method != "ad":
        raise InputError("the matrix-free solver needs automatic differentiation (JVP and VJP); drop --method fd, "
                         "or use --solver full")
    if solver == "matrix-free" and not model.supports_ad:
        raise model._no_ad()
    return solver


def svd_arrays(plan: jac.Plan, solver: str, k: int | None, smallest: bool, vectors: bool) -> dict[str, tuple]:
    """Names and shapes (with the sample axis when batched) of what ``svd`` writes."""
    lay = Layout.of(plan)
    r = k or (min(lay.m, lay.n) if solver == "full" else _default_k(lay))
    lead = (plan.samples,)  # with --no-batch: one "sample", the whole input
    arrays = {"singular_values": lead + (r,), "condition_number": lead}
    if smallest:
        arrays["smallest_singular_values"] = lead + (r,)
    if vectors:
        arrays.update({f"right_vectors/{name}": lead + (r,) + shape for name, shape, _ in lay.ins})
        arrays.update({f"left_vectors/{name}": lead + (r,) + shape for name, shape, _ in lay.outs})
    return arrays


def _default_k(lay: Layout) -> int:
    return min(DEFAULT_K, lay.m, lay.n)


def det_arrays(plan: jac.Plan) -> dict[str, tuple]:
    lead = (plan.samples,)  # with --no-batch: one "sample", the whole input
    return {name: lead for name in ("sign", "logabsdet", "det", "rcond", "condition_number", "logabsdet_error")}


def _dense_bytes(lay: Layout) -> int:
    """Memory to decompose one sample's J: the engine's buffer, a float64 copy, LAPACK's workspace."""
    return 3 * lay.m * lay.n * 8


# --- svd ------------------------------------------------------------------------------
def svd(
    model: Model,
    plan: jac.Plan,
    k: int | None = None,
    smallest: bool = False,
    vectors: bool = False,
    solver: str = "auto",
    method: str = "ad",
    tol: float = DEFAULT_TOL,
    budget: int | None = None,
    chunk: int | None = None,
    sink: jac.Sink | None = None,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> SvdResult:
    """Singular values of each sample's J (see the module docstring). ``sink`` receives
    the arrays named by ``svd_arrays`` sample block by sample block."""
    budget = budget or jac.DEFAULT_BUDGET
    solver = choose_solver(model, plan, k, solver, method, budget)
    if solver == "full":
        return _svd_full(model, plan, k, smallest, vectors, method, budget, chunk, sink, progress)
    k = k or _default_k(Layout.of(plan))
    return _svd_matrix_free(model, plan, k, smallest, vectors, tol, budget, sink, progress, seed)


def _svd_full(model, plan, k, smallest, vectors, method, budget, chunk, sink, progress) -> SvdResult:
    lay = Layout.of(plan)
    d = min(lay.m, lay.n)
    r = k or d
    parts: dict[str, list] = {"s": [], "cond": [], "rank": [], "low": []}

    def consume(s0: int, s1: int, J: np.ndarray) -> None:
        ok = np.isfinite(J).all(axis=(1, 2))
        s = np.full((len(J), d), np.nan)
        U = V = None
        if vectors:
            U = np.full((len(J), lay.m, d), np.nan)
            V = np.full((len(J), d, lay.n), np.nan)
            if ok.any():
                U[ok], s[ok], V[ok] = np.linalg.svd(J[ok], full_matrices=False)
        elif ok.any():
            s[ok] = np.linalg.svd(J[ok], compute_uv=False)
        floor = rank_floor(s, eps(plan))
        rank = (s > floor).sum(axis=1)
        cond = _condition(s[:, 0], s[:, -1], floor[:, 0])
        for key, v in (("s", s[:, :r]), ("cond", cond), ("rank", rank), ("low", s[:, -r:])):
            parts[key].append(v)
        if sink is not None:
            _emit(sink, s0, s1, lay, s[:, :r], cond, s[:, -r:] if smallest else None,
                  (V[:, :r, :], U[:, :, :r].transpose(0, 2, 1)) if vectors else None)
        if progress:
            progress(s1 - s0)

    ran = _dense(model, plan, lay, method, budget, chunk, consume)
    cat = {key: np.concatenate(v) for key, v in parts.items()}
    return SvdResult("full", lay.m, lay.n, k, cat["s"], cat["cond"], cat["low"] if smallest else None, cat["rank"],
                     mode=ran.mode)


def _condition(smax: np.ndarray, smin: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """σ_max/σ_min; inf where σ_min cannot be told apart from 0 (σ_min ≤ floor), NaN where unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(smin > floor, smax / smin, np.inf)
    return np.where(np.isnan(smax) | np.isnan(smin), np.nan, cond)


def _emit(sink, s0, s1, lay: Layout, top, cond, low, vecs) -> None:
    sink.write("singular_values", s0, s1, top)
    sink.write("condition_number", s0, s1, cond)
    if low is not None:
        sink.write("smallest_singular_values", s0, s1, low)
    if vecs is not None:
        for side, vs, places in (("right", vecs[0], lay.ins), ("left", vecs[1], lay.outs)):  # (S, r, n), (S, r, m)
            for name, shape, off in places:
                piece = vs[:, :, off:off + prod(shape)].reshape(vs.shape[:2] + shape)
                sink.write(f"{side}_vectors/{name}", s0, s1, piece)


def _dense(model, plan, lay: Layout, method, budget, chunk, consume) -> jac.Plan:
    """Materialise J sample block by sample block as (S, m, n) float64 and hand it to
    ``consume(s0, s1, J)``; returns the plan that ran (``jac.run``)."""
    pairs = {p.key: p for p in plan.pairs}
    ins = {name: (off, prod(shape)) for name, shape, off in lay.ins}
    outs = {name: (off, prod(shape)) for name, shape, off in lay.outs}

    class Assemble:
        def __init__(self):
            self.held: dict[str, np.ndarray] = {}

        def write(self, key, s0, s1, block):
            self.held[key] = block.reshape(s1 - s0, pairs[key].m, pairs[key].n)
            if len(self.held) < len(pairs):
                return
            J = np.empty((s1 - s0, lay.m, lay.n))
            for key, b in self.held.items():
                (r0, m), (c0, n) = outs[pairs[key].of], ins[pairs[key].wrt]
                J[:, r0:r0 + m, c0:c0 + n] = b
            self.held = {}
            consume(s0, s1, J)

    return jac.run(model, plan, Assemble(), method=method, chunk=chunk, budget=budget // 3)


# --- matrix-free ------------------------------------------------------------------------
class LinearMap:
    """J of a group of samples as a batched map on flat vectors, built on the protocol:
    ``jvp``: (S, n, b) -> (S, m, b); ``vjp``: (S, m, b) -> (S, n, b). One backend call per
    product serves all b vectors of all S samples, by the engine's fastest strategy."""

    def __init__(self, model: Model, plan: jac.Plan, xs: dict[str, np.ndarray], lay: Layout):
        self.model, self.plan, self.xs, self.lay = model, plan, xs, lay
        self.lead = (next(iter(xs.values())).shape[0],) if plan.batch else ()
        self.products = 0

    def jvp(self, V: np.ndarray) -> np.ndarray:
        tangents = self._split(V, self.lay.ins, {n: self.xs[n].dtype for n in self.plan.wrt})
        outs = strategies.jvp(self.model, self.xs, tangents, self.plan.of, per_sample=self.plan.batch)
        return self._join(outs, self.lay.outs)

    def vjp(self, U: np.ndarray) -> np.ndarray:
        cotangents = self._split(U, self.lay.outs, {n: self.plan.ys[n].dtype for n in self.plan.of})
        grads = strategies.vjp(self.model, self.xs, cotangents, self.plan.wrt, per_sample=self.plan.batch)
        return self._join(grads, self.lay.ins)

    def _split(self, V, places, dtypes) -> dict[str, np.ndarray]:
        b = V.shape[2]
        self.products += b
        T = V.transpose(2, 0, 1)  # (b, S, size)
        return {name: np.ascontiguousarray(T[:, :, off:off + prod(shape)]).astype(dtypes[name])
                .reshape((b,) + self.lead + shape) for name, shape, off in places}

    def _join(self, arrays, places) -> np.ndarray:
        S = self.lead[0] if self.lead else 1
        parts = [arrays[name].reshape(arrays[name].shape[0], S, -1) for name, _, _ in places]
        return np.concatenate(parts, axis=2).transpose(1, 2, 0).astype(np.float64)


def _svd_matrix_free(model, plan, k, smallest, vectors, tol, budget, sink, progress, seed) -> SvdResult:
    lay = Layout.of(plan)
    d, other = min(lay.m, lay.n), max(lay.m, lay.n)
    rng = np.random.default_rng(seed)
    block = krylov.block(k) * (2 if smallest else 1)
    cols = krylov.max_cols(d, block, budget)
    group = plan.samples if not plan.batch else max(1, min(plan.samples, budget // (cols * (2 * d + other) * 8 * 4)))
    pieces: dict[str, list] = {key: [] for key in ("top", "cond", "conv", "err", "low", "low_err")}
    iterations = products = 0
    for s0 in range(0, plan.samples, group):
        s1 = min(plan.samples, s0 + group)
        xs = {name: v[s0:s1] for name, v in plan.xs.items()} if plan.batch else plan.xs
        op = LinearMap(model, plan, xs, lay)
        # Work in the smaller space: A maps it to the larger one.
        A, At = (op.jvp, op.vjp) if lay.n <= lay.m else (op.vjp, op.jvp)
        r = krylov.singular_values(A, At, s1 - s0, d, k, smallest, tol, eps(plan), cols, rng, progress)
        iterations, products = max(iterations, r["iterations"]), max(products, op.products)
        low = r["low"] if smallest else None
        cond = _condition(r["top"][:, 0], low[:, -1], r["low_bound"][:, -1]) if smallest else np.full(s1 - s0, np.nan)
        for key, v in (("top", r["top"]), ("cond", cond), ("conv", r["converged"]), ("err", r["top_bound"]),
                       ("low", low), ("low_err", r["low_bound"] if smallest else None)):
            if v is not None:
                pieces[key].append(v)
        if sink is not None:
            vecs = None
            if vectors:  # right: (S, k, d) in the basis space, left: (S, k, other)
                vecs = (r["right"], r["left"]) if lay.n <= lay.m else (r["left"], r["right"])
            _emit(sink, s0, s1, lay, r["top"], cond, low, vecs)
    cat = {key: np.concatenate(v) for key, v in pieces.items() if v}
    return SvdResult("matrix-free", lay.m, lay.n, k, cat["top"], cat["cond"], cat.get("low"),
                     converged=cat["conv"], error_bound=cat["err"], smallest_error_bound=cat.get("low_err"),
                     iterations=iterations, products=products)


# --- det --------------------------------------------------------------------------------
def det(
    model: Model,
    plan: jac.Plan,
    method: str = "ad",
    singular_tol: float | None = None,
    budget: int | None = None,
    chunk: int | None = None,
    sink: jac.Sink | None = None,
    progress: Callable[[int], None] | None = None,
) -> DetResult:
    """sign, log|det J| and det J of each sample's square J in float64: the sign from an LU
    factorisation, log|det J| = Σ log σᵢ from the singular values, which also give the
    condition number, the ``singular`` verdict and the error estimate (see ``DetResult``).

    J counts as singular where ``svd`` finds it rank deficient (σ_min ≤ ``rank_floor``), or,
    when ``singular_tol`` is given, where σ_min/σ_max ≤ ``singular_tol``: at that precision
    J cannot be told apart from a singular matrix, and its determinant would be rounding
    noise. Anywhere else log|det J| is meaningful, to within ``logabsdet_error``."""
    from scipy.linalg import lapack

    budget = budget or jac.DEFAULT_BUDGET
    lay = Layout.of(plan)
    if lay.m != lay.n:
        pairs = ", ".join(f"{p.key} is {p.m}x{p.n}" for p in plan.pairs)
        raise InputError(f"det needs a square Jacobian, but J is {lay.m}x{lay.n} per sample ({pairs}); "
                         "use 'jacli svd' for singular values and the condition number")
    if _dense_bytes(lay) > budget:
        raise InputError(f"J is {lay.n}x{lay.n} per sample ({_dense_bytes(lay) / 2**20:.0f} MiB to factorise), "
                         "more than --max-memory allows; raise --max-memory")
    keys = ("sign", "logabsdet", "det", "rcond", "condition_number", "logabsdet_error")
    parts: dict[str, list] = {key: [] for key in keys}

    def consume(s0: int, s1: int, J: np.ndarray) -> None:
        out = {key: np.full(s1 - s0, np.nan) for key in keys}
        for j, a in enumerate(J):
            if not np.isfinite(a).all():
                continue
            sigma = np.linalg.svd(a, compute_uv=False)
            rcond = sigma[-1] / sigma[0] if sigma[0] > 0 else 0.0
            floor = rank_floor(sigma[None], eps(plan))[0, 0]
            singular = rcond <= singular_tol if singular_tol is not None else sigma[-1] <= floor
            out["rcond"][j], out["condition_number"][j] = rcond, np.inf if singular else 1 / rcond
            if singular:
                out["sign"][j], out["logabsdet"][j], out["logabsdet_error"][j] = 0.0, -np.inf, np.inf
                continue
            lu, piv, _ = lapack.dgetrf(a)  # P J = L U, piv 0-based: the sign
            swaps = np.count_nonzero(piv != np.arange(len(piv)))
            out["sign"][j] = (-1.0) ** swaps * np.prod(np.sign(np.diagonal(lu)))
            out["logabsdet"][j] = np.log(sigma).sum()
            out["logabsdet_error"][j] = error_estimate(sigma, eps(plan))
        with np.errstate(over="ignore"):
            out["det"] = np.where(out["sign"] == 0, 0.0, out["sign"] * np.exp(out["logabsdet"]))
        for key, v in out.items():
            parts[key].append(v)
            if sink is not None:
                sink.write(key, s0, s1, v)
        if progress:
            progress(s1 - s0)

    ran = _dense(model, plan, lay, method, budget, chunk, consume)
    cat = {key: np.concatenate(v) for key, v in parts.items()}
    return DetResult(lay.n, singular_tol, eps(plan), *(cat[key] for key in keys), mode=ran.mode)


def error_estimate(sigma: np.ndarray, unit: float) -> float:
    """First-order estimate of the error in log|det J| when each entry of J carries an
    independent rounding error of about ``unit``·‖J‖_F/n (a Jacobian computed at that
    precision): δ log|det J| = tr(J⁻¹ δJ), whose spread is unit·‖J‖_F·‖J⁻¹‖_F/n; at least
    the rounding of the n logarithms summed."""
    with np.errstate(over="ignore"):
        spread = unit * np.sqrt(np.sum(sigma**2)) * np.sqrt(np.sum(sigma**-2.0)) / len(sigma)
    return float(max(spread, unit * np.sqrt(len(sigma))))
