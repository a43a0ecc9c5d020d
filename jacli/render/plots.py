"""Pictures of results as PNG or SVG (``--plot``), drawn with matplotlib, the optional extra
``jacli[plot]``, imported only here and only when asked for. Figures are drawn on the Agg
canvas directly (no pyplot, no display, no global backend switch). Colour maps are
viridis (perceptually uniform, its lightness rising monotonically: readable in greyscale
and with colour-blind vision); point kinds differ in marker shape as well as in colour
(Okabe–Ito palette). NO_COLOR concerns terminals, not files.

Every drawing function returns a :class:`Plot`; :func:`pictures` lays plots out, one
figure each or all in one, and each :class:`Picture` records its :class:`Panel` s: what
was drawn (the arrays) and where (pixel boxes), so that tests can check the image.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from math import ceil, prod
from typing import Callable

import numpy as np

from ..errors import OutputError
from .plot_sink import IMAGES, image_size

DPI = 100
INSTALL = "pip install 'jacli[plot]'"
FORMATS = (".png", ".svg")
CMAP = "viridis"
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "image.cmap": CMAP,
         "svg.hashsalt": "jacli", "svg.fonttype": "path",
         "text.parse_math": False}  # tensor names are text, never mathtext: a "$" in one must not fail
# Okabe–Ito colours, each kind of point with its own marker too
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, GREY = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                                                      "#56B4E9", "#999999")
MARKS = {  # check diagnosis -> (marker, colour, size, label)
    "ok": ("o", BLUE, 3, "within tolerance"),
    "wrong-gradient": ("X", VERMILLION, 8, "wrong gradient"),
    "non-finite": ("D", PURPLE, 6, "non-finite"),
    "kink": ("^", ORANGE, 7, "kink (not a failure)"),
    "fd-noise": ("s", GREEN, 6, "FD noise (not a failure)"),
}


def require() -> None:
    """Import matplotlib, or raise the one-line error that names the install command."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # e.g. "created a temporary cache directory"
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise OutputError(f"--plot needs matplotlib, which is not installed; install it with: {INSTALL}") from None


@dataclass
class Panel:
    """One axes of a picture: ``kind`` (heatmap, blocks, image, saliency, spectrum,
    sigma_max, logdet, rcond, ad_fd, errors, message), the arrays drawn, and for image
    panels ``box``: (left, top, right, bottom) pixels of the drawn array in the encoded
    image (top-left origin), filled in by :func:`pictures`."""

    kind: str
    title: str
    data: dict
    ax: object = field(repr=False)
    extent: tuple[float, float, float, float] | None = None  # image panels: (x0, x1, y0, y1) in data units
    box: tuple[float, float, float, float] | None = None


@dataclass
class Plot:
    """A picture to be: ``draw(fig)`` fills a matplotlib (sub)figure of about ``size``
    inches and returns its panels."""

    name: str
    size: tuple[float, float]
    draw: Callable[[object], list[Panel]]


@dataclass
class Picture:
    name: str
    figure: object = field(repr=False)
    panels: list[Panel]  # their boxes are known once encoded

    @property
    def pixels(self) -> tuple[int, int]:
        """(width, height) of the encoded PNG."""
        w, h = self.figure.get_size_inches() * DPI
        return int(round(w)), int(round(h))

    def encode(self, suffix: str) -> bytes:
        """The picture as .png or .svg bytes; afterwards the image panels' ``box`` says
        where their arrays are in the PNG."""
        fmt = suffix.lower().lstrip(".")
        buf = io.BytesIO()
        with _style():
            self.figure.savefig(buf, format=fmt, dpi=DPI, metadata={"Software": None} if fmt == "png" else {"Date": None})
        height = self.pixels[1]
        for panel in self.panels:
            if panel.extent is not None:
                x0, x1, y0, y1 = panel.extent
                (l, b), (r, t) = panel.ax.transData.transform([(x0, y1), (x1, y0)])
                panel.box = (min(l, r), height - max(b, t), max(l, r), height - min(b, t))
        return buf.getvalue()


@contextlib.contextmanager
def _style():
    """jacli's rc settings; matplotlib's warnings (layout, empty ranges) stay off the terminal."""
    import matplotlib

    with matplotlib.rc_context(STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def pictures(plots: list[Plot], together: bool) -> list[Picture]:
    """Draw ``plots``: all in one figure, stacked (``together``), or one figure each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [plots] if together else [[p] for p in plots]
    out = []
    with _style():
        for group in groups:
            width, height = max(p.size[0] for p in group), sum(p.size[1] for p in group)
            fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
            FigureCanvasAgg(fig)
            subs = [fig] if len(group) == 1 else fig.subfigures(len(group), 1, height_ratios=[p.size[1] for p in group])
            panels = [panel for p, sub in zip(group, subs) for panel in p.draw(sub)]
            out.append(Picture(group[0].name if len(group) == 1 else "plots", fig, panels))
    return out


def file_name(name: str) -> str:
    """A plot's name as a safe file name (tensor names can hold anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "plot"


# --- compute: heatmaps, sequence blocks, saliency maps --------------------------------------
def compute_plots(views, xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], batch: bool = True,
                  reduce: str = "max") -> list[Plot]:
    """|J| heatmaps (samples x pairs), (time x time) block maps of sequence inputs, and
    for each image input and output a grid of the input image beside its saliency maps."""
    views = list(views)
    samples = sorted({v.sample for v in views})
    pairs = list(dict.fromkeys((v.of, v.wrt) for v in views))
    plots = [Plot("heatmap", (3.8 * len(pairs), 0.4 + 2.7 * len(samples)), lambda fig: _grid(fig, views, "heatmap"))]
    seq = [v for v in views if v.blocks is not None]
    if seq:
        n = len({(v.of, v.wrt) for v in seq})
        plots.append(Plot("blocks", (3.8 * n, 0.4 + 2.9 * len(samples)), lambda fig: _grid(fig, seq, "blocks")))
    for of, wrt in pairs:
        vs = [v for v in views if (v.of, v.wrt) == (of, wrt) and v.layout in IMAGES]
        if vs:
            cols = 1 + max(len(v.outputs) for v in vs)
            x, y = xs[wrt], ys[of]
            plots.append(Plot(file_name(f"saliency-{of}-{wrt}"), (2.9 * cols, 0.4 + 2.5 * len(vs)),
                              lambda fig, vs=vs, x=x, y=y: _saliency(fig, vs, x, y, batch, reduce)))
    return plots


def _grid(fig, views, kind: str) -> list[Panel]:
    samples = sorted({v.sample for v in views})
    pairs = list(dict.fromkeys((v.of, v.wrt) for v in views))
    axes = fig.subplots(len(samples), len(pairs), squeeze=False)
    panels = []
    for v in views:
        ax = axes[samples.index(v.sample), pairs.index((v.of, v.wrt))]
        grid = v.heat if kind == "heatmap" else v.blocks
        values = grid.values
        if kind == "heatmap":
            rows, cols = prod(v.out_shape), prod(v.in_shape)
            pooled = values.shape != (rows, cols)
            title = f"sample {v.sample}: |d{v.of}/d{v.wrt}|" + (" (max-pooled)" if pooled else "")
            _index_axis(ax.yaxis, v.of, v.out_shape)
            _index_axis(ax.xaxis, v.wrt, v.in_shape)
        else:
            rows = v.out_shape[0] if len(v.out_shape) >= 2 else prod(v.out_shape)
            cols = v.in_shape[0]
            pooled = values.shape != (rows, cols)
            title = f"sample {v.sample}: max |d{v.of}/d{v.wrt}| per block" + (" (max-pooled)" if pooled else "")
            ax.set_ylabel(f"{v.of} time step" if len(v.out_shape) >= 2 else f"{v.of}[i]")
            ax.set_xlabel(f"{v.wrt} time step")
        extent = (0, max(cols, 1), max(rows, 1), 0)  # (an empty Jacobian: one blank cell)
        top = float(values.max(initial=0.0))
        im = ax.imshow(values, aspect="auto", interpolation="nearest", extent=extent, vmin=0, vmax=top or 1.0)
        fig.colorbar(im, ax=ax, label="|J|")
        if v.nonfinite:
            title += f", {v.nonfinite} NaN/Inf shown as 0"
        ax.set_title(title)
        panels.append(Panel(kind, title, {"values": values, "of": v.of, "wrt": v.wrt, "sample": v.sample,
                                          "pooled": pooled}, ax, extent))
    return panels


def _index_axis(axis, name: str, shape: tuple[int, ...]) -> None:
    """Label a heatmap axis: the tensor's own index when it is 1-D per sample, else the
    flattened index with ticks at the steps of its first axis."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if len(shape) <= 1:
        axis.set_label_text(f"{name}[i]")
        size = prod(shape)
        if size <= 24:  # every index, at the middle of its cell
            every = max(1, ceil(size / 8))
            axis.set_major_locator(FixedLocator([i + 0.5 for i in range(0, size, every)]))
            axis.set_ticklabels([str(i) for i in range(0, size, every)])
        else:
            axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        return
    lead = next((a for a, d in enumerate(shape) if d > 1), len(shape) - 1)  # the first axis that steps
    inner, steps = prod(shape[lead + 1 :]), shape[lead]
    every = max(1, ceil(steps / 6))
    ticks = list(range(0, steps, every))
    axis.set_major_locator(FixedLocator([k * inner for k in ticks]))
    axis.set_ticklabels([str(k) for k in ticks])
    where = ", ".join(["0"] * lead + ["k"] + ["…"] * (len(shape) - lead - 1))
    axis.set_label_text(f"{name} ({'×'.join(map(str, shape))}) flattened; ticks: {name}[{where}]")


def _saliency(fig, views, x: np.ndarray, y: np.ndarray, batch: bool, reduce: str) -> list[Panel]:
    cols = 1 + max(len(v.outputs) for v in views)
    axes = fig.subplots(len(views), cols, squeeze=False)
    panels = []
    for row, v in enumerate(views):
        xi, yi = (x[v.sample], y[v.sample]) if batch else (x, y)
        _, h, w = image_size(v.in_shape, v.layout)
        extent = (0, w, h, 0)
        picture = _picture(xi, v.layout)
        ax = axes[row, 0]
        ax.imshow(picture, extent=extent, interpolation="nearest", cmap="gray" if picture.ndim == 2 else None)
        title = f"sample {v.sample}: input {v.wrt} ({v.layout})"
        ax.set_title(title)
        panels.append(Panel("image", title, {"values": picture, "sample": v.sample}, ax, extent))
        for j, (index, smap) in enumerate(zip(v.outputs, v.saliency.maps())):
            ax = axes[row, 1 + j]
            im = ax.imshow(smap, extent=extent, interpolation="nearest", vmin=0, vmax=float(smap.max(initial=0)) or 1.0)
            fig.colorbar(im, ax=ax, label=f"|∂y/∂x|, {'max' if reduce == 'max' else 'L2'} over channels")
            multi = np.unravel_index(index, v.out_shape) if v.out_shape else ()
            title = f"d{v.of}[{','.join(map(str, multi))}]/d{v.wrt}  ({v.of} = {float(np.ravel(yi)[index]):.3g})"
            ax.set_title(title)
            panels.append(Panel("saliency", title, {"values": smap, "sample": v.sample, "output": index}, ax, extent))
        for ax in axes[row, 1 + len(v.outputs):]:
            ax.set_axis_off()
        for ax in axes[row, : 1 + len(v.outputs)]:
            ax.set_xlabel("width")
            ax.set_ylabel("height")
    return panels


def _picture(x: np.ndarray, layout: str) -> np.ndarray:
    """An input as something imshow shows: RGB (H, W, 3) for 3 or 4 channels, else grey
    (H, W) (one channel, or the channels' mean), scaled to [0, 1]."""
    a = np.asarray(x, np.float64)
    if layout == "chw":
        a = np.moveaxis(a, 0, -1)
    elif layout == "hw":
        a = a[:, :, None]
    a = a[:, :, :3] if a.shape[2] in (3, 4) else a.mean(axis=2, keepdims=True)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    a = np.where(finite, (a - lo) / (hi - lo) if hi > lo else 0.5, 0.0)
    return a[:, :, 0] if a.shape[2] == 1 else a


# --- svd: spectra and sigma_max ---------------------------------------------------------------
def svd_plot(result, samples: int = 3) -> Plot:
    """Singular values of the first ``samples`` samples on a log scale (error bars: the
    matrix-free solver's certified bounds), each sample's condition number in its legend
    and marked as the span σ_min…σ_max; beside it, σ_max over every sample."""
    return Plot("svd", (10.0, 3.8), lambda fig: _svd(fig, result, samples))


def _svd(fig, r, samples: int) -> list[Panel]:
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    d = min(r.m, r.n)
    shown = min(samples, len(r.singular_values))
    colours = [BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY]
    markers = "os^Dvp"
    hidden = 0
    marked = False
    for i in range(shown):
        c, mk = colours[i % len(colours)], markers[i % len(markers)]
        label = f"sample {i}: κ = {_num(r.condition_number[i])}"
        series = [(np.arange(1, r.singular_values.shape[1] + 1), r.singular_values[i], _row(r.error_bound, i))]
        if r.smallest is not None:
            low = r.smallest[i]
            series.append((np.arange(d - len(low) + 1, d + 1), low, _row(r.smallest_error_bound, i)))
        for j, (idx, values, bound) in enumerate(series):
            v = np.where(values > 0, values, np.nan)
            hidden += int(np.count_nonzero(~(values > 0)))
            yerr = None if bound is None else np.vstack([np.minimum(bound, 0.999 * v), bound])
            left.errorbar(idx, v, yerr=yerr, color=c, marker=mk, ms=4, lw=1, capsize=2,
                          label=label if j == 0 else None, gid=f"spectrum-{i}-{j}")
        cond = r.condition_number[i]
        if not marked and not np.isnan(cond):
            smax = r.singular_values[i, 0]
            smin = r.smallest[i, -1] if r.smallest is not None else r.singular_values[i, -1]
            if smin > 0:
                x = d + 0.35
                left.annotate("", xy=(x, smin), xytext=(x, smax), arrowprops={"arrowstyle": "<->", "color": GREY})
                left.text(x, np.sqrt(smax * smin), f" κ={_num(cond)}", va="center", fontsize=7)
                marked = True
    left.set_yscale("log")
    left.set_xlim(0.5, d + 1.2)
    left.set_xlabel("i (largest first)")
    left.set_ylabel("σ_i")
    how = "full SVD (exact)" if r.solver == "full" else "matrix-free; error bars: certified bounds"
    title = f"singular values, J {r.m}×{r.n} per sample, {how}" + (f"; {hidden} zero values not shown" if hidden else "")
    left.set_title(title)
    left.legend(loc="best")
    smax = np.asarray(r.sigma_max, np.float64)
    finite = smax[np.isfinite(smax)]
    if finite.size:
        right.hist(finite, bins=max(1, min(30, finite.size)), color=SKY, edgecolor=BLUE)
        right.plot(finite, np.zeros_like(finite), "|", color=BLUE, ms=10, gid="sigma-max-rug")
        right.axvline(finite.max(), color=VERMILLION, ls="-", label=f"max {finite.max():.4g} (Lipschitz estimate)")
        right.axvline(float(np.median(finite)), color=GREY, ls="--", label=f"median {np.median(finite):.4g}")
        right.legend(loc="best")
    right.set_xlabel("σ_max")
    right.set_ylabel("samples")
    right.yaxis.set_major_locator(_integers())
    right.set_title(f"σ_max over {len(smax)} samples")
    return [Panel("spectrum", title, {"values": r.singular_values[:shown], "bounds": _rows(r.error_bound, shown),
                                      "condition_number": r.condition_number[:shown]}, left),
            Panel("sigma_max", f"σ_max over {len(smax)} samples", {"values": smax}, right)]


def _row(a, i):
    return None if a is None else np.asarray(a[i], np.float64)


def _rows(a, n):
    return None if a is None else np.asarray(a[:n])


# --- det --------------------------------------------------------------------------------------
def det_plot(result) -> Plot:
    """log|det J| over the batch, and rcond = σ_min/σ_max beneath it: singular samples (rank
    deficient at the model's precision, or rcond ≤ --singular-tol) and ill-conditioned ones
    (rcond ≤ √eps: at least half the digits lost) get their own marks."""
    return Plot("det", (8.0, 5.6), lambda fig: _det(fig, result))


def det_classes(r) -> dict[str, np.ndarray]:
    """Sample indices: ok, ill (ill-conditioned), singular, nan (J held NaN/Inf)."""
    logdet = np.asarray(r.logabsdet, np.float64)
    singular = np.asarray(r.singular, bool)
    nan = np.isnan(logdet) & ~singular
    ill = ~singular & ~nan & np.asarray(r.ill_conditioned, bool)
    ok = ~(singular | nan | ill)
    return {k: np.flatnonzero(v) for k, v in (("ok", ok), ("ill", ill), ("singular", singular), ("nan", nan))}


def _det(fig, r) -> list[Panel]:
    top, bottom = fig.subplots(2, 1, sharex=True)
    classes = det_classes(r)
    logdet, sign, rcond = (np.asarray(a, np.float64) for a in (r.logabsdet, r.sign, r.rcond))
    ok = classes["ok"]
    for s, fill, label in ((1, BLUE, "sign +1"), (-1, "none", "sign −1")):
        pick = ok[sign[ok] == s]
        if pick.size:
            top.plot(pick, logdet[pick], "o", color=BLUE, mfc=fill, ms=5, ls="none", label=label, gid=f"logdet-{s:+d}")
    ill = classes["ill"]
    if ill.size:
        top.plot(ill, logdet[ill], "s", color=ORANGE, ms=7, ls="none", gid="logdet-ill",
                 label=f"ill-conditioned (rcond ≤ √eps = {np.sqrt(r.unit):.2g})")
    edge = top.get_xaxis_transform()  # x in data, y in axes units: marks along the bottom edge
    rule = "rank deficient" if r.tol is None else f"rcond ≤ {r.tol:.2g}"
    for key, mk, colour, label in (("singular", "v", VERMILLION, f"singular ({rule}): log|det| = −∞"),
                                   ("nan", "X", PURPLE, "NaN/Inf in J")):
        idx = classes[key]
        if idx.size:
            top.plot(idx, np.full(idx.size, 0.03), mk, color=colour, ms=8, ls="none", transform=edge, label=label,
                     gid=f"logdet-{key}")
    top.set_ylabel("log|det J|")
    title = (f"log|det J| over {len(logdet)} samples (J {r.n}×{r.n}): {classes['singular'].size} singular, "
             f"{classes['ill'].size} ill-conditioned")
    top.set_title(title)
    top.legend(loc="best")
    positive = rcond[np.isfinite(rcond) & (rcond > 0)]
    line = r.tol if r.tol is not None else r.unit
    floor = min(float(positive.min(initial=line)), line) / 10 if line > 0 else 1e-300
    shown = np.where(np.isfinite(rcond) & (rcond > 0), rcond, floor)
    x = np.arange(len(rcond))
    bottom.plot(x, shown, "o", color=BLUE, ms=4, ls="none", gid="rcond")
    if r.tol is not None:
        bottom.axhline(r.tol, color=VERMILLION, ls="-", label="singular_tol")
    bottom.axhline(np.sqrt(r.unit), color=ORANGE, ls="--", label="√eps (ill-conditioned below)")
    bottom.set_yscale("log")
    bottom.set_ylabel("rcond = 1/κ₂")
    bottom.set_xlabel("sample")
    bottom.xaxis.set_major_locator(_integers())
    bottom.legend(loc="best")
    return [Panel("logdet", title, {"logabsdet": logdet, **classes}, top),
            Panel("rcond", "rcond", {"rcond": rcond}, bottom)]


# --- check ------------------------------------------------------------------------------------
def check_entries(result) -> tuple[list, bool]:
    """The compared entries to draw, and whether that is every checked one: the entries the
    CheckResult keeps (every one, or a uniform sample of ``check.SAMPLED``), plus every listed
    mismatch and unresolved entry and each sample's worst, without repeats."""
    seen, out = set(), []
    worst = [s.worst for s in getattr(result, "samples", []) if getattr(s, "worst", None) is not None]
    for e in [*getattr(result, "mismatches", []), *getattr(result, "unresolved", []), *worst,
              *getattr(result, "entries", [])]:
        key = (e.sample, e.of, e.wrt, tuple(e.output_index), tuple(e.input_index or ()), e.direction)
        if key not in seen:
            seen.add(key)
            out.append(e)
    checked = sum(getattr(s, "checked", 0) for s in getattr(result, "samples", []))
    return out, len(out) >= checked


def check_plot(result) -> Plot:
    """AD against FD per compared entry (or directional derivative), and |AD − FD| against
    what the tolerance allows (the band below the diagonal passes); wrong gradients,
    kinks, FD noise and dot-product (JVP vs VJP) failures each in their own mark."""
    return Plot("check", (10.0, 4.2), lambda fig: _check(fig, result))


def _check(fig, result) -> list[Panel]:
    doc = result.to_json()
    if doc.get("leakage"):
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.02, 0.5, _wrap(doc["leakage"]["message"]), va="center", fontsize=8, color=VERMILLION)
        return [Panel("message", "cross-sample leakage", {"message": doc["leakage"]["message"]}, ax)]
    entries, complete = check_entries(result)
    adjoint = list(getattr(result, "adjoint", []))
    left, right = fig.subplots(1, 2)
    counts = {}
    lo, hi = np.inf, -np.inf
    floor = min([e.allowed for e in entries if e.allowed > 0] or [1e-12]) * 1e-3
    for diagnosis, (mk, colour, ms, label) in MARKS.items():
        group = [e for e in entries if e.diagnosis == diagnosis]
        counts[diagnosis] = len(group)
        if not group:
            continue
        ad, fd = np.array([e.ad for e in group]), np.array([e.fd for e in group])
        err = np.array([e.abs_error for e in group])
        allowed = np.array([e.allowed for e in group])
        lo, hi = min(lo, np.nanmin([fd.min(), ad.min()])), max(hi, np.nanmax([fd.max(), ad.max()]))
        style = {"color": colour, "ms": ms, "ls": "none", "mfc": "none" if diagnosis == "fd-noise" else colour}
        left.plot(fd, ad, mk, label=f"{label} ({len(group)})", gid=f"ad-fd-{diagnosis}", **style)
        right.plot(np.maximum(allowed, floor), np.where(np.isfinite(err), np.maximum(err, floor), np.nan), mk,
                   gid=f"error-{diagnosis}", **style)
    if adjoint:
        jv, vj = np.array([a.jvp for a in adjoint]), np.array([a.vjp for a in adjoint])
        lo, hi = min(lo, jv.min(), vj.min()), max(hi, jv.max(), vj.max())
        left.plot(vj, jv, "P", color=SKY, ms=7, ls="none", gid="ad-fd-adjoint",
                  label=f"<Jt, c> by JVP vs <t, Jᵀc> by VJP, failed ({len(adjoint)})")
        right.plot(np.maximum([a.allowed for a in adjoint], floor), np.maximum([a.abs_error for a in adjoint], floor),
                   "P", color=SKY, ms=7, ls="none", gid="error-adjoint")
    counts["adjoint"] = len(adjoint)
    if np.isfinite(lo):
        pad = 0.05 * (hi - lo or 1.0)
        left.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color=GREY, lw=0.8, zorder=0)
    left.set_xlabel("FD (Richardson-extrapolated central differences)")
    left.set_ylabel("AD")
    shown = "every compared entry" if complete else (
        f"{len(entries)} of {doc['checked']}: a uniform sample, every listed mismatch, each sample's worst")
    left.set_title(f"AD against FD, {shown}")
    left.legend(loc="best")
    right.set_xscale("log")
    right.set_yscale("log")
    a, b = _log_span([line.get_xydata() for line in right.get_lines()])
    right.fill_between([a, b], [a, b], a, color=SKY, alpha=0.2, lw=0, label="passes: |AD − FD| ≤ allowed")
    right.plot([a, b], [a, b], color=GREY, lw=0.8)
    right.set_xlim(a, b)
    right.set_ylim(a, b)
    right.set_xlabel("allowed = atol + rtol·|FD| + FD error estimate")
    right.set_ylabel("|AD − FD|")
    verdict = "PASSED" if doc["passed"] else "FAILED"
    title = (f"{verdict}: {doc['checked']} checked, {doc['failures']} wrong, {doc['kinks']} kinks, "
             f"{doc['fd_noise']} FD noise (rtol {doc['rtol']:g})")
    right.set_title(title)
    right.legend(loc="lower right")
    data = {"counts": counts, "complete": complete, "entries": len(entries)}
    return [Panel("ad_fd", left.get_title(), data, left), Panel("errors", title, data, right)]


def _log_span(arrays) -> tuple[float, float]:
    """A common range for log axes showing every positive finite value, with a margin."""
    v = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return 1e-3, 1.0
    return float(v.min()) / 3, float(v.max()) * 3


def _integers():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _num(v) -> str:
    v = float(v)
    if np.isnan(v):
        return "unknown (--smallest gives it)"
    return "∞" if np.isinf(v) else f"{v:.4g}"
