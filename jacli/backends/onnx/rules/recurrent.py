"""Recurrent networks: LSTM, GRU and RNN, decomposed exactly into the operators they are
made of, unrolled over their (static) time steps: one MatMul for the input projection of
every step, then per step the recurrent MatMul, the gates and their activations. The
drivers differentiate the result like any other graph, so every input (X, W, R, B,
initial_h, initial_c, P) is covered in both modes, for every direction, ``layout``,
``sequence_lens`` (a step past a sequence's length keeps the state and outputs zeros, as
onnxruntime does), ``clip``, ``input_forget``, ``linear_before_reset`` and every activation
with its ``activation_alpha``/``activation_beta``.
"""
from __future__ import annotations

import numpy as np

from ..graph import Builder, Node
from .registry import _c, decompose

# activation -> (number of alpha values, number of beta values) it takes, and their
# defaults; activation_alpha/activation_beta are consumed in order by those that take them
_ACTIVATIONS = {
    "relu": (0, 0, None, None), "tanh": (0, 0, None, None), "sigmoid": (0, 0, None, None),
    "affine": (1, 1, 1.0, 0.0), "leakyrelu": (1, 0, 0.01, None), "thresholdedrelu": (1, 0, 1.0, None),
    "scaledtanh": (1, 1, 1.0, 1.0), "hardsigmoid": (1, 1, 0.2, 0.5), "elu": (1, 0, 1.0, None),
    "softsign": (0, 0, None, None), "softplus": (0, 0, None, None),
}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _activations(n: Node, directions: int) -> list[list]:
    """Per direction, the activation functions as (name, alpha, beta)."""
    per = len(_DEFAULT_ACTIVATIONS[n.op_type])
    names = list(n.attr("activations") or _DEFAULT_ACTIVATIONS[n.op_type] * directions)
    names = [a.decode() if isinstance(a, bytes) else a for a in names]
    if len(names) == per and directions == 2:
        names = names * 2
    alphas, betas = list(n.attr("activation_alpha") or []), list(n.attr("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise n.unsupported(f"uses the activation '{name}', which jacli does not know")
        n_alpha, n_beta, alpha, beta = _ACTIVATIONS[key]
        if n_alpha and alphas:
            alpha = alphas.pop(0)
        if n_beta and betas:
            beta = betas.pop(0)
        out.append((key, alpha, beta))
    return [out[d * per:(d + 1) * per] for d in range(directions)]


def _act(b: Builder, n: Node, fn: tuple, v: str) -> str:
    name, alpha, beta = fn
    if name in ("relu", "tanh", "sigmoid", "softsign", "softplus"):
        return b.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                     "softplus": "Softplus"}[name], v)
    if name == "affine":
        return b.op("Add", b.op("Mul", v, _c(b, n, alpha)), _c(b, n, beta))
    if name == "leakyrelu":
        return b.op("LeakyRelu", v, alpha=float(alpha))
    if name == "thresholdedrelu":
        return b.op("Mul", v, b.op("Cast", b.op("Greater", v, _c(b, n, alpha)), to=n.dtype))
    if name == "scaledtanh":
        return b.op("Mul", b.op("Tanh", b.op("Mul", v, _c(b, n, beta))), _c(b, n, alpha))
    if name == "hardsigmoid":
        return b.op("HardSigmoid", v, alpha=float(alpha), beta=float(beta))
    return b.op("Elu", v, alpha=float(alpha))


def _split(b: Builder, x: str, parts: int, axis: int) -> list[str]:
    """``x`` cut into ``parts`` equal pieces along ``axis``."""
    if parts == 1:
        return [x]
    if b.opset >= 13:
        size = b.dims(x)[axis] if b.dims(x) and isinstance(b.dims(x)[axis], int) else None
        if size is None:
            raise AssertionError("split of a dynamic axis")
        return b.op("Split", x, b.ints([size // parts] * parts), axis=axis, n_out=parts)
    return b.op("Split", x, axis=axis, split=[b.dims(x)[axis] // parts] * parts, n_out=parts)


class _Tensors:
    """Shapes of the tensors the decomposition creates, known statically from the node's
    attributes (shape inference runs on the rewritten graph only afterwards)."""

    def __init__(self, b: Builder):
        self.b = b

    def op(self, dims, op_type, *inputs, **attrs):
        name = self.b.op(op_type, *inputs, **attrs)
        self.b.info.dims[name] = list(dims)
        return name


def _per_direction(b: Builder, t: _Tensors, v: str | None, dims: list, directions: int) -> list:
    """A [num_directions, ...] tensor as one tensor per direction (None stays None)."""
    if v is None:
        return [None] * directions
    if directions == 1:
        return [t.op(dims[1:], "Squeeze", v, b.ints([0])) if b.opset >= 13 else
                t.op(dims[1:], "Squeeze", v, axes=[0])]
    b.info.dims.setdefault(v, list(dims))
    parts = _split(b, v, directions, 0)
    return [t.op(dims[1:], "Squeeze", p, b.ints([0])) if b.opset >= 13 else t.op(dims[1:], "Squeeze", p, axes=[0])
            for p in parts]


def _unsqueeze(b: Builder, t: _Tensors, v: str, dims: list, axis: int) -> str:
    new = list(dims)
    new.insert(axis, 1)
    if b.opset >= 13:
        return t.op(new, "Unsqueeze", v, b.ints([axis]))
    return t.op(new, "Unsqueeze", v, axes=[axis])


@decompose("LSTM", inputs=(0, 1, 2, 3, 5, 6, 7))
@decompose("GRU", "RNN", inputs=(0, 1, 2, 3, 5))
def _expand_recurrent(b: Builder, n: Node) -> list:
    kind, layout = n.op_type, n.attr("layout", 0)
    gates, hidden = _GATES[kind], n.attr("hidden_size")
    direction = n.attr("direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    x_dims = b.dims(n.x)
    if x_dims is None or len(x_dims) != 3:
        raise n.unsupported("needs the rank of its input X, which shape inference could not determine")
    steps, batch, features = (x_dims[1], x_dims[0], x_dims[2]) if layout else (x_dims[0], x_dims[1], x_dims[2])
    if not isinstance(steps, int):
        raise n.unsupported("has a sequence length known only at run time (jacli unrolls recurrent networks "
                            "over a static number of steps); export the model with a fixed sequence length")
    if not isinstance(features, int):  # X's last axis unknown to shape inference: W holds it too
        w_dims = b.dims(n.input(1))
        features = w_dims[2] if w_dims is not None and len(w_dims) == 3 else None
    if hidden is None or not isinstance(features, int):
        raise n.unsupported("needs a static hidden_size and input size")
    t = _Tensors(b)
    batch_dim = b.dim(n.x, 0 if layout else 1)
    x = t.op([steps, batch, features], "Transpose", n.x, perm=[1, 0, 2]) if layout else n.x
    state_dims = [directions, batch, hidden]

    def states(i):
        v = n.input(i)
        if v is not None and layout:
            v = t.op(state_dims, "Transpose", v, perm=[1, 0, 2])
        return _per_direction(b, t, v, state_dims, directions)

    ws = _per_direction(b, t, n.inputs[1], [directions, gates * hidden, features], directions)
    rs = _per_direction(b, t, n.inputs[2], [directions, gates * hidden, hidden], directions)
    bs = _per_direction(b, t, n.input(3), [directions, 2 * gates * hidden], directions)
    h0s = states(5)
    c0s = states(6) if kind == "LSTM" else [None] * directions
    ps = _per_direction(b, t, n.input(7), [directions, 3 * hidden], directions) if kind == "LSTM" else [None] * 2
    acts = _activations(n, directions)
    masks = _masks(b, t, n, steps, batch) if n.input(4) is not None else None
    zeros = b.op("ConstantOfShape", b.ivec([batch_dim, hidden]), value=_zero(n))
    b.info.dims[zeros] = [batch, hidden]
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = direction == "reverse" or d == 1
        cell = _Cell(b, t, n, kind, hidden, batch, features, ws[d], rs[d], bs[d], ps[d], acts[d])
        projected = cell.project(x, steps)
        h = h0s[d] if h0s[d] is not None else zeros
        c = c0s[d] if c0s[d] is not None else zeros
        outs = [None] * steps
        for step in (reversed(range(steps)) if reverse else range(steps)):
            h_new, c_new = cell.step(projected[step], h, c)
            if masks is None:
                h, c, outs[step] = h_new, c_new, h_new
            else:
                m = masks[step]
                h, outs[step] = _keep(b, t, n, m, h_new, h, [batch, hidden]), t.op([batch, hidden], "Mul", h_new, m)
                if c_new is not None:
                    c = _keep(b, t, n, m, c_new, c, [batch, hidden])
        ys.append(t.op([steps, 1, batch, hidden], "Concat",
                       *[_unsqueeze(b, t, _unsqueeze(b, t, o, [batch, hidden], 0), [1, batch, hidden], 1)
                         for o in outs], axis=0))
        hs.append(_unsqueeze(b, t, h, [batch, hidden], 0))
        if kind == "LSTM":
            cs.append(_unsqueeze(b, t, c, [batch, hidden], 0))
    y = ys[0] if directions == 1 else t.op([steps, 2, batch, hidden], "Concat", *ys, axis=1)
    y_h = hs[0] if directions == 1 else t.op(state_dims, "Concat", *hs, axis=0)
    y_c = None if not cs else cs[0] if directions == 1 else t.op(state_dims, "Concat", *cs, axis=0)
    if layout:
        y = b.op("Transpose", y, perm=[2, 0, 1, 3])
        y_h = b.op("Transpose", y_h, perm=[1, 0, 2])
        y_c = y_c and b.op("Transpose", y_c, perm=[1, 0, 2])
    return [y, y_h, y_c][:len(n.outputs)]


def _zero(n: Node):
    from onnx import helper

    return helper.make_tensor("value", n.dtype, [1], [0.0])


def _masks(b: Builder, t: _Tensors, n: Node, steps: int, batch) -> list[str]:
    """Per step, [batch, 1] with 1 where the step is within the sequence's length."""
    lens = n.inputs[4]
    dtype = b.info.types.get(lens, 6)
    out = []
    for step in range(steps):
        inside = b.op("Less", b.const(np.array(step), dtype), lens)
        out.append(_unsqueeze(b, t, t.op([batch], "Cast", inside, to=n.dtype), [batch], 1))
    return out


def _keep(b: Builder, t: _Tensors, n: Node, m: str, new: str, old: str, dims: list) -> str:
    """new where the mask m is 1, old where it is 0 (exact for finite values)."""
    return t.op(dims, "Add", old, t.op(dims, "Mul", t.op(dims, "Sub", new, old), m))


class _Cell:
    """One direction's weights and the equations of one time step (ONNX's operator docs)."""

    def __init__(self, b, t, n, kind, hidden, batch, features, w, r, bias, peep, acts):
        self.b, self.t, self.n, self.kind, self.hidden, self.batch, self.acts = b, t, n, kind, hidden, batch, acts
        g = _GATES[kind] * hidden
        self.wt = t.op([features, g], "Transpose", w, perm=[1, 0])
        self.clip = n.attr("clip")
        lbr = kind == "GRU" and n.attr("linear_before_reset", 0)
        rt = t.op([hidden, g], "Transpose", r, perm=[1, 0])
        if kind == "GRU":  # R's last block multiplies (r * H) (or is added after the reset)
            self.rt, self.rt_h = _cut(b, t, rt, [2 * hidden, hidden], [hidden], 1)
        else:
            self.rt = rt
        self.wb = self.rb = self.rb_h = None
        if bias is not None:
            wb, rb = _cut(b, t, bias, [g, g], [], 0)
            if kind == "GRU":
                rb_zr, rb_h = _cut(b, t, rb, [2 * hidden, hidden], [], 0)
                if lbr:
                    self.wb, self.rb, self.rb_h = wb, rb_zr, rb_h
                else:
                    self.wb, self.rb = t.op([g], "Add", wb, rb), None
            else:
                self.wb = t.op([g], "Add", wb, rb)
        self.lbr = lbr
        self.peep = _cut(b, t, peep, [hidden] * 3, [], 0) if peep is not None else None

    def project(self, x: str, steps: int) -> list[str]:
        """x W^T (+ the biases that do not wait for the reset gate), one [batch, G] per step."""
        b, t = self.b, self.t
        g = _GATES[self.kind] * self.hidden
        xw = t.op([steps, self.batch, g], "MatMul", x, self.wt)
        if self.wb is not None:
            xw = t.op([steps, self.batch, g], "Add", xw, self.wb)
        parts = _split(b, xw, steps, 0) if steps > 1 else [xw]
        for p in parts:
            b.info.dims[p] = [1, self.batch, g]
        return [t.op([self.batch, g], "Squeeze", p, b.ints([0])) if b.opset >= 13 else
                t.op([self.batch, g], "Squeeze", p, axes=[0]) for p in parts]

    def _clipped(self, v: str) -> str:
        if self.clip is None:
            return v
        return self.t.op(self.b.dims(v), "Clip", v, _c(self.b, self.n, -self.clip), _c(self.b, self.n, self.clip))

    def step(self, xw: str, h: str, c: str):
        b, t, n, hd, bt = self.b, self.t, self.n, self.hidden, self.batch
        dims = [bt, hd]
        if self.kind == "RNN":
            pre = t.op(dims, "Add", xw, t.op(dims, "MatMul", h, self.rt))
            return _act(b, n, self.acts[0], self._clipped(pre)), None
        if self.kind == "GRU":
            f, g = self.acts
            xz, xr, xh = _cut(b, t, xw, [hd] * 3, [bt], 1)
            hr = t.op([bt, 2 * hd], "MatMul", h, self.rt)
            if self.rb is not None:
                hr = t.op([bt, 2 * hd], "Add", hr, self.rb)
            hz, hrr = _cut(b, t, hr, [hd, hd], [bt], 1)
            z = _act(b, n, f, self._clipped(t.op(dims, "Add", xz, hz)))
            r = _act(b, n, f, self._clipped(t.op(dims, "Add", xr, hrr)))
            if self.lbr:
                hh = t.op(dims, "MatMul", h, self.rt_h)
                if self.rb_h is not None:
                    hh = t.op(dims, "Add", hh, self.rb_h)
                pre = t.op(dims, "Add", xh, t.op(dims, "Mul", r, hh))
            else:
                pre = t.op(dims, "Add", xh, t.op(dims, "MatMul", t.op(dims, "Mul", r, h), self.rt_h))
            cand = _act(b, n, g, self._clipped(pre))
            # (1 - z) cand + z h = cand + z (h - cand)
            return t.op(dims, "Add", cand, t.op(dims, "Mul", z, t.op(dims, "Sub", h, cand))), None
        f, g, hf = self.acts
        pre = t.op([bt, 4 * hd], "Add", xw, t.op([bt, 4 * hd], "MatMul", h, self.rt))
        pi, po, pf, pc = _cut(b, t, pre, [hd] * 4, [bt], 1)
        if self.peep is not None:
            p_i, p_o, p_f = self.peep
            pi = t.op(dims, "Add", pi, t.op(dims, "Mul", p_i, c))
            pf = t.op(dims, "Add", pf, t.op(dims, "Mul", p_f, c))
        i = _act(b, n, f, self._clipped(pi))
        if n.attr("input_forget", 0):
            fg = t.op(dims, "Sub", _c(b, n, 1.0), i)
        else:
            fg = _act(b, n, f, self._clipped(pf))
        cc = _act(b, n, g, self._clipped(pc))
        c_new = t.op(dims, "Add", t.op(dims, "Mul", fg, c), t.op(dims, "Mul", i, cc))
        if self.peep is not None:
            po = t.op(dims, "Add", po, t.op(dims, "Mul", self.peep[1], c_new))
        o = _act(b, n, f, self._clipped(po))
        return t.op(dims, "Mul", o, _act(b, n, hf, c_new)), c_new


def _cut(b: Builder, t: _Tensors, v: str, sizes: list[int], lead: list, axis: int) -> list[str]:
    """``v`` cut along ``axis`` (its last axis when ``lead`` is its other dims before it)
    into pieces of ``sizes``."""
    if len(sizes) == 1:
        return [v]
    if b.opset >= 13:
        outs = b.op("Split", v, b.ints(sizes), axis=axis, n_out=len(sizes))
    else:
        outs = b.op("Split", v, axis=axis, split=list(sizes), n_out=len(sizes))
    for o, size in zip(outs, sizes):
        b.info.dims[o] = list(lead) + [size]
    return outs
