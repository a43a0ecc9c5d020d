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
    return summarize_block(J[None], index, of, wrt, out_ndim, heat)[0]


def summarize_block(block: np.ndarray, s0: int, of: str, wrt: str, out_ndim: int, heat: bool = False) -> list[Summary]:
    """Statistics of the per-sample Jacobians ``block[j]`` (samples s0 + j), vectorised
    over slices of the block small enough for the cache; a heatmap for the first one when ``heat``."""
    step = max(1, (1 << 20) // max(block[:1].size, 1))
    if len(block) > step:
        return [s for j in range(0, len(block), step)
                for s in summarize_block(block[j : j + step], s0 + j, of, wrt, out_ndim, heat and j == 0)]
    shape, n = block.shape[1:], len(block)
    a = np.abs(block.reshape(n, -1))
    size = a.shape[1]
    squares = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    if np.isfinite(squares).all():  # then every entry is finite (the usual case: no more passes)
        safe, bad = a, [0] * n
    else:
        finite = np.isfinite(a)
        safe = np.where(finite, a, 0)
        squares = np.einsum("ij,ij->i", safe, safe, dtype=np.float64)
        bad = (size - np.count_nonzero(finite, axis=1)).tolist()
    if size:
        flat = safe.argmax(axis=1)
        top = safe[np.arange(n), flat].tolist()
        where = np.stack(np.unravel_index(flat, shape), axis=1).tolist() if shape else [[]] * n
        zeros = (np.count_nonzero(a == 0, axis=1) / size).tolist()
    else:
        top, where, zeros = [0.0] * n, [[0] * len(shape)] * n, [0.0] * n
    fro = np.sqrt(squares).tolist()
    return [
        Summary(index=s0 + j, of=of, wrt=wrt, shape=tuple(shape), frobenius=fro[j], max_abs=float(top[j]),
                argmax=(where[j][:out_ndim], where[j][out_ndim:]), zero_fraction=zeros[j], nonfinite=bad[j],
                heatmap=_pool(safe[j].reshape(shape), HEAT) if heat and j == 0 and len(shape) == 2 and size else None)
        for j in range(n)
    ]


def _pool(a: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """Max-pool a 2-D array down to at most ``cells`` (rows, cols)."""
    r, c = a.shape
    rows = np.array_split(np.arange(r), min(r, cells[0]))
    cols = np.array_split(np.arange(c), min(c, cells[1]))
    return np.array([[a[np.ix_(ri, ci)].max() for ci in cols] for ri in rows])


class _Running:
    """A Summary of one sample's Jacobian that arrives in parts (rows x cols of the
    flattened (m, n) matrix)."""

    def __init__(self, index: int, p, heat: bool):
        self.index, self.p = index, p
        self.squares, self.top, self.where, self.zeros, self.bad, self.seen = 0.0, -1.0, 0, 0, 0, 0
        self.heat = None
        if heat and len(p.out_shape) == 1 and len(p.in_shape) == 1 and p.m * p.n:
            self.edges = [_edges(p.m, HEAT[0]), _edges(p.n, HEAT[1])]
            self.heat = np.zeros((len(self.edges[0]) - 1, len(self.edges[1]) - 1))

    def add(self, rows: slice, cols: slice, block: np.ndarray) -> Summary | None:
        """Take a part; the finished Summary once every entry has been seen."""
        a = np.abs(block)
        finite = np.isfinite(a)
        safe = a if finite.all() else np.where(finite, a, 0)
        self.bad += a.size - int(np.count_nonzero(finite))
        self.squares += float(np.einsum("ij,ij->", safe, safe, dtype=np.float64))
        self.zeros += int(np.count_nonzero(a == 0))
        self.seen += a.size
        if a.size and safe.max() > self.top:
            r, c = np.unravel_index(int(safe.argmax()), safe.shape)
            self.top, self.where = float(safe[r, c]), (rows.start + r) * self.p.n + cols.start + c
        if self.heat is not None:
            self._pool(rows, cols, safe)
        return self._summary() if self.seen == self.p.m * self.p.n else None

    def _pool(self, rows: slice, cols: slice, safe: np.ndarray) -> None:
        """Max of the part over each heatmap cell it overlaps."""
        (re, ce) = self.edges
        for i in range(len(re) - 1):
            r0, r1 = max(re[i], rows.start), min(re[i + 1], rows.stop)
            if r0 >= r1:
                continue
            for j in range(len(ce) - 1):
                c0, c1 = max(ce[j], cols.start), min(ce[j + 1], cols.stop)
                if c0 < c1:
                    cell = safe[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start].max()
                    self.heat[i, j] = max(self.heat[i, j], cell)

    def _summary(self) -> Summary:
        p, size = self.p, self.p.m * self.p.n
        at = [int(i) for i in np.unravel_index(self.where, p.out_shape + p.in_shape)] if size else [0] * (
            len(p.out_shape) + len(p.in_shape))
        k = len(p.out_shape)
        return Summary(index=self.index, of=p.of, wrt=p.wrt, shape=p.out_shape + p.in_shape,
                       frobenius=float(np.sqrt(self.squares)), max_abs=max(self.top, 0.0), argmax=(at[:k], at[k:]),
                       zero_fraction=self.zeros / size if size else 0.0, nonfinite=self.bad, heatmap=self.heat)


def _edges(size: int, cells: int) -> list[int]:
    """Cell boundaries of ``np.array_split(range(size), min(size, cells))``."""
    n = min(size, cells)
    q, r = divmod(size, n)
    return [i * q + min(i, r) for i in range(n + 1)]


class StatsSink:
    """Passes blocks on to another sink (or none) and keeps a Summary per sample and pair."""

    def __init__(self, pairs, inner=None, heat: bool = True):
        self.pairs = {p.key: p for p in pairs}
        self.inner, self.heat = inner, heat
        self.summaries: list[Summary] = []
        self.running: dict[tuple[str, int], _Running] = {}

    def write_part(self, key: str, s: int, rows: slice, cols: slice, block: np.ndarray, out_ndim: int) -> None:
        if self.inner is not None:
            self.inner.write_part(key, s, rows, cols, block, out_ndim)
        if (key, s) not in self.running:
            self.running[key, s] = _Running(s, self.pairs[key], self.heat and s == 0)
        done = self.running[key, s].add(rows, cols, block)
        if done is not None:
            self.summaries.append(done)
            del self.running[key, s]

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.write(key, s0, s1, block)
        p = self.pairs[key]  # a heatmap for the first sample only: the one the terminal view draws
        self.summaries.extend(summarize_block(block, s0, p.of, p.wrt, len(p.out_shape), self.heat and s0 == 0))

    def ordered(self) -> list[Summary]:
        order = {(p.of, p.wrt): j for j, p in enumerate(self.pairs.values())}
        return sorted(self.summaries, key=lambda s: (s.index, order[s.of, s.wrt]))
