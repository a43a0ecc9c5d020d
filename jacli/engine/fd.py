"""Finite differences on the model protocol's forward pass.

Central differences with a step relative to each input element's scale,
h = eps^(1/3) * max(|x|, 1), the step that balances truncation (O(h^2)) against rounding
(O(eps/h)) error. The forward pass runs in float64 when the backend can (``forward64``),
otherwise in the model's own dtype. Perturbed copies of the batch are stacked along the
batch axis (samples are independent), so k columns cost two batched forward calls.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..errors import UnsupportedError
from ..model import Model


def forward_fn(model: Model, xs: dict, prefer64: bool = True):
    """The most precise forward pass the backend offers at ``xs``, and the dtype it computes in."""
    if prefer64 and model.supports_float64:
        try:
            model.forward64({k: v[:1] for k, v in xs.items()})
            return model.forward64, np.dtype(np.float64)
        except UnsupportedError:
            pass  # e.g. an operator without a float64 kernel: differences in the model's dtype
    dtypes = [np.dtype(s.dtype) for s in model.inputs if s.is_float]
    return model.forward, (max(dtypes, key=lambda d: d.itemsize) if dtypes else np.dtype(np.float32))


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
    model: Model, xs: dict, wrt: str, of: Sequence[str], batch: bool = True, k: int = 64, prefer64: bool = True
) -> Iterator[tuple[str, tuple[int, np.ndarray]]]:
    """Yield ``(output, (c0, block))`` with block of shape (S, m, kc): columns c0:c0+kc of
    the per-sample (S samples) or whole (S=1) Jacobian by central differences."""
    fwd, dtype = forward_fn(model, xs, prefer64)
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
