"""``check(directions=K)``: K random directional derivatives per sample.

Directions are drawn per sample, scaled by max(|x|, 1) and of unit norm in that scale, and
processed in groups whose FD points (four per direction) and JVP/VJP seeds fit in the
budget. Forward mode compares J·v from the JVP with FD entry by entry and tests
<J v, c> = <v, Jᵀc> against the VJP; reverse mode compares <Jᵀc, v> from the VJP with the
FD of <c, f(x + hv)>. A direction that fails is judged again, whole, at nearby points
(``rejudge.again``): where its mismatch vanishes or jumps, it was a switch point (a kink),
not a wrong gradient.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from . import jacobian as jac
from . import rejudge, strategies
from .check import Tolerance, _resolution, _Tally, _width
from .fd import Estimate, estimate_directions, in_pieces, rounding_noise


def run(model, plan: jac.Plan, fwd, tol: Tolerance, k: int, seed: int, tally: _Tally, room, progress,
        mode: str, per_sample: int) -> None:
    """Judge ``k`` directions per sample into ``tally``; ``mode``: "forward" or "reverse";
    ``per_sample``: the measured bytes of one sample's forward pass; ``room()``: the bytes of
    working memory left now, asked again for every group (the graphs a framework traces for
    the first group's JVP and VJP come off the FD pieces of the next)."""
    rng = np.random.default_rng([seed, 2])
    width = _width(plan)
    budget = room()
    fit = max(1, (budget // 2) // (4 * width * 8 * 8))  # (direction, sample) pairs whose FD points fit
    fit = max(1, min(fit, (budget // 2) // (3 * per_sample)))  # ... and whose JVP/VJP seeds do
    step = int(max(1, min(plan.samples, fit)))
    group = int(max(1, min(k, fit // step)))
    for s0 in range(0, plan.samples, step):
        s1 = min(plan.samples, s0 + step)
        xs = {n: v[s0:s1] for n, v in plan.xs.items()}
        for k0 in range(0, k, group):
            kg = min(group, k - k0)
            pieces = in_pieces(fwd, max(1, ((budget if k0 == s0 == 0 else room()) // 2) // per_sample))
            z = {i: rng.standard_normal((kg,) + xs[i].shape) for i in plan.wrt}
            norm = np.sqrt(sum(np.square(v).reshape(kg, s1 - s0, -1).sum(axis=2) for v in z.values()))  # (k, S)
            tangents = {i: v / norm.reshape(norm.shape + (1,) * (v.ndim - 2)) * np.maximum(np.abs(xs[i].astype(
                np.float64)), 1) for i, v in z.items()}
            cts = {o: rng.standard_normal((kg, *plan.ys[o][s0:s1].shape)).astype(plan.ys[o].dtype) for o in plan.of}
            entries, adjoint = _group(model, plan, pieces, xs, tol, tangents, cts, mode, s0)
            at = partial(_judged_at, model, plan, pieces, tol, tangents, cts, mode, s0)  # a switch point nearby?
            switched = rejudge.again(tally, [e[1:4] for e in entries], at, xs, plan.wrt, rng, unit=_per_direction)
            switched = switched[:, None, :]
            for of, a, est, tol_abs, shape in entries:
                tally.add(s0, of, None, a, est, tol_abs, shape, None, k0, switched)
            if adjoint is not None:
                tally.add_adjoint(s0, *adjoint, k0)
        if progress:
            progress(s1 - s0)


def _judged_at(model, plan, fwd, tol, tangents, cts, mode, s0, xs, failing):
    """The group's compared arrays at ``xs`` (every direction's: ``failing`` is not used)."""
    return [e[1:4] for e in _group(model, plan, fwd, xs, tol, tangents, cts, mode, s0)[0]]


def _per_direction(masks):
    """Per-entry masks (S, m, k), one per output -> per (sample, direction): any entry."""
    return np.any([m.any(axis=1) for m in masks], axis=0)


def _group(model, plan, fwd, xs, tol, tangents, cts, mode, s0):
    """One group of directions at ``xs``: the entries to judge, [(output, AD, FD estimate,
    absolute tolerance, output shape)], and (forward mode) the dot-product test's terms."""
    samples = next(iter(xs.values())).shape[0]
    fd_dtype = np.dtype(tol.fd_dtype)
    f0 = {o: y.reshape(samples, -1).astype(np.float64) for o, y in fwd(xs).items() if o in plan.of}
    noise = rounding_noise(fwd, xs, fd_dtype, plan.of, f0, s0)
    est, realized = estimate_directions(fwd, xs, tangents, plan.of, fd_dtype, tol.eps, f0, noise)
    t = {i: realized[i].astype(xs[i].dtype) for i in plan.wrt}
    kg = next(iter(t.values())).shape[0]
    largest = np.max([np.abs(e.value).max(axis=(1, 2), initial=0.0) for e in est.values()], axis=0)  # (S,)
    norm1 = sum(np.abs(v.astype(np.float64)).reshape(kg, samples, -1).sum(axis=2) for v in t.values()).T  # (S, k)
    res = {}
    for o in plan.of:
        floor, out_res = _resolution(tol, f0[o], largest)
        res[o] = floor[:, :, None] + out_res[:, :, None] * norm1[:, None, :]  # (S, m, k): times |v|_1
    if mode == "reverse":
        return _reverse_group(model, plan, xs, tol, est, t, cts, res), None
    return _forward_group(model, plan, xs, tol, est, t, cts, res)


def _forward_group(model, plan, xs, tol, est, t, cts, res):
    """J·v by JVP against FD entry by entry; the terms of <J v, c> = <v, Jᵀc> by the VJP."""
    kg, samples = next(iter(t.values())).shape[:2]
    jv = strategies.jvp(model, xs, t, plan.of, per_sample=True, few=True)  # output -> (k, S, *out)
    entries = []
    for o in plan.of:
        a = np.moveaxis(jv[o].reshape(kg, samples, -1), 0, -1)  # (S, m, k)
        row = np.abs(est[o].value).max(axis=2)
        tol_abs = tol.rtol * row[:, :, None] + res[o] if tol.atol is None else tol.atol
        entries.append((o, a, est[o], tol_abs, plan.ys[o].shape[1:]))
    grads = strategies.vjp(model, xs, cts, plan.wrt, per_sample=True, few=True)  # input -> (k, S, *in)
    (lhs, lscale), (rhs, rscale) = _dots({o: jv[o] for o in plan.of}, cts, kg), _dots(t, grads, kg)
    floor = sum((np.abs(cts[o]).reshape(kg, samples, -1) * np.moveaxis(res[o], -1, 0)).sum(axis=2) for o in plan.of)
    return entries, (lhs, rhs, lscale + rscale, floor)


def _reverse_group(model, plan, xs, tol, est, t, cts, res):
    """<Jᵀc, v> by VJP against the FD of <c, f(x + hv)>: the FD estimates of J·v (and their
    errors, one-sided differences and kink measures) contracted with c, the tolerance
    from the terms' magnitudes Σ|c|·|J v|, so that cancellation in the sum is not judged
    against a small total."""
    kg, samples = next(iter(t.values())).shape[:2]
    grads = strategies.vjp(model, xs, cts, plan.wrt, per_sample=True, few=True)  # input -> (k, S, *in)
    ad = _dots(t, grads, kg)[0].T[:, None, :]  # (S, 1, k)
    c = {o: np.moveaxis(cts[o].astype(np.float64).reshape(kg, samples, -1), 0, -1) for o in plan.of}  # (S, m, k)

    def contract(field, absolute=False):
        return sum(((np.abs(c[o]) if absolute else c[o]) * getattr(est[o], field)).sum(axis=1, keepdims=True)
                   for o in plan.of)

    value = contract("value")
    scalar = Estimate(value, contract("error", True), contract("forward"), contract("backward"),
                      sum((np.abs(c[o]) * np.maximum(est[o].excess, 0)).sum(axis=1, keepdims=True) for o in plan.of))
    terms = sum((np.abs(c[o]) * np.abs(est[o].value)).sum(axis=1, keepdims=True) for o in plan.of)
    floor = sum((np.abs(c[o]) * res[o]).sum(axis=1, keepdims=True) for o in plan.of)
    tol_abs = tol.rtol * terms + floor if tol.atol is None else tol.atol
    return [("+".join(plan.of), ad, scalar, tol_abs, ())]


def _dots(us, vs, k):
    """Per (direction, sample): the sum of u·v over the named arrays, and of |u·v|."""
    terms = [(us[n].astype(np.float64) * vs[n]).reshape(k, us[n].shape[1], -1) for n in us]
    return sum(term.sum(axis=2) for term in terms), sum(np.abs(term).sum(axis=2) for term in terms)
