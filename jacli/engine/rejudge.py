"""Judging a failing comparison again at nearby points, for both kinds of check.

A switch point (ReLU, max) that the model's precision and float64 resolve differently at x
— in a deep ReLU network a pre-activation within float32 rounding of 0, which puts the
float32 model, whose slope AD is, on another linear piece than the float64 function FD
differentiates, with no FD step crossing it — makes AD and FD disagree at x. A step of
SHIFT·max(|x|, 1) away (random signs) the mismatch AD − FD vanishes, or jumps (another unit,
or none, sits at its switch there); a wrong gradient's mismatch is a smooth function of x, so
it is nearly the same there. A comparison is judged again at up to RETRIES such points: it
becomes a kink where its mismatch changes by more than JUMP of itself beyond both points'
FD error bars (so that FD noise cannot make one, and a wrong gradient just past its
tolerance that slides under it a step away is still wrong), and stays wrong otherwise.

``again`` is that rule; a direction (``directions``) is judged again whole, recomputed at the
nearby point. Every-entry checks (``columns``) judge again only the entries found wrong,
each on its own, with AD and FD recomputed at the nearby point per sample for the affected
columns only (forward mode: one JVP seed per column; FD: one column each) or, in reverse
mode, AD for the affected rows (one VJP seed per row): nothing at all when nothing fails.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import jacobian as jac
from . import strategies
from .fd import Estimate, estimate_columns, rounding_noise

SHIFT = 1e-4  # a failing comparison is judged again at x moved by SHIFT·max(|x|, 1) (random signs)
RETRIES = 3  # points it is judged again at before it counts as a wrong gradient
JUMP = 0.5  # ... where its mismatch AD − FD changes by more than this fraction of itself (beyond the
# error bars), it was a switch point
FIELDS = tuple(f.name for f in dataclasses.fields(Estimate))


def nearby(xs: dict, wrt, rng) -> dict:
    """``xs`` with every input in ``wrt`` moved by SHIFT·max(|x|, 1), random signs."""
    return {n: (v + (SHIFT * np.maximum(np.abs(v), 1) * rng.choice([-1, 1], v.shape)).astype(v.dtype)
                if n in wrt else v) for n, v in xs.items()}


def again(tally, judged: list, evaluate, xs: dict, wrt, rng, unit) -> np.ndarray:
    """Which of the comparisons that fail at ``xs`` were switch points. ``judged``: the
    compared arrays at ``xs``, [(AD, FD estimate, absolute tolerance)]; ``evaluate(moved,
    failing)``: the same arrays at the point ``moved`` (only what is ``failing`` need be
    right); ``unit(masks)``: per-entry masks (one per array) -> a mask of the units judged
    (a unit fails when any of its entries does, and was a switch point when any of its
    wrong entries changed). Returns that mask: the units that failed at ``xs`` and changed
    at one of up to RETRIES nearby points."""
    failing = unit([tally.wrong(*e) for e in judged])
    switched = np.zeros_like(failing)
    for _ in range(RETRIES if failing.any() else 0):
        later = evaluate(nearby(xs, wrt, rng), failing)
        changed = failing & unit([_changed(tally, e, o) for e, o in zip(judged, later)])
        switched |= changed
        failing &= ~changed
        if not failing.any():
            break
    return switched


def _changed(tally, before, after) -> np.ndarray:
    """Per entry: wrong at x, and its mismatch AD − FD changed, a step away, by more than
    JUMP of itself plus both points' FD error bars — vanished, or jumped? FD's error is
    within its error bars, and AD's own rounding is far below JUMP of a mismatch that
    exceeded rtol·(|FD| + the row's scale); an entry that merely slid under its tolerance
    has not changed (a wrong gradient just past its tolerance stays wrong), and one that
    is not finite there has not either."""
    r0 = before[0].astype(np.float64) - before[1].value
    r1 = after[0].astype(np.float64) - after[1].value
    with np.errstate(invalid="ignore"):
        return tally.wrong(*before) & (np.abs(r1 - r0) > JUMP * np.abs(r0) + before[1].error + after[1].error)


def columns(model, plan: jac.Plan, fwd, tol, tally, xs: dict, s0: int, judged: dict, rng, fd_columns: int,
            budget: int) -> dict | None:
    """The entries of one sample block (``xs``, samples s0...) that are wrong, judged again
    (``again``) each on its own. ``judged``: pair key -> (AD (S, m, n), FD estimate,
    absolute tolerance broadcastable to it); ``fd_columns``: FD columns per forward call of
    one sample; ``budget``: bytes for the JVP/VJP seeds. Returns pair key -> mask (S, m, n)
    of the wrong entries found to be switch points, or None when no entry is wrong."""
    wrong = {key: tally.wrong(*e) for key, e in judged.items()}
    if not any(w.any() for w in wrong.values()):
        return None
    keys = [key for key, w in wrong.items() if w.any()]
    where = {key: np.nonzero(wrong[key]) for key in keys}  # (sample, row, column) of each wrong entry
    flat = _Flat(plan.pairs, keys, *(np.concatenate([where[key][a] for key in keys]) for a in range(3)),
                 np.concatenate([np.full(where[key][0].size, n) for n, key in enumerate(keys)]))
    ad = np.concatenate([judged[key][0][where[key]] for key in keys])
    est = Estimate(*(np.concatenate([getattr(judged[key][1], f)[where[key]] for key in keys]) for f in FIELDS))
    tol_abs = np.concatenate([np.broadcast_to(judged[key][2], judged[key][0].shape)[where[key]] for key in keys])
    seeds = jac.seed_block(plan, 1, budget)

    def evaluate(moved, failing):
        """AD and FD of the failing entries at ``moved``, sample by sample (NaN elsewhere),
        with the tolerance at x (the rule needs none at ``moved``)."""
        a = np.full(ad.shape, np.nan)
        e = Estimate(*(np.full(ad.shape, np.nan) for _ in FIELDS))
        for j in np.unique(flat.sample[failing]):
            one = {n: v[j : j + 1] for n, v in moved.items()}
            mine = failing & (flat.sample == j)
            _fd_at(fwd, plan, tol, one, s0 + int(j), flat, mine, fd_columns, e)
            _ad_at(model, plan, one, flat, mine, seeds, a)
        return [(a, e, tol_abs)]

    switched = again(tally, [(ad, est, tol_abs)], evaluate, xs, plan.wrt, rng, unit=lambda masks: masks[0])
    out = {}
    for n, key in enumerate(keys):
        out[key] = np.zeros(judged[key][0].shape, bool)
        out[key][where[key]] = switched[flat.pair == n]
    return out


class _Flat:
    """Entries of one sample block as flat arrays: ``sample``, ``row``, ``col`` (flat indices
    into the pair's per-sample Jacobian) and ``pair`` (an index into ``keys``)."""

    def __init__(self, pairs, keys: list[str], sample, row, col, pair):
        self.keys, self.sample, self.row, self.col, self.pair = keys, sample, row, col, pair
        self.index = {key: n for n, key in enumerate(keys)}
        self.pairs = {p.key: p for p in pairs}

    def of_input(self, name: str) -> np.ndarray:
        return np.isin(self.pair, [n for n, key in enumerate(self.keys) if self.pairs[key].wrt == name])

    def of_output(self, name: str) -> np.ndarray:
        return np.isin(self.pair, [n for n, key in enumerate(self.keys) if self.pairs[key].of == name])


def _fd_at(fwd, plan: jac.Plan, tol, one: dict, seed: int, flat: _Flat, mine, fd_columns: int, into: Estimate):
    """FD of the entries ``mine`` at the one-sample point ``one`` into ``into``: the affected
    columns of each input, ``fd_columns`` per forward call."""
    dtype = np.dtype(tol.fd_dtype)
    f0 = {o: y.reshape(1, -1).astype(np.float64) for o, y in fwd(one).items() if o in plan.of}
    noise = rounding_noise(fwd, one, dtype, plan.of, f0, seed)
    for i in plan.wrt:
        sel = mine & flat.of_input(i)
        if not sel.any():
            continue
        cols = np.unique(flat.col[sel])
        for c0, c1, block in estimate_columns(fwd, one, i, plan.of, dtype, tol.eps, f0, fd_columns, noise, cols):
            for o, b in block.items():
                if f"d{o}/d{i}" in flat.index:
                    at = sel & (flat.pair == flat.index[f"d{o}/d{i}"]) & np.isin(flat.col, cols[c0:c1])
                    pos = np.searchsorted(cols[c0:c1], flat.col[at])
                    for f in FIELDS:
                        getattr(into, f)[at] = getattr(b, f)[0, flat.row[at], pos]


def _ad_at(model, plan: jac.Plan, one: dict, flat: _Flat, mine, seeds: int, into: np.ndarray) -> None:
    """AD of the entries ``mine`` at the one-sample point ``one`` into ``into``: in forward
    mode a JVP per affected column (one-hot tangents), in reverse mode a VJP per affected row
    (one-hot cotangents), ``seeds`` at a time."""
    forward = plan.mode == "forward"
    seeded, other = (flat.col, flat.row) if forward else (flat.row, flat.col)
    for name in plan.wrt if forward else plan.of:
        sel = mine & (flat.of_input(name) if forward else flat.of_output(name))
        if not sel.any():
            continue
        idx = np.unique(seeded[sel])
        shape = plan.columns(name) if forward else plan.rows(name)
        dtype = one[name].dtype if forward else plan.dtype
        for k0 in range(0, idx.size, seeds):
            chunk = idx[k0 : k0 + seeds]
            seed = np.zeros((chunk.size, 1, int(np.prod(shape, dtype=np.int64))), dtype)
            seed[np.arange(chunk.size), 0, chunk] = 1
            seed = seed.reshape((chunk.size, 1, *shape))
            if forward:
                got = strategies.jvp(model, one, {name: seed}, plan.of, per_sample=True)  # output -> (k, 1, *out)
            else:
                got = strategies.vjp(model, one, {name: seed}, plan.wrt, per_sample=True)  # input -> (k, 1, *in)
            for key, n in flat.index.items():
                p = flat.pairs[key]
                if (p.wrt if forward else p.of) != name:
                    continue
                at = sel & (flat.pair == n) & np.isin(seeded, chunk)
                block = np.asarray(got[p.of if forward else p.wrt], np.float64).reshape(chunk.size, -1)
                into[at] = block[np.searchsorted(chunk, seeded[at]), other[at]]
