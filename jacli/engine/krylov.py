"""Block Krylov singular values of a batch of linear maps known only by their products.

For S maps A (d -> other, d <= other), of which only A V and Aᵀ U can be applied (to blocks
of vectors for all S at once), the top (and optionally bottom) k singular values by block
Lanczos with full reorthogonalisation and thick restarts on the Gram operator AᵀA, each with
a certified error bound. numpy only; ``spectral.py`` builds the maps from a model's JVP and
VJP."""
from __future__ import annotations

import numpy as np

NOISE = 30  # matrix-free accuracy is never asked beyond NOISE * eps(model dtype) * sigma_max ...
GRAM_FLOOR = 4  # ... nor Gram residuals below GRAM_FLOOR * eps * sigma_max², the rounding level of AᵀA v
MAX_ITER = 300
MAX_COLS = 256


def block(k: int) -> int:
    """Vectors added per iteration for k wanted values (more than k speeds convergence)."""
    return k + max(2, k // 2)


def max_cols(d: int, block: int, budget: int) -> int:
    """Basis size at which the method restarts: a larger basis converges in fewer products
    (most of all for the smallest values); bounded by 256, by d, and by a share of memory."""
    return min(d, max(8 * block, min(MAX_COLS, budget // (16 * d * 8))))


def singular_values(A, At, S, d, k, smallest, tol, eps, max_cols, rng, progress):
    """Top (and with ``smallest`` bottom) k singular values of S matrices of which we can
    only apply A (d -> other, d <= other) and Aᵀ, by block Krylov on the Gram operator AᵀA
    with thick restarts. Returns the values (S, k) with their error bounds, the top singular
    vectors (S, k, d) and (S, k, other), whether each sample converged, and the iterations."""
    sides = 2 if smallest else 1
    b = block(k)
    bad = np.zeros(S, bool)  # samples whose products hold NaN/Inf: their values are NaN
    Q = _orthonormalize(rng.standard_normal((S, d, min(b * sides, d))), None, rng)
    Z = _finite(At(A(Q)), bad)  # AᵀA Q, kept alongside Q so that restarts cost no products
    done_before = np.zeros(S, bool)
    it = 0
    while True:
        c = Q.shape[2]
        H = Q.transpose(0, 2, 1) @ Z
        theta, W = np.linalg.eigh((H + H.transpose(0, 2, 1)) / 2)
        theta, W = np.clip(theta[:, ::-1], 0, None), W[:, :, ::-1]  # descending
        wanted = _wanted(c, k, smallest)
        Ww = W[:, :, wanted]
        e = np.linalg.norm(Z @ Ww - (Q @ Ww) * theta[:, None, wanted], axis=1)  # Gram residuals
        sigma = np.sqrt(theta[:, wanted])
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.minimum(np.where(sigma > 0, e / sigma, np.inf), np.sqrt(e))
        # a pair is done when its bound meets the tolerance, or its residual is down to rounding noise
        ok = (bound <= tol * sigma + NOISE * eps * sigma[:, :1]) | (e <= GRAM_FLOOR * eps * theta[:, :1])
        done = ok.all(axis=1) | (c >= d)
        if progress and (done & ~done_before).any():
            progress(int((done & ~done_before).sum()))
        done_before = done
        if done.all() or it >= MAX_ITER:
            break
        if max_cols < d and c + b * sides > max_cols:  # thick restart: keep the best Ritz vectors
            keep = _wanted(c, max_cols // (2 * sides), smallest)
            Q, Z, theta, W = Q @ W[:, :, keep], Z @ W[:, :, keep], theta[:, keep], np.eye(len(keep))[None]
            c = len(keep)
        grow = _wanted(c, b, smallest)[: d - c]
        Wg = W[:, :, grow]
        P = _orthonormalize(Z @ Wg - (Q @ Wg) * theta[:, None, grow], Q, rng)  # residuals: new directions
        Q, Z = np.concatenate([Q, P], axis=2), np.concatenate([Z, _finite(At(A(P)), bad)], axis=2)
        it += 1
    if progress and not done.all():
        progress(int((~done).sum()))
    # Final triplets from the SVD of A on the wanted Ritz vectors (no squaring, so small
    # singular values keep their accuracy), certified by one more product: with A v = σ u
    # and r = Aᵀu - σ v, some singular value lies within ‖r‖ of σ. Near zero the Gram bound
    # (moved by |σ - √θ|) is the better one.
    V = Q @ Ww
    U, s, Wt = np.linalg.svd(_finite(A(V), bad), full_matrices=False)
    V = V @ Wt.transpose(0, 2, 1)
    bound = np.minimum(np.linalg.norm(_finite(At(U), bad) - V * s[:, None, :], axis=1), bound + np.abs(s - sigma))
    for a in (s, bound, U, V):
        a[bad] = np.nan
    return {"top": s[:, :k], "top_bound": bound[:, :k], "low": s[:, -k:], "low_bound": bound[:, -k:],
            "right": V[:, :, :k].transpose(0, 2, 1), "left": U[:, :, :k].transpose(0, 2, 1), "converged": done & ~bad,
            "iterations": it}


def _finite(X: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Zero the samples of X (S, ., .) that hold NaN/Inf, and mark them in ``bad``."""
    bad |= ~np.isfinite(X).all(axis=(1, 2))
    X[bad] = 0
    return X


def _wanted(c: int, k: int, bottom: bool) -> np.ndarray:
    """Indices (into Ritz values sorted descending) of the top k, and the bottom k too."""
    top = np.arange(min(k, c))
    return np.union1d(top, np.arange(max(0, c - k), c)) if bottom else top


def _orthonormalize(P: np.ndarray, Q: np.ndarray | None, rng) -> np.ndarray:
    """Orthonormal columns spanning P with Q projected out (twice, for stability); columns
    that vanish (already in span Q) are replaced by random directions."""
    for _ in range(2):
        if Q is not None:
            P = P - Q @ (Q.transpose(0, 2, 1) @ P)
            P = P - Q @ (Q.transpose(0, 2, 1) @ P)
        norms = np.linalg.norm(P, axis=1, keepdims=True)
        P, R = np.linalg.qr(P / np.where(norms > 0, norms, 1))
        weak = np.abs(np.diagonal(R, axis1=1, axis2=2)) < 1e-8
        if not weak.any():
            return P
        P = np.where(weak[:, None, :], rng.standard_normal(P.shape), P)
    return P
