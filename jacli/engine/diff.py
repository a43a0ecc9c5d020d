"""Derivative parity of two models (or a model and a baseline file), compared as they stream.

Model A's Jacobian is computed by ``jacobian.run`` block by block (whole sample blocks, or
row/column parts of one sample when a sample's Jacobian exceeds the budget); for every
block the sink asks a *source* for the matching block of B (the same samples, rows and
columns: B runs the same one-hot seeds through its own VJP/JVP, or a baseline file is
read at those offsets), compares the two and drops both. Neither Jacobian is ever held
whole: memory holds one block of each.

B is seen through A's names and layouts (:class:`Mapped`), so every block of B lines up
with A's: names are matched by ``--map``, by name, or by position; a layout (``nhwc`` /
``nchw``) transposes B's per-sample axes.

Tolerances follow Polygraphy: an entry differs when ``|a - b| > atol`` *and*
``|a - b| / |b| > rtol`` (B is the reference); the statistic compared is the elementwise
test (the default), or the max / mean / median of the absolute and relative errors, one
of which must be within its tolerance. Streaming statistics: exact max, mean and
mismatch counts; the median's verdict is exact (counting entries within tolerance), its
reported value is read from a log-scale histogram (within about 2.3%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from math import prod
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, UnsupportedError
from ..model import Model
from . import jacobian as jac
from . import strategies
from .mapping import Link, permute, to_a, unpermute_shape

STATS = ("elementwise", "max", "mean", "median")
WORST = 10  # entries kept per comparison
_CHUNK = 1 << 18  # entries compared at once (bounds the float64 temporaries)
_DECADES, _PER_DECADE = (-40, 40), 100  # the median's histogram: 0.01 decade bins


# --- tolerances -------------------------------------------------------------------------
def default_tolerances(dtype) -> tuple[float, float]:
    """(atol, rtol) by the coarser dtype of the two sides."""
    dtype = np.dtype(dtype)
    if dtype.itemsize <= 2:
        return 1e-3, 1e-2
    if dtype.itemsize >= 8:
        return 1e-9, 1e-7
    return 1e-5, 1e-4


@dataclass
class Tolerances:
    """Per-name settings (an output name, or a Jacobian key ``d{out}/d{in}``), with defaults."""

    atol: dict[str | None, float] = field(default_factory=dict)  # None: the default
    rtol: dict[str | None, float] = field(default_factory=dict)
    stat: dict[str | None, str] = field(default_factory=dict)

    def lookup(self, of: str, key: str, dtype) -> tuple[float, float, str]:
        datol, drtol = default_tolerances(dtype)

        def pick(table, default):
            for name in (key, of, None):
                if name in table:
                    return table[name]
            return default

        return pick(self.atol, datol), pick(self.rtol, drtol), pick(self.stat, "elementwise")


def parse_named(values: Sequence[str], flag: str, convert) -> dict[str | None, object]:
    """``[NAME:]VALUE`` settings (repeatable) into {NAME or None: value}."""
    out: dict[str | None, object] = {}
    for text in values:
        name, sep, value = text.rpartition(":")
        try:
            out[name if sep else None] = convert(value)
        except ValueError as e:
            raise InputError(f"{flag} {text!r}: {e}; use {flag} VALUE or {flag} NAME:VALUE") from None
    return out


def tolerance_value(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise ValueError("a tolerance is a number >= 0")
    return v


def stat_value(text: str) -> str:
    if text not in STATS:
        raise ValueError(f"the statistic is one of {', '.join(STATS)}")
    return text


# --- one streaming comparison -----------------------------------------------------------
class Comparison:
    """Error statistics of A against B (the reference) for one output or Jacobian pair,
    accumulated block by block. ``update(a, b, locate)``: flat blocks of equal length;
    ``locate(flat)`` turns positions in the block into where-dicts for the worst entries."""

    def __init__(self, name: str, atol: float, rtol: float, stat: str, **where):
        self.name, self.atol, self.rtol, self.stat, self.where = name, atol, rtol, stat, where
        self.count = self.mismatches = self.within_atol = self.within_rtol = self.zeros = self.infinite = 0
        self.max_abs = self.max_rel = self.sum_abs = self.sum_rel = 0.0
        bins = (_DECADES[1] - _DECADES[0]) * _PER_DECADE
        self.hist = {"abs": np.zeros(bins, np.int64), "rel": np.zeros(bins, np.int64)}
        self.low = {"abs": 0, "rel": 0}  # exact zeros
        self.high = {"abs": 0, "rel": 0}  # infinite
        self.worst: list[dict] = []

    def update(self, a: np.ndarray, b: np.ndarray, locate: Callable[[np.ndarray], list[dict]]) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        for c0 in range(0, a.size, _CHUNK):
            self._update(a[c0 : c0 + _CHUNK], b[c0 : c0 + _CHUNK], c0, locate)

    def _update(self, a, b, offset, locate) -> None:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
            d = np.abs(a64 - b64)
            d[same] = 0
            d[np.isnan(d)] = np.inf
            mag = np.abs(b64)
            rel = np.divide(d, mag, out=np.where(d > 0, np.inf, 0.0), where=mag > 0)
            allowed = np.fmax(self.atol, self.rtol * mag)
            excess = np.divide(d, allowed, out=np.where(d > 0, np.inf, 0.0), where=allowed > 0)
        self.count += d.size
        if not d.size:
            return
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        self.sum_abs += float(d.sum())
        self.sum_rel += float(rel.sum())
        self.within_atol += int(np.count_nonzero(d <= self.atol))
        self.within_rtol += int(np.count_nonzero(rel <= self.rtol))
        self.mismatches += int(np.count_nonzero(excess > 1))
        for kind, values in (("abs", d), ("rel", rel)):
            self._histogram(kind, values)
        keep = np.flatnonzero(d > 0)
        if keep.size > WORST:
            keep = keep[np.argpartition(-excess[keep], WORST - 1)[:WORST]]
        if keep.size:
            where = locate(keep + offset)
            for j, w in zip(keep, where):
                self.worst.append({**w, "a": float(a64[j]), "b": float(b64[j]), "abs_error": float(d[j]),
                                   "rel_error": float(rel[j]), "excess": float(excess[j])})
            self.worst.sort(key=lambda e: (-e["excess"], -e["abs_error"]))
            del self.worst[WORST:]

    def _histogram(self, kind: str, values: np.ndarray) -> None:
        zero, inf = values == 0, np.isinf(values)
        self.low[kind] += int(np.count_nonzero(zero))
        self.high[kind] += int(np.count_nonzero(inf))
        pos = values[~zero & ~inf]
        if pos.size:
            idx = np.floor((np.log10(pos) - _DECADES[0]) * _PER_DECADE).astype(np.int64)
            np.clip(idx, 0, len(self.hist[kind]) - 1, out=idx)
            self.hist[kind] += np.bincount(idx, minlength=len(self.hist[kind]))

    def median(self, kind: str) -> float:
        """The lower median, to within one histogram bin."""
        if not self.count:
            return 0.0
        rank = (self.count + 1) // 2  # the rank-th smallest
        if rank <= self.low[kind]:
            return 0.0
        cum = self.low[kind] + np.cumsum(self.hist[kind])
        i = int(np.searchsorted(cum, rank))
        if i >= len(cum):
            return math.inf
        return float(10 ** (_DECADES[0] + (i + 0.5) / _PER_DECADE))

    @property
    def passed(self) -> bool:
        if not self.count:
            return True
        if self.stat == "elementwise":
            return self.mismatches == 0
        if self.stat == "median":
            half = (self.count + 1) // 2
            return self.within_atol >= half or self.within_rtol >= half
        if self.stat == "mean":
            return self.sum_abs / self.count <= self.atol or self.sum_rel / self.count <= self.rtol
        return self.max_abs <= self.atol or self.max_rel <= self.rtol

    def to_json(self) -> dict:
        n = max(self.count, 1)
        return {"name": self.name, **self.where, "passed": self.passed, "entries": self.count,
                "check_stat": self.stat, "atol": self.atol, "rtol": self.rtol,
                "max_abs_error": self.max_abs, "max_rel_error": self.max_rel,
                "mean_abs_error": self.sum_abs / n, "mean_rel_error": self.sum_rel / n,
                "median_abs_error": self.median("abs"), "median_rel_error": self.median("rel"),
                "mismatches": self.mismatches, "worst": [{k: v for k, v in e.items() if k != "excess"}
                                                         for e in self.worst]}


# --- sources of B's blocks ----------------------------------------------------------------
class ModelSource:
    """B's blocks computed on demand: whole sample blocks by ``jacobian.run`` on the same
    samples (all pairs at once, kept until the next sample block), parts by one-hot seeds
    on the same rows (VJP) or columns (JVP)."""

    def __init__(self, model: Model, plan: jac.Plan, budget: int, chunk: int | None):
        self.model, self.plan, self.budget, self.chunk = model, plan, budget, chunk
        self.pairs = {p.key: p for p in plan.pairs}
        self._at, self._arrays = None, {}

    @property
    def ys(self) -> dict[str, np.ndarray]:
        return self.plan.ys

    def block(self, key: str, s0: int, s1: int) -> np.ndarray:
        if self._at != (s0, s1):
            self._arrays = {}  # the last block's arrays go before the next are made
            p = self.plan
            xs = {k: v[s0:s1] for k, v in p.xs.items()} if p.batch else p.xs
            sub = replace(p, xs=xs, samples=s1 - s0, pairs=[replace(q, samples=s1 - s0) if p.batch else q
                                                             for q in p.pairs])
            sink = jac.ArraySink(sub)
            jac.run(self.model, sub, sink, chunk=self.chunk, budget=self.budget)
            self._at, self._arrays = (s0, s1), sink.arrays
        return self._arrays[key]

    def part(self, key: str, s: int, rows: slice, cols: slice) -> np.ndarray:
        """Rows (VJPs, when the part spans every column) or columns (JVPs) of sample s, for
        every pair of that output (input) at once: the next pair asks for the same seeds."""
        q = self.pairs[key]
        if cols.start == 0 and cols.stop == q.n:
            return self._products("vjp", s, q.of, rows)[q.wrt][:, cols]
        return self._products("jvp", s, q.wrt, cols)[q.of][rows]

    def _products(self, kind: str, s: int, name: str, span: slice) -> dict[str, np.ndarray]:
        """{other side's name: (len(span), its elements)} (VJP) or transposed (JVP), for
        one-hot seeds on ``span`` of ``name``; the last one is kept."""
        at = (kind, s, name, span.start, span.stop)
        if self._at == at:
            return self._arrays
        self._at, self._arrays = None, {}
        p = self.plan
        xs = {k: v[s : s + 1] for k, v in p.xs.items()} if p.batch else p.xs
        lead = (1,) if p.batch else ()
        k = jac.seed_block(p, 1, self.budget, self.chunk)
        pieces: dict[str, list] = {}
        for c0 in range(span.start, span.stop, k):
            c1 = min(span.stop, c0 + k)
            if kind == "vjp":
                ct = _one_hot(c0, c1, lead, p.rows(name), p.dtype)
                got = strategies.vjp(self.model, xs, {name: ct}, p.wrt, per_sample=p.batch)
            else:
                t = _one_hot(c0, c1, lead, p.columns(name), p.xs[name].dtype)
                got = strategies.jvp(self.model, xs, {name: t}, p.of, per_sample=p.batch)
            for other, v in got.items():
                v = v.reshape(c1 - c0, -1)
                pieces.setdefault(other, []).append(v if kind == "vjp" else v.T)
        self._arrays = {o: np.concatenate(v, axis=0 if kind == "vjp" else 1) for o, v in pieces.items()}
        self._at = at
        return self._arrays


def _one_hot(start: int, stop: int, lead: tuple[int, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
    seeds = np.zeros((stop - start, prod(shape)), dtype)
    seeds[np.arange(stop - start), np.arange(start, stop)] = 1
    return seeds.reshape((stop - start,) + lead + tuple(shape))


class BaselineSource:
    """B's blocks read from a baseline file (``io.readers.Baseline``: ``read``,
    ``read_part``, ``shape``, ``ys``), renamed and transposed to A's layout."""

    def __init__(self, baseline, plan: jac.Plan, links: dict[str, list[Link]]):
        self.baseline, self.plan = baseline, plan
        ins, outs = {l.a: l for l in links["inputs"]}, {l.a: l for l in links["outputs"]}
        self.keys, self.perms = {}, {}
        for q in plan.pairs:
            key = f"d{outs[q.of].b}/d{ins[q.wrt].b}"
            if key not in baseline.jacobians:
                raise InputError(f"the baseline holds no Jacobian {key} (for A's {q.key}); it has: "
                                 f"{', '.join(baseline.jacobians)}")
            po = to_a(outs[q.of], len(q.out_shape) - (0 if plan.batch else 1))
            pi = to_a(ins[q.wrt], len(q.in_shape) - (0 if plan.batch else 1))
            self.keys[q.key], self.perms[q.key] = key, (po, pi)
            shape = baseline.shape(key)[1 if plan.batch else 0:]
            n_out = len(q.out_shape)
            mine = (unpermute_shape(q.out_shape, po), unpermute_shape(q.in_shape, pi))
            if (tuple(shape[:n_out]), tuple(shape[n_out:])) != mine:
                raise InputError(f"{q.key}: A's Jacobian is {q.out_shape}x{q.in_shape} per sample but the baseline's "
                                 f"{key} is {tuple(shape)}")
        self.ys = {l.a: permute(baseline.ys[l.b], to_a(l, baseline.ys[l.b].ndim - 1))
                   for l in links["outputs"] if l.b in baseline.ys}

    def block(self, key: str, s0: int, s1: int) -> np.ndarray:
        a = self.baseline.read(self.keys[key], s0, s1)
        po, pi = self.perms[key]
        if po is None and pi is None:
            return a
        q = next(q for q in self.plan.pairs if q.key == key)
        n_out = len(q.out_shape)
        po = po or tuple(range(n_out))
        pi = pi or tuple(range(len(q.in_shape)))
        lead = a.ndim - n_out - len(q.in_shape)
        full_o = tuple(range(n_out - len(po))) + tuple(n_out - len(po) + p for p in po)
        full_i = tuple(range(len(q.in_shape) - len(pi))) + tuple(len(q.in_shape) - len(pi) + p for p in pi)
        axes = tuple(range(lead)) + tuple(lead + p for p in full_o) + tuple(lead + n_out + p for p in full_i)
        return a.transpose(axes)

    def part(self, key: str, s: int, rows: slice, cols: slice) -> np.ndarray:
        if any(p is not None for p in self.perms[key]):
            raise UnsupportedError(f"{key}: a sample's Jacobian is larger than half the memory budget, and reading it "
                                   "from the baseline in another layout (--map ...:nhwc) is not supported in parts; "
                                   "raise --max-memory")
        q = next(q for q in self.plan.pairs if q.key == key)
        return self.baseline.read_part(self.keys[key], s, rows, cols, len(q.out_shape))


class DiffSink:
    """Receives A's blocks from ``jacobian.run``, fetches B's matching block from the
    source and folds both into the pair's :class:`Comparison`."""

    def __init__(self, plan: jac.Plan, source, comparisons: dict[str, Comparison]):
        self.plan, self.source, self.comparisons = plan, source, comparisons
        self.pairs = {p.key: p for p in plan.pairs}

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        q = self.pairs[key]
        b = self.source.block(key, s0, s1)
        batch = self.plan.batch

        def locate(flat):
            s, rest = np.divmod(flat, q.m * q.n)
            r, c = np.divmod(rest, q.n)
            return [_where(int(si) + s0 if batch else None, q, int(ri), int(ci)) for si, ri, ci in zip(s, r, c)]

        self.comparisons[key].update(block, b, locate)

    def write_part(self, key: str, s: int, rows: slice, cols: slice, block: np.ndarray, out_ndim: int) -> None:
        q = self.pairs[key]
        b = self.source.part(key, s, rows, cols)
        width = block.shape[1]
        sample = s if self.plan.batch else None

        def locate(flat):
            r, c = np.divmod(flat, width)
            return [_where(sample, q, rows.start + int(ri), cols.start + int(ci)) for ri, ci in zip(r, c)]

        self.comparisons[key].update(block, b, locate)


def _where(sample, q: jac.Pair, row: int, col: int) -> dict:
    return {"sample": sample, "output_index": [int(i) for i in np.unravel_index(row, q.out_shape)] if q.out_shape else [],
            "input_index": [int(i) for i in np.unravel_index(col, q.in_shape)] if q.in_shape else []}


# --- the comparisons ----------------------------------------------------------------------
@dataclass
class DiffResult:
    """``outputs``: one Comparison per output; ``jacobians``: one per (output, input) pair (or,
    with ``directions``, per J·v output and Jᵀc input); ``links``: the name matching."""

    outputs: list[Comparison]
    jacobians: list[Comparison]
    links: dict[str, list[Link]]
    kind: str  # "jacobian" | "directions"
    directions: int | None = None
    miss_probability: float | None = None
    locate: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs + self.jacobians)

    def to_json(self) -> dict:
        return {"passed": self.passed, "kind": self.kind, "directions": self.directions,
                "miss_probability": self.miss_probability,
                "links": {k: [l.to_json() for l in v] for k, v in self.links.items()},
                "outputs": [c.to_json() for c in self.outputs], "jacobians": [c.to_json() for c in self.jacobians],
                "locate": self.locate, "notes": self.notes}


def compare_outputs(plan_a: jac.Plan, ys_b: Mapping[str, np.ndarray], tol: Tolerances) -> list[Comparison]:
    out = []
    for o in plan_a.of:
        a, b = plan_a.ys[o], ys_b[o]
        if a.shape != b.shape:
            raise InputError(f"output {o!r} has shape {a.shape} in A but {b.shape} in B")
        atol, rtol, stat = tol.lookup(o, o, np.result_type(a.dtype, b.dtype))
        c = Comparison(o, atol, rtol, stat, of=o)
        shape = a.shape[1:] if plan_a.batch else a.shape
        m = prod(shape)

        def locate(flat, shape=shape, m=m):
            s, rest = np.divmod(flat, m)
            return [{"sample": int(si) if plan_a.batch else None,
                     "output_index": [int(i) for i in np.unravel_index(int(r), shape)] if shape else []}
                    for si, r in zip(s, rest)]

        c.update(a, b, locate)
        out.append(c)
    return out


def compare_jacobians(model_a: Model, plan_a: jac.Plan, source, tol: Tolerances, dtype_b, budget: int | None = None,
                      chunk: int | None = None, progress=None) -> list[Comparison]:
    """Stream A's Jacobian through a DiffSink against ``source`` (half the budget each)."""
    budget = budget or jac.DEFAULT_BUDGET
    comps = {}
    for p in plan_a.pairs:
        atol, rtol, stat = tol.lookup(p.of, p.key, np.result_type(plan_a.dtype, dtype_b))
        comps[p.key] = Comparison(p.key, atol, rtol, stat, of=p.of, wrt=p.wrt)
    jac.run(model_a, plan_a, DiffSink(plan_a, source, comps), chunk=chunk, budget=budget // 2, progress=progress)
    return list(comps.values())


def miss_probability(directions: int, ratio: float = 10.0) -> float:
    """Chance that all 2K random probes (K JVPs, K VJPs) miss a difference whose largest
    entry is ``ratio`` times the allowed error: each probe sees it scaled by a standard
    normal (at least), which falls within 1/ratio with probability erf(1/(ratio·√2))."""
    return math.erf(1 / (ratio * math.sqrt(2))) ** (2 * directions)


def compare_directions(model_a: Model, plan_a: jac.Plan, model_b: Model, tol: Tolerances, directions: int,
                       seed: int = 0, budget: int | None = None, progress=None) -> list[Comparison]:
    """J·v (per output) and Jᵀc (per input) of A and B for K random Gaussian probes per
    sample, in sample blocks within the budget."""
    budget = budget or jac.DEFAULT_BUDGET
    rng = np.random.default_rng(seed)
    p = plan_a
    outs, ins = p.elements
    per_sample = directions * (outs + ins) * 8 * 2 * jac._INTERMEDIATES
    step = max(1, min(p.samples, (budget // 2) // max(per_sample, 1))) if p.batch else 1
    lead = lambda n: (n,) if p.batch else ()  # noqa: E731
    comps = {}
    dtype = np.result_type(p.dtype, *(np.dtype(s.dtype) for s in model_b.outputs if s.dtype))
    for o in p.of:
        atol, rtol, stat = tol.lookup(o, f"d{o}·v", dtype)
        comps[("jvp", o)] = Comparison(f"d{o}·v", atol, rtol, stat, of=o, wrt=None, probe="jvp")
    for i in p.wrt:
        atol, rtol, stat = tol.lookup(i, f"cᵀ·d/d{i}", dtype)
        comps[("vjp", i)] = Comparison(f"cᵀ·d/d{i}", atol, rtol, stat, of=None, wrt=i, probe="vjp")
    for s0 in range(0, p.samples, step):
        s1 = min(p.samples, s0 + step)
        xs = {k: v[s0:s1] for k, v in p.xs.items()} if p.batch else p.xs
        ts = {i: rng.standard_normal((directions, *lead(s1 - s0), *p.columns(i))).astype(xs[i].dtype) for i in p.wrt}
        cs = {o: rng.standard_normal((directions, *lead(s1 - s0), *p.rows(o))).astype(p.dtype) for o in p.of}
        for kind, fa, fb, names, seeds in (("jvp", model_a.jvp, model_b.jvp, p.of, ts),
                                           ("vjp", model_a.vjp, model_b.vjp, p.wrt, cs)):
            ra = fa(xs, seeds, names, per_sample=p.batch)
            rb = fb(xs, seeds, names, per_sample=p.batch)
            for n in names:
                shape = p.rows(n) if kind == "jvp" else p.columns(n)
                a, b = ra[n], rb[n]
                if a.shape != b.shape:
                    raise InputError(f"{n!r}: A gives shape {a.shape[1:]} but B {b.shape[1:]}")
                comps[(kind, n)].update(a, b, _probe_locator(s0, s1 - s0, shape, p.batch))
        if progress:
            progress(s1 - s0)
    return list(comps.values())


def _probe_locator(s0: int, samples: int, shape: tuple[int, ...], batch: bool):
    size = prod(shape)

    def locate(flat):
        k, rest = np.divmod(flat, samples * size)
        s, r = np.divmod(rest, size)
        return [{"direction": int(ki), "sample": int(si) + s0 if batch else None,
                 "index": [int(i) for i in np.unravel_index(int(ri), shape)] if shape else []}
                for ki, si, ri in zip(k, s, r)]

    return locate


def first_difference(order: Sequence[dict], theirs: Mapping[str, dict], values_a, values_b, jvps_a, jvps_b,
                     atol: float | None, rtol: float | None, dtype) -> dict:
    """The first tensor (in A's topological ``order``) whose J·v differs between A and B,
    with its node and operator (and B's), and whether the values themselves agree there."""
    datol, drtol = default_tolerances(dtype)
    atol, rtol = datol if atol is None else atol, drtol if rtol is None else rtol
    checked = 0
    for t in order:
        name = t["tensor"]
        if jvps_a[name].shape != jvps_b[name].shape:
            continue  # the same name for a different tensor
        checked += 1
        deriv = Comparison(name, atol, rtol, "elementwise")
        deriv.update(jvps_a[name], jvps_b[name], lambda flat: [{}] * len(flat))
        if deriv.passed:
            continue
        value = Comparison(name, atol, rtol, "elementwise")
        value.update(values_a[name], values_b[name], lambda flat: [{}] * len(flat))
        return {"found": True, "tensor": name, "node": t["node"], "op_type": t["op_type"],
                "b_node": theirs[name]["node"], "b_op_type": theirs[name]["op_type"], "agreeing_before": checked - 1,
                "values_agree": value.passed, "max_abs_error": deriv.max_abs, "max_rel_error": deriv.max_rel,
                "atol": atol, "rtol": rtol}
    return {"found": False, "checked": checked, "atol": atol, "rtol": rtol}


def require_ad(model: Model, side: str) -> None:
    if not model.supports_ad:
        raise UnsupportedError(f"{side}: {model.ad_unavailable or 'this model cannot be differentiated'}")
