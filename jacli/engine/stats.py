"""Per-sample summaries of Jacobian blocks, computed as the blocks stream past."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Summary:
    """What the terminal and ``--json`` report for one (sample, output, input) Jacobian."""

    index: int
    of: str
    wrt: str
    shape: tuple[int, ...]
    frobenius: float
    max_abs: float
    argmax: tuple[list[int], list[int]]  # (output multi-index, input multi-index)
    zero_fraction: float
    nonfinite: int
    heatmap: np.ndarray | None = None  # |J| pooled to at most HEAT rows x cols, 2-D Jacobians only

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "of": self.of,
            "wrt": self.wrt,
            "shape": list(self.shape),
            "frobenius": self.frobenius,
            "max_abs": self.max_abs,
            "argmax": [self.argmax[0], self.argmax[1]],
            "zero_fraction": self.zero_fraction,
            "nonfinite": self.nonfinite,
        }


HEAT = (12, 40)


def summarize(J: np.ndarray, index: int, of: str, wrt: str, out_ndim: int, heat: bool = True) -> Summary:
    """Statistics of one per-sample Jacobian ``J`` of shape (*out, *in)."""
    a = np.abs(J)
    finite = np.isfinite(a)
    bad = int(a.size - finite.sum())
    safe = np.where(finite, a, 0)
    flat = int(np.argmax(safe)) if a.size else 0
    multi = np.unravel_index(flat, J.shape) if a.size else (0,) * J.ndim
    out_idx, in_idx = [int(i) for i in multi[:out_ndim]], [int(i) for i in multi[out_ndim:]]
    hm = _pool(safe, HEAT) if heat and J.ndim == 2 and a.size else None
    return Summary(
        index=index,
        of=of,
        wrt=wrt,
        shape=tuple(J.shape),
        frobenius=float(np.sqrt(np.sum(np.square(safe, dtype=np.float64)))),
        max_abs=float(safe.flat[flat]) if a.size else 0.0,
        argmax=(out_idx, in_idx),
        zero_fraction=float(np.count_nonzero(J == 0) / J.size) if J.size else 0.0,
        nonfinite=bad,
        heatmap=hm,
    )


def _pool(a: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """Max-pool a 2-D array down to at most ``cells`` (rows, cols)."""
    r, c = a.shape
    rows = np.array_split(np.arange(r), min(r, cells[0]))
    cols = np.array_split(np.arange(c), min(c, cells[1]))
    return np.array([[a[np.ix_(ri, ci)].max() for ci in cols] for ri in rows])


class StatsSink:
    """Passes blocks on to another sink (or none) and keeps a Summary per sample and pair."""

    def __init__(self, pairs, inner=None, heat: bool = True):
        self.pairs = {p.key: p for p in pairs}
        self.inner, self.heat = inner, heat
        self.summaries: list[Summary] = []

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.write(key, s0, s1, block)
        p = self.pairs[key]
        for j in range(s1 - s0):
            self.summaries.append(summarize(block[j], s0 + j, p.of, p.wrt, len(p.out_shape), self.heat))

    def ordered(self) -> list[Summary]:
        return sorted(self.summaries, key=lambda s: s.index)
