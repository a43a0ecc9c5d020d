"""``check()`` of every entry (the default): the AD Jacobian of each sample block against
central differences of every input element, extrapolated, in blocks of FD columns; the
entries found wrong are judged again at nearby points (``rejudge.columns``). And what that
costs, said before the work where it is long (``warn_if_long``)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import jacobian as jac
from . import rejudge
from .check import Tolerance, _resolution, _Tally, _width
from .fd import Estimate, estimate_columns, rounding_noise

LONG = 60.0  # seconds of finite differences of every entry past which ``notice`` hears of it first


def run(model, plan: jac.Plan, fwd, tol: Tolerance, tally: _Tally, budget: int, progress, seed: int) -> None:
    """Every entry: AD Jacobians sample block by sample block (a sink on ``jacobian.run``),
    each block compared with FD as soon as all its (output, input) pairs are in; the entries
    found wrong are judged again at nearby points (``rejudge.columns``)."""
    pairs = {p.key: p for p in plan.pairs}
    rng = np.random.default_rng([seed, 4])
    pending: dict[str, np.ndarray] = {}
    fd_dtype = np.dtype(tol.fd_dtype)
    fields = [f.name for f in dataclasses.fields(Estimate)]

    class Sink:
        def write(self, key, s0, s1, block):
            pending[key] = block.reshape(s1 - s0, pairs[key].m, pairs[key].n)
            if len(pending) == len(pairs):
                compare(s0, s1, dict(pending))
                pending.clear()

    columns = _columns(plan)

    def compare(s0, s1, ad):
        told = [0.0]

        def tell(done):  # progress by FD columns, in fractions of the block's samples (one image
            if progress:  # through ResNet50 at 64x64x3 is 4 x 12,288 float64 forward passes: minutes)
                progress((s1 - s0) * done / columns - told[0])
                told[0] = (s1 - s0) * done / columns

        xs = {k: v[s0:s1] for k, v in plan.xs.items()}
        f0 = {o: y.reshape(s1 - s0, -1).astype(np.float64) for o, y in fwd(xs).items() if o in plan.of}
        k = max(1, (budget // 4) // (4 * (s1 - s0) * _width(plan) * 8 * 8))
        noise = rounding_noise(fwd, xs, fd_dtype, plan.of, f0, s0)
        est, before = {}, 0
        for i in plan.wrt:
            arrays = {o: [np.empty((s1 - s0, pairs[f"d{o}/d{i}"].m, pairs[f"d{o}/d{i}"].n)) for _ in fields] for o in plan.of}
            for c0, c1, block in estimate_columns(fwd, xs, i, plan.of, fd_dtype, tol.eps, f0, k, noise):
                for o, e in block.items():
                    for dst, name in zip(arrays[o], fields):
                        dst[:, :, c0:c1] = getattr(e, name)
                tell(before + c1)
            before += pairs[f"d{plan.of[0]}/d{i}"].n
            for o in plan.of:
                est[f"d{o}/d{i}"] = Estimate(*arrays[o])
        largest = np.max([np.abs(e.value).max(axis=(1, 2), initial=0.0) for e in est.values()], axis=0)  # (S,)
        judged = {}
        for o in plan.of:
            row = np.max([np.abs(est[f"d{o}/d{i}"].value).max(axis=2) for i in plan.wrt], axis=0)  # (S, m)
            floor, res = _resolution(tol, plan.ys[o][s0:s1], largest)
            for i in plan.wrt:
                tol_abs = (tol.rtol * row + floor + res)[:, :, None] if tol.atol is None else tol.atol
                judged[f"d{o}/d{i}"] = (ad[f"d{o}/d{i}"], est[f"d{o}/d{i}"], tol_abs)
        switched = rejudge.columns(model, plan, fwd, tol, tally, xs, s0, judged, rng, max(1, k * (s1 - s0)),
                                   max(1, budget // 8)) or {}
        for key, (a, e, tol_abs) in judged.items():
            p = pairs[key]
            tally.add(s0, p.of, p.wrt, a, e, tol_abs, p.out_shape, p.in_shape, switched=switched.get(key))
        tell(columns)

    jac.run(model, plan, Sink(), method="ad", budget=max(1, budget // 8))


def warn_if_long(plan: jac.Plan, fwd, one: dict, copies: int, notice) -> None:
    """Every entry costs 4 FD forward evaluations per input element and sample (two steps,
    central); timed here on a second call of ``copies`` copies of the first sample, as the FD
    calls batch their points (a CI job that checks one 64x64x3 image through ResNet50 would
    otherwise sit silent for over 10 minutes)."""
    batch = {k: np.repeat(v, copies, axis=0) for k, v in one.items()}
    fwd(batch)  # a new batch size: TensorFlow may trace for it first
    start = time.perf_counter()
    fwd(batch)
    seconds = (time.perf_counter() - start) / copies
    columns = _columns(plan)
    expected = 4 * columns * plan.samples * seconds
    if expected > LONG:
        took = f"{expected / 60:.0f} minutes" if expected >= 120 else f"{expected:.0f} s"
        notice(f"checking every entry takes about {took} here ({columns:,} input elements x 4 forward passes, "
               f"{plan.samples} sample{'s' if plan.samples != 1 else ''}); --directions K checks K random "
               "directional derivatives per sample instead, 4 forward passes each")


def _columns(plan: jac.Plan) -> int:
    """FD columns per sample: the elements of every input the check differentiates by."""
    return sum(plan.xs[i][:1].size for i in plan.wrt)
