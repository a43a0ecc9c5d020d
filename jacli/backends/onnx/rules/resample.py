"""Resampling: Resize and Upsample, GridSample and AffineGrid, DepthToSpace, SpaceToDepth,
CenterCropPad.

All of them are linear in their data input X, so the JVP is the operator itself applied to
the tangent (with a zero extrapolation value) and the VJP is its transpose. The transposes
are built from the operator itself, so they match onnxruntime's kernel exactly whatever the
mode (nearest/linear/cubic, every coordinate transformation and nearest mode, cubic_coeff_a,
exclude_outside, antialias, padding modes):

* Resize/Upsample are separable: the output is X with a 1-D interpolation matrix W_a applied
  along each resized axis a. W_a^T (n_a x m_a) is the same Resize applied to the identity
  matrix (the basis along axis 0, left as it is by scale 1), and the VJP applies W_a^T along
  each axis in turn with MatMul; axes statically left as they are (scale 1) are skipped.
* GridSample is not separable: the VJP uses the matrix M_n (output positions x input
  positions, per sample) given by sampling the basis images, one per input position, so it
  costs O((H W)^2) per sample. W.r.t. the grid (linear or nearest with every padding,
  cubic with zeros padding) the interpolation weights' slopes are formed the same way.
  AffineGrid is linear in theta: its base coordinates come from the op itself.
* DepthToSpace/SpaceToDepth/CenterCropPad move elements: the VJP is the inverse movement.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..graph import Builder, Dim, Node
from .registry import jvp, vjp


def _set_attr(b: Builder, name: str, value) -> None:
    """Set attribute ``name`` of the node emitted last (replacing it)."""
    node = b.nodes[-1]
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _eye(b: Builder, size: Dim, dtype: int) -> str:
    if isinstance(size, int):
        return b.const(np.eye(size), dtype)
    zeros = b.op("ConstantOfShape", b.ivec([size, size]), value=helper.make_tensor("value", dtype, [1], [0.0]))
    return b.op("EyeLike", zeros)


# --- Resize / Upsample ------------------------------------------------------------------
class _Resize:
    """The per-axis view of a Resize (opset >= 10) or Upsample node."""

    def __init__(self, b: Builder, n: Node):
        self.b, self.n = b, n
        self.rank = b.rank(n.x, n)
        if n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise n.unsupported(f"with keep_aspect_ratio_policy='{n.attr('keep_aspect_ratio_policy')}' "
                                "has no derivative rule in jacli (only 'stretch')")
        self.crop = n.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
        axes = n.attr("axes")
        self.axes = [a % self.rank for a in axes] if axes else list(range(self.rank))
        if n.op_type == "Upsample":
            self.roi, self.sizes = None, None
            self.scales = n.input(1) if "scales" not in n.attrs else None
            self.const_scales = (np.array(n.attr("scales"), np.float32) if "scales" in n.attrs else n.const(1))
        else:
            self.roi, self.scales, self.sizes = n.input(1), n.input(2), n.input(3)
            self.const_scales = n.const(2) if self.scales else None
            if self.sizes or (self.const_scales is not None and self.const_scales.size == 0):
                self.scales, self.const_scales = None, None  # sizes rule (scales '' or empty before 13)
        self.const_sizes = n.const(3) if self.sizes else None
        self.const_roi = n.const(1) if self.roi else None

    def moved(self) -> list[int]:
        """Axes the node may change: all but those statically kept as they are."""
        out = []
        dims = self.b.dims(self.n.x)
        for k, a in enumerate(self.axes):
            if self.crop and (self.const_roi is None
                              or (self.const_roi[k], self.const_roi[len(self.axes) + k]) != (0, 1)):
                out.append(a)
            elif self.const_scales is not None:
                if float(self.const_scales[k]) != 1.0:
                    out.append(a)
            elif self.const_sizes is not None and dims is not None and isinstance(dims[a], int):
                if int(self.const_sizes[k]) != dims[a]:
                    out.append(a)
            else:
                out.append(a)
        return out

    def _entry(self, tensor: str, const, index: int) -> str:
        """Entry ``index`` of a 1-D input as a 1-element tensor (folded when constant)."""
        b = self.b
        if const is not None:
            return b.const(np.asarray(const).ravel()[index:index + 1])
        return b.op("Slice", tensor, b.ints([index]), b.ints([index + 1]))

    def transposed_weights(self, a: int) -> str:
        """W_a^T, (n_a, m_a): the node's Resize of the identity along axis 1, scale 1 on axis 0."""
        b, n = self.b, self.n
        k, count = self.axes.index(a), len(self.axes)
        size = b.dim(n.x, a)
        eye = _eye(b, size, n.dtype)
        one = b.const(np.ones(1, np.float32))
        if n.op_type == "Upsample":
            if self.scales is None:  # Upsample-7: scales attribute
                out = b.same(n, eye)
                _set_attr(b, "scales", [1.0, float(self.const_scales[k])])
                return out
            return b.same(n, eye, b.op("Concat", one, self._entry(self.scales, self.const_scales, k), axis=0))
        empty = b.const(np.zeros(0, np.float32)) if b.opset < 13 else ""  # required inputs before 13
        roi = empty
        if self.crop:
            rtype = b.info.types.get(self.roi, TensorProto.FLOAT)
            roi = b.op("Concat", b.const(np.zeros(1), rtype), self._entry(self.roi, self.const_roi, k),
                       b.const(np.ones(1), rtype), self._entry(self.roi, self.const_roi, count + k), axis=0)
        if self.scales:
            scales = b.op("Concat", one, self._entry(self.scales, self.const_scales, k), axis=0)
            out = b.same(n, eye, roi, scales)
        else:
            out = b.same(n, eye, roi, empty, b.ivec([size, b.dim(n.y, a)]))
        _set_attr(b, "axes", None)
        _set_attr(b, "keep_aspect_ratio_policy", None)
        if self.crop:
            _set_attr(b, "extrapolation_value", 0.0)
        return out


def _along(b: Builder, v: str, m: str, axis: int, rank: int) -> str:
    """v with the matrix m (k, l) applied along ``axis`` (of size l), giving size k there."""
    if axis == rank - 2:
        return b.op("MatMul", m, v)
    mt = b.op("Transpose", m, perm=[1, 0])
    if axis == rank - 1:
        return b.op("MatMul", v, mt)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return b.op("Transpose", b.op("MatMul", b.op("Transpose", v, perm=perm), mt), perm=perm)


@vjp("Resize", "Upsample", inputs=(0,))
def _vjp_resize(b, n, gs):
    r = _Resize(b, n)
    g = gs[0]
    for a in r.moved():
        g = _along(b, g, r.transposed_weights(a), a, r.rank)
    return {0: g}


@jvp("Resize", "Upsample", inputs=(0,))
def _jvp_resize(b, n, ts):
    out = b.same(n, ts[0], *n.inputs[1:])
    if n.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        _set_attr(b, "extrapolation_value", 0.0)  # extrapolated outputs are constants
    return [out]


# --- GridSample -------------------------------------------------------------------------
@vjp("GridSample", inputs=(0,))
def _vjp_grid_sample(b, n, gs):
    x, grid = n.inputs[:2]
    rank = b.rank(x, n)
    spatial = [b.dim(x, i) for i in range(2, rank)]
    if not all(isinstance(s, int) for s in spatial):
        raise n.unsupported("needs static spatial dimensions of its input")
    size = int(np.prod(spatial))
    basis = b.op("Reshape", b.const(np.eye(size), n.dtype), b.ints([1, size, *spatial]))
    basis = b.op("Expand", basis, b.ivec([b.dim(x, 0), size, *spatial]))
    m = b.op("Reshape", b.same(n, basis, grid), b.ints([0, 0, -1]))  # (N, input pos., output pos.)
    gx = b.op("MatMul", b.op("Reshape", gs[0], b.ints([0, 0, -1])), b.op("Transpose", m, perm=[0, 2, 1]))
    return {0: b.reshape_like(gx, x)}


@jvp("GridSample", inputs=(0,))
def _jvp_grid_sample(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1])]


# GridSample w.r.t. the grid, linear (2-D or volumetric) with any padding, or cubic with zeros
# padding (the cubic kernel and its derivative in place of the tent's): with (ix, iy) the
# grid in pixel units, out = sum_k X_k wx_k wy_k (wz_k), wx_k = max(0, 1 - |ix - x_k|); d wx_k / d ix
# is +1 at x_k = floor(ix) + 1 and -1 at floor(ix) (torch's convention at integers). Border
# padding clamps ix first (derivative 0 outside, as torch); reflection folds it first. Like the rule for X, it forms
# the (output x input positions) weights, O((H W)^2) per sample. Nearest: zero derivative.
class _GridWeights:
    def __init__(self, b: Builder, n: Node):
        self.b, self.n = b, n
        mode, padding = n.attr("mode", "bilinear"), n.attr("padding_mode", "zeros")
        self.cubic = mode in ("bicubic", "cubic")
        if self.cubic and padding != "zeros":
            raise n.unsupported(f"has no derivative rule with respect to its grid with mode='{mode}' and "
                                f"padding_mode='{padding}' (cubic: zeros padding only)")
        self.nearest = mode == "nearest"
        spatial = [b.dim(n.x, i) for i in range(2, b.rank(n.x, n))]
        if not all(isinstance(d, int) for d in spatial):
            raise n.unsupported("needs static spatial dimensions of its input")
        self.sizes = spatial[::-1]  # grid coordinate c runs along spatial axis -1 - c (x: width)
        self.padding = padding
        self.flat_grid = b.op("Reshape", n.inputs[1], b.ints([0, -1, len(spatial)]))  # (N, P, k)

    def pixels(self, axis: int, size: int) -> tuple[str, str]:
        """Grid coordinate ``axis`` (0: x, 1: y, 2: z) in pixels, (N, P, 1), and d pixel / d grid."""
        b, n = self.b, self.n
        g = b.op("Slice", self.flat_grid, b.ints([axis]), b.ints([axis + 1]), b.ints([2]))
        if n.attr("align_corners", 0):
            scale, shift = (size - 1) / 2.0, (size - 1) / 2.0
        else:
            scale, shift = size / 2.0, (size - 1) / 2.0
        p = b.op("Add", b.op("Mul", g, b.scalar(scale, n.dtype)), b.scalar(shift, n.dtype))
        d = b.scalar(scale, n.dtype)
        if self.padding == "reflection":
            p, d = self._reflect(p, d, size)
        if self.padding != "zeros":
            lo, hi = b.scalar(0.0, n.dtype), b.scalar(size - 1.0, n.dtype)
            inside = b.op("And", b.op("Not", b.op("Less", p, lo)), b.op("Not", b.op("Greater", p, hi)))
            d = b.op("Mul", b.op("Cast", inside, to=n.dtype), d)
            p = b.op("Max", b.op("Min", p, hi), lo)
        return p, d

    def _reflect(self, p: str, d, size: int) -> tuple[str, str]:
        """Reflection about the borders (pixel centres with align_corners, else the image's
        edges, then clamped as border): |p - lo| folded by fmod into [0, span], the slope's
        sign flipping with the side and with every other fold (torch's reflect_coordinates)."""
        b, n = self.b, self.n
        lo, span = (0.0, size - 1.0) if n.attr("align_corners", 0) else (-0.5, float(size))
        if span <= 0:
            return b.op("Mul", p, b.scalar(0.0, n.dtype)), b.op("Mul", p, b.scalar(0.0, n.dtype))
        c = lambda v: b.scalar(v, n.dtype)  # noqa: E731
        shifted = b.op("Sub", p, c(lo))
        dist = b.op("Abs", shifted)
        extra = b.op("Mod", dist, c(span), fmod=1)
        flips = b.op("Floor", b.op("Div", dist, c(span)))
        odd = b.op("Mod", flips, c(2.0), fmod=1)  # 1 where the fold count is odd
        even = b.op("Sub", c(1.0), odd)
        folded = b.op("Add", b.op("Add", b.op("Mul", even, extra), b.op("Mul", odd, b.op("Sub", c(span), extra))),
                      c(lo))
        side = b.op("Sub", c(1.0), b.op("Mul", c(2.0), b.op("Cast", b.op("Less", shifted, c(0.0)), to=n.dtype)))
        return folded, b.op("Mul", d, b.op("Mul", side, b.op("Sub", even, odd)))

    def _cubic(self, t: str) -> tuple[str, str]:
        """Keys' cubic kernel (A = -0.75) of t = pixel - tap and its derivative d/dt (C1:
        no convention needed): |t| <= 1: (A+2)|t|^3 - (A+3)t^2 + 1; 1 < |t| < 2:
        A|t|^3 - 5A t^2 + 8A|t| - 4A; 0 beyond."""
        b, n = self.b, self.n
        a = -0.75
        c = lambda v: b.scalar(v, n.dtype)  # noqa: E731
        u = b.op("Abs", t)
        u2 = b.op("Mul", u, u)
        near = b.op("Cast", b.op("Not", b.op("Greater", u, c(1.0))), to=n.dtype)
        far = b.op("Mul", b.op("Cast", b.op("Less", u, c(2.0)), to=n.dtype), b.op("Sub", c(1.0), near))
        w_near = b.op("Add", b.op("Mul", u2, b.op("Sub", b.op("Mul", u, c(a + 2)), c(a + 3))), c(1.0))
        w_far = b.op("Mul", b.op("Add", b.op("Mul", u, b.op("Sub", b.op("Mul", u, c(a)), c(5 * a))), c(8 * a)), u)
        w_far = b.op("Sub", w_far, c(4 * a))
        d_near = b.op("Mul", u, b.op("Sub", b.op("Mul", u, c(3 * (a + 2))), c(2 * (a + 3))))
        d_far = b.op("Add", b.op("Mul", u, b.op("Sub", b.op("Mul", u, c(3 * a)), c(10 * a))), c(8 * a))
        weight = b.op("Add", b.op("Mul", near, w_near), b.op("Mul", far, w_far))
        slope = b.op("Mul", b.op("Sign", t), b.op("Add", b.op("Mul", near, d_near), b.op("Mul", far, d_far)))
        return weight, slope

    def sensitivities(self) -> list[tuple[str, str]]:
        """Per grid coordinate: d out / d pixel (N, C, P) and d pixel / d grid."""
        b, n = self.b, self.n
        ks, stride = np.arange(int(np.prod(self.sizes))), 1
        one = b.scalar(1.0, n.dtype)
        weights, slopes, scales = [], [], []
        for axis, size in enumerate(self.sizes):  # the input position k's pixel along each coordinate
            at = b.const(((ks // stride) % size).reshape(1, 1, -1).astype(np.float64), n.dtype)
            stride *= size
            p, d = self.pixels(axis, size)
            if self.cubic:
                w, slope = self._cubic(b.op("Sub", p, at))
                weights.append(w)
                slopes.append(slope)
            else:
                weights.append(b.op("Relu", b.op("Sub", one, b.op("Abs", b.op("Sub", p, at)))))
                fl = b.op("Floor", p)
                slopes.append(b.op("Sub", b.op("Cast", b.op("Equal", at, b.op("Add", fl, one)), to=n.dtype),
                                   b.op("Cast", b.op("Equal", at, fl), to=n.dtype)))
            scales.append(d)
        xs = b.op("Reshape", n.x, b.ints([0, 0, -1]))  # (N, C, K)
        out = []
        for axis, d in enumerate(scales):
            factors = [slopes[i] if i == axis else weights[i] for i in range(len(scales))]
            a = factors[0] if len(factors) == 1 else b.op("Mul", *factors[:2])
            for f in factors[2:]:
                a = b.op("Mul", a, f)
            out.append((b.op("MatMul", xs, b.op("Transpose", a, perm=[0, 2, 1])), d))  # (N, C, P)
        return out


@vjp("GridSample", inputs=(1,))
def _vjp_grid_sample_grid(b, n, gs):
    gw = _GridWeights(b, n)
    if gw.nearest:
        return {1: b.zeros_like(n.inputs[1], n.dtype)}
    g = b.op("Reshape", gs[0], b.ints([0, 0, -1]))  # (N, C, P)
    parts = [b.op("Mul", b.op("Transpose", b.reduce("ReduceSum", b.op("Mul", g, s), [1]), perm=[0, 2, 1]), d)
             for s, d in gw.sensitivities()]  # (N, P, 1) each
    return {1: b.reshape_like(b.op("Concat", *parts, axis=2), n.inputs[1])}


@jvp("GridSample", inputs=(1,))
def _jvp_grid_sample_grid(b, n, ts):
    gw = _GridWeights(b, n)
    if gw.nearest:
        return [b.zeros_like(n.y, n.dtype)]
    t = b.op("Reshape", ts[1], b.ints([0, -1, len(gw.sizes)]))
    terms = []
    for axis, (s, d) in enumerate(gw.sensitivities()):
        ti = b.op("Mul", b.op("Slice", t, b.ints([axis]), b.ints([axis + 1]), b.ints([2])), d)  # (N, P, 1)
        terms.append(b.op("Mul", s, b.op("Transpose", ti, perm=[0, 2, 1])))
    return [b.reshape_like(b.add(*terms), n.y)]


# --- AffineGrid: grid[n, p] = theta[n] (x_p, y_p[, z_p], 1): linear in theta ------------------
@vjp("AffineGrid", inputs=(0,))
def _vjp_affine_grid(b, n, gs):
    """g_theta[n, i, j] = sum_p g[n, p, i] base[p, j]; the base coordinates (x_p, y_p, 1) are
    the op's grids for the thetas selecting one coordinate each (theta_j[0, j] = 1)."""
    theta = n.inputs[0]
    rows, cols = (b.dim(theta, 1), b.dim(theta, 2))
    if not (isinstance(rows, int) and isinstance(cols, int)):
        raise n.unsupported("needs a static theta shape")
    selectors = np.zeros((cols, rows, cols))
    selectors[np.arange(cols), 0, np.arange(cols)] = 1.0
    size = b.op("Concat", b.ints([cols]), b.op("Slice", n.inputs[1], b.ints([1]), b.ints([2**62])), axis=0)
    base = b.same(n, b.const(selectors, n.dtype), size)  # (cols, *spatial, rows)
    base = b.op("Reshape", b.op("Slice", base, b.ints([0]), b.ints([1]), b.ints([-1])), b.ints([cols, -1]))
    g = b.op("Reshape", gs[0], b.ints([0, -1, rows]))  # (N, P, rows)
    return {0: b.op("Einsum", g, base, equation="npi,jp->nij")}


@jvp("AffineGrid", inputs=(0,))
def _jvp_affine_grid(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1])]


# --- DepthToSpace / SpaceToDepth: permutations ----------------------------------------------
def _block_permutation(b: Builder, n: Node) -> tuple[list, list[int]]:
    """The op as Reshape(x, shape6) -> Transpose(perm) -> Reshape (ONNX's definitions)."""
    bs = n.attr("blocksize")
    if b.rank(n.x, n) != 4:
        raise n.unsupported("needs a 4-D input")
    batch, c, h, w = (b.dim(n.x, i) for i in range(4))
    mode = n.attr("mode", "DCR")
    if n.op_type == "DepthToSpace":
        c2 = b.idiv(c, bs * bs)
        if mode == "DCR":
            return [batch, bs, bs, c2, h, w], [0, 3, 4, 1, 5, 2]
        return [batch, c2, bs, bs, h, w], [0, 1, 4, 2, 5, 3]
    h2, w2 = b.idiv(h, bs), b.idiv(w, bs)
    if mode == "CRD":
        return [batch, c, h2, bs, w2, bs], [0, 1, 3, 5, 2, 4]
    return [batch, c, h2, bs, w2, bs], [0, 3, 5, 1, 2, 4]


@vjp("DepthToSpace", "SpaceToDepth", inputs=(0,))
def _vjp_block_permutation(b, n, gs):
    shape6, perm = _block_permutation(b, n)
    permuted = b.op("Reshape", gs[0], b.ivec([shape6[p] for p in perm]))
    return {0: b.reshape_like(b.op("Transpose", permuted, perm=[int(i) for i in np.argsort(perm)]), n.x)}


@jvp("DepthToSpace", "SpaceToDepth", "CenterCropPad", inputs=(0,))
def _jvp_data_movement(b, n, ts):
    return [b.same(n, ts[0], *n.inputs[1:])]


# --- CenterCropPad: crop or zero-pad each axis about its centre ----------------------------------
@vjp("CenterCropPad", inputs=(0,))
def _vjp_center_crop_pad(b, n, gs):
    """The transpose crops where the op padded and pads where it cropped, by the same
    amounts: the op itself, back to x's sizes on the same axes."""
    rank = b.rank(n.x, n)
    axes = [a % rank for a in (n.attr("axes") or range(rank))]
    return {0: b.same(n, gs[0], b.ivec([b.dim(n.x, a) for a in axes]))}
