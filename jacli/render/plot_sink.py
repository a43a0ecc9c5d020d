"""What ``--plot`` draws of a Jacobian, gathered as its blocks stream past.

For each (output, input) pair and each of the first few samples a :class:`View` keeps
|J| max-pooled to at most CELLS x CELLS cells of the flattened (m, n) matrix, for a
sequence input (time, features) the maxima over the (output time, input time) blocks, and
for an image input ((C, H, W), (H, W, C) or (H, W)) the saliency maps of chosen outputs:
|dy/dx| reduced over the channels (max or L2), one (H, W) map per output. The sink passes
every block on to the next sink unchanged and never holds J: what it keeps is the size of
the grids and maps, however large J is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

from ..errors import InputError

CELLS = 256  # heatmap cells per axis, at most
MAX_PAIRS = 12  # (output, input) pairs drawn, at most: the first ones in the plan's order
LAYOUTS = ("auto", "chw", "hwc", "hw", "seq", "flat")
IMAGES = ("chw", "hwc", "hw")
_CHANNELS = (1, 3, 4)


def input_layout(shape: tuple[int, ...], asked: str = "auto", channels_last: bool = False) -> str:
    """How to picture an input of per-sample ``shape``: an image (chw, hwc, hw), a sequence
    (seq: time x features) or a flat vector. ``auto``: 3-D with 1, 3 or 4 channels first
    (or last) is an image, 2-D is a sequence; ``channels_last`` settles (3, H, 3)-like
    shapes (Keras models are channels-last)."""
    if asked not in LAYOUTS:
        raise InputError(f"--plot-layout {asked!r}: choose one of {', '.join(LAYOUTS)}")
    need = {"chw": 3, "hwc": 3, "hw": 2, "seq": 2}.get(asked)
    if need is not None and len(shape) != need:
        raise InputError(f"--plot-layout {asked} needs a {need}-D input per sample, but it is {_shape(shape)}")
    if asked != "auto":
        return asked
    if len(shape) == 3 and min(shape) >= 1:
        first, last = shape[0] in _CHANNELS and min(shape[1:]) >= 2, shape[2] in _CHANNELS and min(shape[:2]) >= 2
        if first and last:
            return "hwc" if channels_last else "chw"
        if first or last:
            return "chw" if first else "hwc"
    if len(shape) == 2 and shape[0] >= 2 and shape[1] >= 1:
        return "seq"
    return "flat"


def image_size(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """(channels, height, width) of an image layout."""
    if layout == "chw":
        return shape[0], shape[1], shape[2]
    if layout == "hwc":
        return shape[2], shape[0], shape[1]
    return 1, shape[0], shape[1]


def chosen_outputs(y: np.ndarray, spec: tuple[str, object]) -> list[int]:
    """Flat indices into one sample's output ``y`` picked by ``spec``: ("top", k), the k
    largest values, largest first; ("index", (i, ...)), a flat or multi-index."""
    kind, what = spec
    flat = np.asarray(y, np.float64).reshape(-1)
    if kind == "top":
        order = np.argsort(-np.where(np.isnan(flat), -np.inf, flat), kind="stable")
        return [int(i) for i in order[: min(int(what), flat.size)]]
    index = tuple(what)
    if len(index) == 1 and 0 <= index[0] < flat.size:
        return [int(index[0])]
    if len(index) == y.ndim and all(0 <= i < d for i, d in zip(index, y.shape)):
        return [int(np.ravel_multi_index(index, y.shape))]
    raise InputError(f"--plot-output {','.join(map(str, index))}: the output has shape {_shape(y.shape)} "
                     f"({flat.size} elements); give a flat index below {flat.size}, a multi-index, or top-K")


def _edges(size: int, cells: int) -> np.ndarray:
    """Cell boundaries of ``np.array_split(range(size), min(size, cells))``."""
    n = max(1, min(size, cells))
    q, r = divmod(size, n)
    return np.array([i * q + min(i, r) for i in range(n + 1)])


def _aligned(shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Cell boundaries in the flat index of ``shape`` that fall between steps of its
    leading axis (each cell whole steps of it), at most ``cells`` of them."""
    if len(shape) < 2:
        return _edges(prod(shape), cells)
    return _edges(shape[0], cells) * prod(shape[1:])


class Grid:
    """Max-pooling of a flat (m, n) matrix into the cells bounded by ``rows`` x ``cols``
    (increasing boundaries from 0 to m, 0 to n), fed part by part."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows, self.cols = rows, cols
        self.values = np.zeros((len(rows) - 1, len(cols) - 1))

    def add(self, rows: slice, cols: slice, a: np.ndarray) -> None:
        if not a.size:
            return
        ri = np.searchsorted(self.rows, np.arange(rows.start, rows.stop), side="right") - 1
        ci = np.searchsorted(self.cols, np.arange(cols.start, cols.stop), side="right") - 1
        pooled = np.maximum.reduceat(a, np.flatnonzero(np.diff(ri, prepend=-1)), axis=0)
        pooled = np.maximum.reduceat(pooled, np.flatnonzero(np.diff(ci, prepend=-1)), axis=1)
        view = self.values[ri[0] : ri[-1] + 1, ci[0] : ci[-1] + 1]
        np.maximum(view, pooled, out=view)


class Saliency:
    """|dy_r/dx| of the chosen output rows r, reduced over the image's channels per pixel:
    the max, or the L2 norm (kept as sums of squares until ``maps``)."""

    def __init__(self, rows: list[int], shape: tuple[int, ...], layout: str, reduce: str):
        if reduce not in ("max", "l2"):
            raise InputError(f"--plot-reduce {reduce!r}: choose max or l2")
        self.rows, self.layout, self.reduce = np.array(rows, int), layout, reduce
        self.channels, self.height, self.width = image_size(shape, layout)
        self.acc = np.zeros((len(rows), self.height * self.width))

    def add(self, rows: slice, cols: slice, a: np.ndarray) -> None:
        hit = np.flatnonzero((self.rows >= rows.start) & (self.rows < rows.stop))
        if not hit.size:
            return
        v = a[self.rows[hit] - rows.start]  # (hits, columns of the part)
        if self.reduce == "l2":
            v = v * v
        combine = np.maximum if self.reduce == "max" else np.add
        pixels, channels = self.height * self.width, self.channels
        if cols.start == 0 and cols.stop == channels * pixels:  # whole rows: reduce by reshaping
            v = v.reshape(len(hit), channels, pixels) if self.layout == "chw" else v.reshape(len(hit), pixels, channels)
            v = (v.max if self.reduce == "max" else v.sum)(axis=1 if self.layout == "chw" else 2)
            self.acc[hit] = combine(self.acc[hit], v)
            return
        j = np.arange(cols.start, cols.stop)
        pixel = j % pixels if self.layout == "chw" else j // channels
        for k, row in zip(hit, v):
            combine.at(self.acc[k], pixel, row)

    def maps(self) -> np.ndarray:
        """(outputs, H, W)."""
        m = np.sqrt(self.acc) if self.reduce == "l2" else self.acc
        return m.reshape(len(self.rows), self.height, self.width)


@dataclass
class View:
    """What is drawn of one sample's Jacobian of one (output, input) pair."""

    of: str
    wrt: str
    sample: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    layout: str  # of the input: chw | hwc | hw | seq | flat
    heat: Grid
    blocks: Grid | None = None  # seq inputs: (output time or index) x (input time)
    saliency: Saliency | None = None  # image inputs
    nonfinite: int = 0
    seen: int = 0  # entries pooled so far (all m·n of them once the run is over)
    outputs: list[int] = field(default_factory=list)  # flat output indices of the saliency maps

    @property
    def pooled(self) -> bool:
        return self.heat.values.shape != (prod(self.out_shape), prod(self.in_shape))

    def add(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        a = np.abs(block)
        finite = np.isfinite(a)
        if not finite.all():
            self.nonfinite += a.size - int(np.count_nonzero(finite))
            a = np.where(finite, a, 0)
        self.seen += a.size
        self.heat.add(rows, cols, a)
        if self.blocks is not None:
            self.blocks.add(rows, cols, a)
        if self.saliency is not None:
            self.saliency.add(rows, cols, a)


class PlotSink:
    """A sink (``write``/``write_part``, as ``jacobian.Sink``) that pools what ``--plot``
    draws and passes every block on to ``inner`` (set by ``wrap``).

    ``plan``: the Jacobian's plan (its ``pairs``, ``samples`` and, for saliency maps, its
    outputs ``ys``); ``samples``: how many samples to draw; ``output``: which outputs get
    a saliency map, ("top", k) or ("index", (i, ...)); ``layouts``: per input name (or ""
    for every input) an entry of LAYOUTS; ``reduce``: max or l2 over channels."""

    def __init__(self, plan, samples: int = 3, output=("top", 1), layouts: dict[str, str] | None = None,
                 reduce: str = "max", channels_last: bool = False, cells: int = CELLS):
        layouts = dict(layouts or {})
        names = {p.wrt for p in plan.pairs}
        for name in layouts:
            if name and name not in names:
                raise InputError(f"--plot-layout {name}:…: the model has no input {name!r} being differentiated "
                                 f"(there are: {', '.join(sorted(names))})")
        self.pairs = {p.key: p for p in plan.pairs[:MAX_PAIRS]}
        self.omitted = len(plan.pairs) - len(self.pairs)  # pairs passed on but not drawn
        self.inner = None
        self.samples = min(samples, plan.samples)
        self.views: dict[tuple[str, int], View] = {}
        for p in self.pairs.values():
            layout = input_layout(p.in_shape, layouts.get(p.wrt, layouts.get("", "auto")), channels_last)
            for s in range(self.samples):
                v = View(p.of, p.wrt, s, p.out_shape, p.in_shape, layout,
                         Grid(_edges(p.m, cells), _edges(p.n, cells)))
                if layout == "seq":
                    v.blocks = Grid(_aligned(p.out_shape, cells), _aligned(p.in_shape, cells))
                if layout in IMAGES:
                    y = plan.ys[p.of]
                    v.outputs = chosen_outputs(y[s] if plan.batch else y, output)
                    v.saliency = Saliency(v.outputs, p.in_shape, layout, reduce)
                self.views[p.key, s] = v

    def wrap(self, inner):
        """Chain this sink in front of ``inner``; returns itself."""
        self.inner = inner
        return self

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.write(key, s0, s1, block)
        p = self.pairs.get(key)
        for s in range(s0, min(s1, self.samples) if p else s0):
            self.views[key, s].add(slice(0, p.m), slice(0, p.n), block[s - s0].reshape(p.m, p.n))

    def write_part(self, key: str, s: int, rows: slice, cols: slice, block: np.ndarray, out_ndim: int) -> None:
        if self.inner is not None:
            self.inner.write_part(key, s, rows, cols, block, out_ndim)
        if s < self.samples and key in self.pairs:
            self.views[key, s].add(rows, cols, block)

    def ordered(self) -> list[View]:
        """Views by sample, then pair in the plan's order."""
        order = {key: j for j, key in enumerate(self.pairs)}
        return sorted(self.views.values(), key=lambda v: (v.sample, order[f"d{v.of}/d{v.wrt}"]))

    def held_bytes(self) -> int:
        """Memory the pooled views take (independent of the size of J)."""
        grids = [g for v in self.views.values() for g in (v.heat, v.blocks) if g is not None]
        return sum(g.values.nbytes for g in grids) + sum(v.saliency.acc.nbytes for v in self.views.values()
                                                         if v.saliency is not None)


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
