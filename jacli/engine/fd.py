"""Finite differences on the model protocol's forward pass.

Central differences with a step relative to each input element's scale,
h = eps^(1/3) * max(|x|, 1), the step that balances truncation (O(h^2)) against rounding
(O(eps/h)) error. The forward pass runs in float64 when the backend can (``forward64``),
otherwise in the model's own dtype. Perturbed copies of the batch are stacked along the
batch axis (samples are independent), so k columns cost two batched forward calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..model import Model
from ..system import release_free_memory as release


def forward_fn(model: Model, xs: dict, prefer64: bool = True, batch: bool = True, notes: list | None = None):
    """The most precise forward pass the backend offers at ``xs``, and the dtype it computes
    in (probed on one sample, or on the whole arrays with ``batch=False``). When the float64
    path fails, the model's own precision, and ``notes`` (if given) gets a line saying why."""
    dtypes = [np.dtype(s.dtype) for s in model.inputs if s.is_float]
    native = max(dtypes, key=lambda d: d.itemsize) if dtypes else np.dtype(np.float32)
    if prefer64 and model.supports_float64:
        try:
            model.forward64({k: v[:1] for k, v in xs.items()} if batch else dict(xs))
            return model.forward64, np.dtype(np.float64)
        except Exception as e:  # noqa: BLE001 — any failure of the float64 path: differences in the model's dtype
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            note = f"finite differences run in {native}: the float64 evaluation of the model failed ({why})"
            if notes is not None and note not in notes:
                notes.append(note)
    return model.forward, native


def steps(x: np.ndarray, dtype: np.dtype, scale: float = 1.0) -> np.ndarray:
    """Per-element central-difference steps, rounded so that x+h and x-h are exact."""
    h = scale * np.cbrt(np.finfo(dtype).eps) * np.maximum(np.abs(x.astype(dtype)), 1.0)
    x = x.astype(dtype)
    return ((x + h) - x).astype(dtype)


def shifted(model: Model, fwd, xs: dict, name: str, deltas: np.ndarray, of: Sequence[str], batch: bool, dtype) -> dict:
    """f at xs with input ``name`` moved by each of ``deltas`` (shape (k, *x.shape)):
    returns output -> (k, *y.shape). Batched mode stacks the k copies on the batch axis."""
    k = deltas.shape[0]
    base = {n: (v.astype(dtype) if v.dtype.kind == "f" else v) for n, v in xs.items()}
    if batch:
        big = {n: np.broadcast_to(v, (k, *v.shape)).reshape(-1, *v.shape[1:]) for n, v in base.items()}
        big[name] = (base[name][None] + deltas).reshape(-1, *base[name].shape[1:])
        ys = fwd(big)
        return {o: ys[o].reshape(k, -1, *ys[o].shape[1:]) for o in of}
    outs = [fwd({**base, name: base[name] + d}) for d in deltas]
    return {o: np.stack([y[o] for y in outs]) for o in of}


def fd_columns(
    model: Model, xs: dict, wrt: str, of: Sequence[str], batch: bool = True, k: int = 64, prefer64: bool = True,
    notes: list | None = None,
) -> Iterator[tuple[str, tuple[int, np.ndarray]]]:
    """Yield ``(output, (c0, block))`` with block of shape (S, m, kc): columns c0:c0+kc of
    the per-sample (S samples) or whole (S=1) Jacobian by central differences; ``notes``
    as in ``forward_fn``."""
    fwd, dtype = forward_fn(model, xs, prefer64, batch, notes)
    x = xs[wrt]
    lead = x.shape[:1] if batch else ()
    flat = x.reshape(lead + (-1,)) if batch else x.reshape(1, -1)
    n = flat.shape[1]
    h = steps(flat, dtype)  # (S, n)
    samples = flat.shape[0]
    for c0 in range(0, n, k):
        c1 = min(n, c0 + k)
        kc = c1 - c0
        deltas = np.zeros((kc, samples, n), dtype)
        idx = np.arange(kc)
        deltas[idx, :, c0 + idx] = h[:, c0:c1].T
        deltas = deltas.reshape((kc,) + x.shape)
        plus = shifted(model, fwd, xs, wrt, deltas, of, batch, dtype)
        minus = shifted(model, fwd, xs, wrt, -deltas, of, batch, dtype)
        for o in of:
            diff = (plus[o].reshape(kc, samples, -1) - minus[o].reshape(kc, samples, -1)).astype(np.float64)
            block = diff / (2 * h[:, c0:c1].T.astype(np.float64))[:, :, None]  # (kc, S, m)
            yield o, (c0, block.transpose(1, 2, 0))


# --- Richardson-extrapolated estimates with error estimates (used by the gradient check) ---
FACTORS = np.array([1.0, -1.0, 0.5, -0.5])  # the points x + t*delta evaluated for each estimate
ROUNDING = 4.0  # a forward pass is trusted to ROUNDING * eps * |f| (or the measured noise, if larger)
NOISE_ULPS = 4  # the perturbation that measures the rounding noise, in units in the last place


def default_eps(dtype) -> float:
    """The relative step eps^(1/3) of the dtype the forward pass computes in."""
    return float(np.cbrt(np.finfo(dtype).eps))


@dataclass
class Estimate:
    """Finite-difference derivatives along k directions for S samples and m outputs, each
    array (S, m, k), float64.

    ``value``: Richardson extrapolation (4 D(h/2) - D(h)) / 3 of the central differences at
    steps h and h/2. ``error``: an estimate of |value - true derivative|: |D(h) - D(h/2)|
    (three times the estimated truncation error of D(h/2)) plus the rounding bound
    3 r / h with r = ROUNDING * eps * |f|. ``forward``/``backward``: the one-sided
    differences (f(x + h/2) - f(x)) / (h/2) and (f(x) - f(x - h/2)) / (h/2). ``excess``: how
    far the one-sided differences extrapolated to second order (2 F(h/2) - F(h)) disagree
    beyond their error estimates; positive only where f is not smooth within the step."""

    value: np.ndarray
    error: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    excess: np.ndarray


def forward_cost(fwd, xs: dict) -> int:
    """Bytes of memory one sample takes in a forward call of ``fwd``, measured at ``xs`` (one
    or two samples, the forward pass already warm) as the growth of the process's peak
    resident memory (Linux; elsewhere, or if smaller, 64 bytes per input and output element).
    Freed memory is handed back to the system first (``release``): memory the allocator
    still holds would be reused unseen (a float64 ResNet50 sample measured 0, not 15 MB)."""
    samples = next(iter(xs.values())).shape[0]
    release()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = _status("VmRSS")
        ys = fwd(xs)
        grown = (_status("VmHWM") - before) // samples
    except (OSError, ValueError, StopIteration):
        ys, grown = fwd(xs), 0
    elements = sum(v[:1].size for v in xs.values()) + sum(v[:1].size for v in ys.values())
    return int(max(grown, 64 * elements))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def resident() -> int | None:
    """The process's resident memory in bytes, after ``release``; None where it cannot be read."""
    release()
    try:
        return _status("VmRSS")
    except (OSError, ValueError, StopIteration):
        return None


def left(budget: int, start: int | None) -> int:
    """What remains of ``budget`` once the memory resident since ``start`` (``resident()``)
    is taken off it: the float64 copy of the model and the traced derivative graphs of a
    framework that compiles them (TensorFlow: 150-350 MB for a full-size Keras application)
    come out of the working budget. At least an eighth of it, so that the work goes on, in
    small pieces, where they took more."""
    now = resident() if start is not None else None
    grown = 0 if now is None else max(0, now - start)
    return max(budget // 8, budget - grown)


def in_pieces(fwd, limit: int | None):
    """``fwd`` called on at most ``limit`` samples at a time (samples are independent)."""
    if not limit:
        return fwd

    def pieces(xs):
        n = next(iter(xs.values())).shape[0]
        if n <= limit:
            return fwd(xs)
        parts = [fwd({k: v[s:s + limit] for k, v in xs.items()}) for s in range(0, n, limit)]
        return {o: np.concatenate([p[o] for p in parts]) for o in parts[0]}

    return pieces


def shifted_all(fwd, xs: dict, dtype, deltas: dict, of: Sequence[str]) -> tuple[dict, dict]:
    """f at xs + t * deltas for every t in FACTORS, on the stacked batch (samples are
    independent). ``deltas``: input name -> (k, *x.shape), float64. Returns
    outputs ``o -> (4, k, S, m)`` (float64) and the displacements actually applied once the
    points are rounded to ``dtype``, ``name -> (4, k, *x.shape)`` (float64, exact)."""
    k = next(iter(deltas.values())).shape[0]
    samples = next(iter(xs.values())).shape[0]
    big, moved = {}, {}
    for n, v in xs.items():
        v = v.astype(dtype) if v.dtype.kind == "f" else v
        if n in deltas:
            v64 = v.astype(np.float64)
            points = (v64 + FACTORS.reshape((4, 1) + (1,) * v.ndim) * deltas[n]).astype(dtype)
            moved[n] = points.astype(np.float64) - v64
        else:
            points = np.broadcast_to(v, (4, k, *v.shape))
        big[n] = points.reshape(-1, *v.shape[1:])
    ys = fwd(big)
    return {o: ys[o].reshape(4, k, samples, -1).astype(np.float64) for o in of}, moved


def rounding_noise(fwd, xs: dict, dtype, of: Sequence[str], f0: dict, seed: int = 0) -> dict:
    """The forward pass's rounding noise per sample and output element, measured: the
    largest |f(x + δ) − f(x)| over two perturbations δ of NOISE_ULPS units in the last place
    of every float input element (random signs; J·δ is ~1e-4 of an FD step's change).
    Where the output is small by cancellation of large intermediates, the noise is far
    above ROUNDING·eps·|f|. ``f0``: output -> (S, m) at xs. Returns output -> (S, m)."""
    rng = np.random.default_rng([seed, 3])
    samples = next(iter(xs.values())).shape[0]
    eps = float(np.finfo(dtype).eps)
    big = {}
    for n, v in xs.items():
        v = v.astype(dtype) if v.dtype.kind == "f" else v
        if v.dtype.kind == "f":
            step = NOISE_ULPS * eps * np.maximum(np.abs(v.astype(np.float64)), 1.0)
            signs = rng.choice([-1.0, 1.0], size=(2, *v.shape))
            big[n] = (v.astype(np.float64)[None] + signs * step).astype(dtype).reshape(-1, *v.shape[1:])
        else:
            big[n] = np.broadcast_to(v, (2, *v.shape)).reshape(-1, *v.shape[1:])
    ys = fwd(big)
    return {o: np.abs(ys[o].reshape(2, samples, -1).astype(np.float64) - f0[o][None]).max(axis=0) for o in of}


def richardson(f0: np.ndarray, outs: np.ndarray, spans: np.ndarray, eps: float, noise=None) -> Estimate:
    """``f0`` (S, m): f at x; ``outs`` (4, k, S, m): f at the FACTORS points; ``spans``
    (4, k, S): the signed length of each displacement along its direction; ``eps``: the
    machine epsilon of the dtype f was computed in; ``noise`` (S, m): the measured rounding
    noise (``rounding_noise``), a floor under the rounding bound."""
    fp1, fm1, fp2, fm2 = outs
    s = spans[..., None]
    d1 = (fp1 - fm1) / (s[0] - s[1])
    d2 = (fp2 - fm2) / (s[2] - s[3])
    r = ROUNDING * eps * np.maximum(np.abs(f0)[None], np.maximum(np.abs(fp1), np.abs(fm1)))
    if noise is not None:
        r = np.maximum(r, noise[None])
    truncation, h = np.abs(d1 - d2), np.abs(s[2] - s[3])
    forward, backward = (fp2 - f0[None]) / s[2], (f0[None] - fm2) / -s[3]
    extrapolated_gap = (2 * forward - (fp1 - f0[None]) / s[0]) - (2 * backward - (f0[None] - fm1) / -s[1])
    excess = np.abs(extrapolated_gap) - 2 * (truncation + 10 * r / h)  # each side: truncation and rounding 10 r / h

    def layout(a):  # (k, S, m) -> (S, m, k)
        return np.ascontiguousarray(np.moveaxis(a, 0, -1))

    return Estimate(layout((4 * d2 - d1) / 3), layout(truncation + 3 * r / h), layout(forward), layout(backward),
                    layout(excess))


def estimate_columns(fwd, xs: dict, wrt: str, of: Sequence[str], dtype, rel: float, f0: dict, k: int = 64,
                     noise: dict | None = None, columns: np.ndarray | None = None):
    """Yield ``(c0, c1, {output: Estimate})``: columns c0:c1 of every sample's Jacobian
    d(of)/d(wrt) — or, given ``columns`` (flat input indices), the columns at positions
    c0:c1 of that list — with steps h = rel * max(|x|, 1) per input element; ``noise`` as
    in ``richardson``, per output."""
    x = xs[wrt]
    samples = x.shape[0]
    n = x[0].size
    columns = np.arange(n) if columns is None else np.asarray(columns, dtype=np.intp)
    h = rel * np.maximum(np.abs(x.reshape(samples, n).astype(dtype).astype(np.float64)), 1.0)
    eps = float(np.finfo(dtype).eps)
    for c0 in range(0, columns.size, k):
        c1 = min(columns.size, c0 + k)
        idx, cols = np.arange(c1 - c0), columns[c0:c1]
        deltas = np.zeros((c1 - c0, samples, n))
        deltas[idx, :, cols] = h[:, cols].T
        outs, moved = shifted_all(fwd, xs, dtype, {wrt: deltas.reshape((c1 - c0,) + x.shape)}, of)
        flat = moved[wrt].reshape(4, c1 - c0, samples, n)
        spans = np.stack([flat[t][idx, :, cols] for t in range(4)])  # (4, kc, S)
        if np.any(spans[0] == spans[1]) or np.any(spans[2] == spans[3]):
            raise InputError(f"the finite-difference step {rel:g} is too small for {np.dtype(dtype)}: x ± h rounds to x")
        yield c0, c1, {o: richardson(f0[o], outs[o], spans, eps, None if noise is None else noise[o]) for o in of}


def estimate_directions(fwd, xs: dict, tangents: dict, of: Sequence[str], dtype, h: float, f0: dict,
                        noise: dict | None = None):
    """Directional derivatives along ``tangents`` (input name -> (k, *x.shape)): returns
    ``({output: Estimate}, realized)`` where the estimates are of J · realized[name], the
    tangents actually realised once x ± h t is rounded to ``dtype`` (so that an exact J·t
    is comparable to them to second order)."""
    outs, moved = shifted_all(fwd, xs, dtype, {n: h * t for n, t in tangents.items()}, of)
    k, samples = next(iter(tangents.values())).shape[:2]
    spans = np.broadcast_to((FACTORS * h)[:, None, None], (4, k, samples))
    realized = {n: (4 * (m[2] - m[3]) / h - (m[0] - m[1]) / (2 * h)) / 3 for n, m in moved.items()}
    eps = float(np.finfo(dtype).eps)
    return {o: richardson(f0[o], outs[o], spans, eps, None if noise is None else noise[o]) for o in of}, realized
