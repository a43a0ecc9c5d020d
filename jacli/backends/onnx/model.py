"""ONNX models run by onnxruntime (CPU). Exact derivatives come from VJP/JVP graphs that
``jacli.backends.onnx.derive`` builds from the model's graph (themselves ONNX models run by
the same runtime); a graph with an operator that has no rule says so and points to
``--method fd``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from typing import Sequence

import numpy as np

from ... import limits
from ...errors import InputError, InternalError, ModelLoadError, UnsafeModelError, UnsupportedError
from ...model import Model, TensorSpec, _leading, _shared_leading, budget
from . import arena, cache as onnx_cache, lanes, wire
from .._common import require, short, threads

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}
_NO_DOUBLE_KERNEL = {"LSTM", "GRU", "RNN"}
FED, CONSTANT = "fed", "constant"  # the tiled graph's sessions (strategies)
WHOLE, LANES = "whole", "lanes"  # one call on a session of threads(), or concurrent parts (lanes.py)
_STRATEGIES = {FED, CONSTANT, WHOLE, LANES, f"{FED}-{LANES}", f"{CONSTANT}-{LANES}"}
_SIZE_AT_RUN_TIME = "known only at run time"  # how rules refuse a size that pinning input shapes can fix  # onnxruntime (CPU) fails at run time; their decomposition runs


def load(path: str, trust: bool = False) -> "OnnxModel":
    """Load and check an ONNX model, or take its signature from the cache (onnx_cache) when
    this file was checked before: then ``onnx`` is imported only if a derived graph is
    missing from the cache. The large weights stay in the file's bytes (``wire``): the
    graphs jacli parses, checks, derives and runs take them as inputs, fed from one array
    each."""
    require("onnxruntime", "onnxruntime", "onnx", "ONNX")
    data = limits.read_regular(path, "model", ModelLoadError)
    m = OnnxModel(path=path, format="onnx", backend="onnxruntime", supports_float64=True)
    m.sha256 = hashlib.sha256(data).hexdigest()
    m._cache, m._graphs, m._session, m._adjoints = onnx_cache.entry(m.sha256), {}, None, {}
    m._held, m._holding = 0, False  # bytes of weights' copies held as constants (_constants_fit); strategy
    m._lanes = 1  # the strategy's lanes (lanes.py): 1, or threads()
    arena.hold(m)
    signature = onnx_cache.read_signature(m._cache)
    if signature is not None:  # a plain binary file that passed every check
        m.inputs, m.outputs = signature
        m._graph, (m._skeleton, m._weights, m._listed) = None, _split(data)
        return m
    m._graph, m._skeleton, m._weights, m._listed, plain = _checked(path, data, trust)
    init = {i.name for i in m._graph.graph.initializer} | set(m._weights)
    m.inputs = [_spec(v) for v in m._graph.graph.input if v.name not in init]
    m.outputs = [_spec(v) for v in m._graph.graph.output]
    if plain:
        onnx_cache.write_signature(m._cache, m.inputs, m.outputs)
    else:
        m._cache = m._skeleton = None  # None: serialized from the checked graph
    return m


def _split(data: bytes):
    """(skeleton, weights by name, names of those also listed as graph inputs): see ``wire``."""
    skeleton, moved = wire.split(data) or (data, [])
    return skeleton, {w.name: w.array(data) for w in moved}, frozenset(w.name for w in moved if w.listed)


def _checked(path: str, data: bytes, trust: bool):
    """The model's graph (external data loaded; a binary file's large weights made inputs)
    after every check, its skeleton, weights and listed names (``_split``), and whether it
    is plain: a binary file with neither external data nor custom-domain operators, the
    only kind cached (files beside the model could change under the same bytes)."""
    onnx = require("onnx", "onnx", "onnx", "ONNX")
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1]) or "protobuf"
    skeleton, weights, listed = _split(data) if fmt == "protobuf" else (data, {}, frozenset())
    try:
        proto = onnx.load_model_from_string(skeleton, format=fmt)
    except Exception as e:
        raise ModelLoadError(f"cannot load ONNX model {path}: {short(e)} (truncated or corrupt?)") from None
    from .checks import onnx_external_data_problems, onnx_undecodable_strings, tensors

    bad = onnx_undecodable_strings(proto)
    if bad:
        raise ModelLoadError(f"cannot load ONNX model {path}: text that is not UTF-8 ({bad[0]}; corrupt?)")
    model_dir = os.path.dirname(os.path.abspath(path))
    if not trust:
        from ..refusal import refuse

        refuse(path, onnx_external_data_problems(proto, model_dir))
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors(proto))
    try:
        onnx.load_external_data_for_model(proto, model_dir)
        # the skeleton's bytes when they are the whole model: no serialized copy of its weights
        onnx.checker.check_model(skeleton if fmt == "protobuf" and not external else proto)
    except Exception as e:
        raise ModelLoadError(f"cannot load ONNX model {path}: {short(e)} (truncated or corrupt?)") from None
    local = {(f.domain, f.name) for f in proto.functions}  # model-local functions: plain ONNX inside
    nodes = [*_all_nodes(proto.graph), *(n for f in proto.functions for n in f.node)]
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes
                     if n.domain not in _STANDARD_DOMAINS and (n.domain, n.op_type) not in local})
    if custom and not trust:
        raise UnsafeModelError(
            f"{path} uses custom-domain operators ({', '.join(custom)}) that need native plugin code; "
            "pass --trust-model if you have and trust their implementation"
        )
    plain = fmt == "protobuf" and not external and not custom
    return proto, skeleton, weights, listed, plain


class OnnxModel(Model):
    """``sha256`` is the model file's digest. The graphs jacli works on take the model's
    large weights as inputs (``_weights``: read-only arrays on the file's bytes, the one
    copy of them).
    Derived graphs (float64, VJP, JVP) are built on first use, or read from the model's
    cache entry (``_cache``, None when not cached)."""

    @property
    def graph(self):
        """The model's graph (an onnx.ModelProto) with its large weights as inputs; parsed
        on first use when it came from the cache."""
        if self._graph is None:
            onnx = require("onnx", "onnx", "onnx", "ONNX")
            self._graph = onnx.load_model_from_string(self._skeleton)
        return self._graph

    @property
    def proto(self):
        """The whole model (an onnx.ModelProto, its weights embedded: a copy of them)."""
        return self.embedded(self.graph)

    def embedded(self, graph):
        """A copy of ``graph`` (the model's or one derived from it) whose weight inputs are
        initializers again, as in the file."""
        import onnx
        from onnx import numpy_helper

        out = onnx.ModelProto()
        out.CopyFrom(graph)
        names = [vi.name for vi in out.graph.input if vi.name in self._weights or vi.name.startswith(wire.ADJOINT)]
        inputs = [vi for vi in out.graph.input if vi.name not in names or vi.name in self._listed]
        del out.graph.input[:]
        out.graph.input.extend(inputs)
        out.graph.initializer.extend(numpy_helper.from_array(self._weight(n), n) for n in names)
        return out

    def _weight(self, name: str) -> np.ndarray:
        """The array fed as input ``name``: a large weight, or a derivative graph's adjoint
        Conv kernel (rules/conv.py), computed on first use and kept (one copy each)."""
        if name in self._weights:
            return np.asarray(self._weights[name])
        if name not in self._adjoints:
            from .rules.conv import adjoint_input

            self._adjoints[name] = adjoint_input(name, self._weights)
        return self._adjoints[name]

    @property
    def session(self):
        """The onnxruntime session of the model itself, built on first use (``inspect``
        needs none)."""
        if self._session is None:
            data = self._skeleton if self._skeleton is not None else self.graph.SerializeToString()
            self._session = _session(data)
        return self._session

    def _constant(self, name: str):
        """The array a derivative graph's session holds as a constant instead of taking it as
        an input (``wire.constants``): a fed weight or adjoint kernel; None for any other."""
        return self._weight(name) if name in self._weights or name.startswith(wire.ADJOINT) else None

    def _constants_fit(self) -> bool:
        """Whether one more session may hold the fed weights as constants: their copies
        (``wire.CONSTANT_COPIES`` each) and those of the sessions that already do fit in
        ``wire.CONSTANT_SHARE`` of the call's budget (none outside an API call)."""
        cost, room = self._constant_cost(), budget()
        return bool(cost) and room is not None and self._held + cost <= wire.CONSTANT_SHARE * room

    def _constant_cost(self) -> int:
        """Bytes one session holding the fed weights as constants is taken to keep."""
        return wire.CONSTANT_COPIES * sum(w.nbytes for w in self._weights.values())

    def _forward(self, xs):
        ys = self._run(self.session, xs, [s.name for s in self.outputs])
        for spec in self.outputs:  # the derived graphs take cotangents of the declared shapes
            got, want = ys[spec.name].shape, spec.shape
            if want is not None and (len(got) != len(want) or any(d not in (None, g) for d, g in zip(want, got))):
                declared = str(tuple("?" if d is None else d for d in want)).replace("'", "")
                raise ModelLoadError(f"{self.path} declares its output {spec.name!r} with shape {declared}, but its "
                                     f"forward pass returns shape {tuple(got)}: the file's output signature is wrong")
        return ys

    def _forward64(self, xs):
        """In onnxruntime on the double graph, or, where onnxruntime has no double kernel for
        an operator, in ``float64.Evaluator``."""
        xs64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in xs.items()}
        names = [s.name for s in self.outputs]
        if "f64" not in self._graphs:
            cached = onnx_cache.read_graph(self._cache, "f64")  # then no onnx import
            if cached is not None:
                self._graphs["f64"] = _session(cached)
                return self._run(self._graphs["f64"], xs64, names, "float64 graph")
            from .float64 import Evaluator, lacks_double

            if lacks_double(self.graph):
                self._graphs["f64"] = Evaluator(self.graph)
            else:
                try:
                    self._graphs["f64"] = self._cached_session("f64", self.float64_graph)
                except UnsupportedError:
                    self._graphs["f64"] = Evaluator(self.graph)
        return self._run(self._graphs["f64"], xs64, names, "float64 graph")

    def float64_graph(self):
        """The model's graph evaluated in float64 (an onnx.ModelProto; weights as inputs)."""
        from .float64 import to_float64

        recurrent = sorted({n.op_type for n in self.graph.graph.node if n.op_type in _NO_DOUBLE_KERNEL})
        if recurrent:
            from .derive import decomposed  # the same function, of operators that have double kernels

            try:
                return to_float64(decomposed(self.graph), self._weights)
            except UnsupportedError as e:
                raise UnsupportedError(f"onnxruntime (CPU) has no double-precision kernel for {recurrent[0]} and "
                                       f"its decomposition does not apply ({e})") from None
        return to_float64(self.graph, self._weights)

    def derivative_graph(self, kind: str, wrt: Sequence[str], of: Sequence[str]):
        """The VJP or JVP graph for these inputs and outputs as a standalone model (an
        onnx.ModelProto, the weights embedded)."""
        return self.embedded(self._derived(kind, wrt, of))

    def _derived(self, kind: str, wrt: Sequence[str], of: Sequence[str], fixed: dict | None = None,
                 tiled: bool = False):
        """The VJP or JVP graph, weights as inputs; ``fixed`` (input -> dims) pins dynamic
        sizes of the model's inputs for one shape of input; ``tiled``: seeds and results of
        k*B rows, the forward part run once (derive)."""
        from . import derive

        build = derive.build_vjp if kind == "vjp" else derive.build_jvp
        return build(self.graph, list(wrt), list(of), fixed=fixed, tiled=tiled, weights=frozenset(self._weights))

    def _folded(self, prim, xs, seeds, names):
        """k seeds per sample in one call of the tiled derivative graph (the forward part run
        once, not k times), where the model has one; else folded as every backend is. One
        seed too (as fast as the plain graph: no second graph and session to build). In lanes
        (``_lanes`` > 1) the call runs in concurrent parts (lanes.py)."""
        kind = "vjp" if prim == self._vjp else "jvp"
        wrt, of = (names, list(seeds)) if kind == "vjp" else (list(seeds), names)
        sess = self._tiled(kind, wrt, of) if self._fixed_batch() is None and _shared_leading(xs) else None
        if sess is None:
            return super()._folded(prim, xs, seeds, names)
        prefix, result = ("ct:", "grad:") if kind == "vjp" else ("tan:", "jvp:")

        def one(xs, seeds):
            feeds = {**xs, **{prefix + n: v.reshape(-1, *v.shape[2:]) for n, v in seeds.items()}}
            out = self._run(sess, feeds, [result + n for n in names], f"{kind.upper()} graph")
            return {n[len(result):]: v.reshape(_leading(seeds), -1, *v.shape[1:]) for n, v in out.items()}

        return lanes.run(one, xs, seeds, self._lanes)

    def _tiled(self, kind: str, wrt: Sequence[str], of: Sequence[str]):
        """The session of the tiled graph for this selection, or None where it cannot be built;
        under the "constant" strategy (``_holding``) the one holding the fed weights as
        constants, where it exists or fits (``_constants_fit``); in lanes, one of one thread."""
        key = (f"{kind}-tiled", tuple(wrt), tuple(of)) + ((LANES,) if self._lanes > 1 else ())
        held = key + (CONSTANT,)
        hold = self._holding and (held in self._graphs or self._constants_fit())
        key = held if hold else key
        if key not in self._graphs:
            try:
                self._graphs[key] = self._build_session(kind, wrt, of, None, tiled=True, hold=hold,
                                                        intra=1 if self._lanes > 1 else None)
            except UnsupportedError:
                self._graphs[key] = None
        return self._graphs[key]

    def strategies(self, kind: str, xs, seeds) -> tuple[str, ...]:
        """Where the model's large weights are fed (``wire``) and the call's budget has room
        for their copies, the tiled graph runs in one of two sessions: "fed" (the weights are
        inputs) or "constant" (they are constants, which onnxruntime transforms into its
        blocked Conv layout: Keras' ResNet50 as ONNX ran 18-25% faster with one thread, 28-40%
        with two, but its session took 0.4-1.3 s longer to build and held 420 MB more). The engine's tuner picks the faster
        and builds the constant one only once the calls have earned it (``compiles``).
        With two threads or more, each of those (or the one whole call, where neither
        applies) also runs in lanes (``lanes.py``: "fed-lanes", "constant-lanes", "lanes"),
        where the call can be split."""
        tiled = self._fixed_batch() is None and bool(_shared_leading(xs))
        held = self._weights and tiled and (self._held or self._constants_fit())
        ways = (FED, CONSTANT) if held else ()
        if not (tiled and lanes.splits(xs, seeds, threads())):
            return ways
        return (*ways, *(f"{w}-{LANES}" for w in ways)) if ways else (WHOLE, LANES)

    def compiles(self, strategy: str, xs, seeds) -> bool:
        """The "constant" strategy's first session is the one-time cost (later selections
        and kinds build theirs at once); in lanes the first of one thread."""
        if not strategy.startswith(CONSTANT):
            return False
        tag = (LANES, CONSTANT) if strategy.endswith(LANES) else (CONSTANT,)
        return not any(key[0].endswith("-tiled") and key[3:] == tag for key in self._graphs
                       if isinstance(key, tuple) and self._graphs[key] is not None)

    def vjp(self, xs, cotangents, wrt, per_sample=True, strategy=None):
        return self._under(strategy, super().vjp, xs, cotangents, wrt, per_sample)

    def jvp(self, xs, tangents, of, per_sample=True, strategy=None):
        return self._under(strategy, super().jvp, xs, tangents, of, per_sample)

    def _under(self, strategy, call, *args):
        ours = strategy in _STRATEGIES
        self._holding = ours and strategy.startswith(CONSTANT)
        self._lanes = threads() if ours and strategy.endswith(LANES) else 1
        try:
            return call(*args, strategy=None if ours else strategy)
        finally:
            self._holding, self._lanes = False, 1

    def _derivative(self, kind: str, wrt: Sequence[str], of: Sequence[str], xs=None):
        """A session running the derivative graph (one per kind and selection). A graph that
        cannot be built while some input sizes are dynamic (a recurrent network's sequence
        length) is built again for the sizes of ``xs`` (all but the leading axis, else all),
        once per such shape."""

        key = (kind, tuple(wrt), tuple(of))
        if key not in self._graphs:
            try:
                self._graphs[key] = self._build_session(kind, wrt, of, None)
            except UnsupportedError as e:
                if xs is None or not self._dynamic_dims() or _SIZE_AT_RUN_TIME not in str(e):
                    raise
                self._graphs[key] = e
        sess = self._graphs[key]
        if not isinstance(sess, UnsupportedError):
            return sess
        for lead in (False, True):  # the leading axis too only if need be (a time-major sequence)
            fixed = {s.name: ([None] if not lead else [xs[s.name].shape[0]]) + list(xs[s.name].shape[1:])
                     for s in self.inputs if s.name in xs and s.shape and any(d is None for d in s.shape)}
            special = key + (tuple(sorted((n, tuple(d)) for n, d in fixed.items())),)
            if special not in self._graphs:
                try:
                    self._graphs[special] = self._build_session(kind, wrt, of, fixed)
                except UnsupportedError:
                    self._graphs[special] = None
            if self._graphs[special] is not None:
                return self._graphs[special]
        raise sess

    def _dynamic_dims(self) -> bool:
        return any(s.shape and any(d is None for d in s.shape) for s in self.inputs)

    def _build_session(self, kind, wrt, of, fixed, tiled=False, hold=False, intra=None):
        selection = hashlib.sha256(json.dumps([list(wrt), list(of), fixed]).encode()).hexdigest()[:16]
        build = lambda: self._derived(kind, wrt, of, fixed, tiled)  # noqa: E731
        return self._cached_session(f"{kind}{'-tiled' if tiled else ''}-{selection}", build, hold, intra)

    def _cached_session(self, name: str, build, hold: bool = False, intra=None):
        """A session for the derived graph ``name``: from the cache entry if it holds one,
        else ``build()`` (an onnx.ModelProto), then stored there. ``hold``: its fed weights
        held as constants (``_constant``), their copies counted in ``_held``; ``intra``:
        its intra-op threads (default ``threads()``)."""
        constant = self._constant if hold else None
        data = onnx_cache.read_graph(self._cache, name)
        cached = data is not None
        if not cached:
            data = build().SerializeToString()
        session = _session(data, constant, intra)
        if session.jacli_held:
            self._held += self._constant_cost()
        if not cached:
            onnx_cache.write_graph(self._cache, name, data)
        return session

    def _vjp(self, xs, cts, wrt: Sequence[str]):
        sess = self._derivative("vjp", wrt, list(cts), xs)
        feeds = {**xs, **{f"ct:{k}": v for k, v in cts.items()}}
        out = self._run(sess, feeds, [f"grad:{n}" for n in wrt], "VJP graph")
        return {k[len("grad:"):]: v for k, v in out.items()}

    def _jvp(self, xs, ts, of: Sequence[str]):
        sess = self._derivative("jvp", list(ts), of, xs)
        feeds = {**xs, **{f"tan:{k}": v for k, v in ts.items()}}
        out = self._run(sess, feeds, [f"jvp:{n}" for n in of], "JVP graph")
        return {k[len("jvp:"):]: v for k, v in out.items()}

    def _run(self, sess, feeds, names, derived: str = ""):
        """Run a session. A failure is the user's input, unless the session runs a graph jacli
        derived (``derived``: what it is) and the model's own forward pass runs at the same
        input: then it is jacli's bug, reported with onnxruntime's reason."""
        given = {k: np.require(v, requirements="C") for k, v in feeds.items() if k in sess.jacli_inputs}
        try:
            values = sess.run(names, {**self._fed(sess), **given})
        except Exception as e:
            if derived and self._forward_runs(feeds):
                raise InternalError(f"onnxruntime could not run the {derived} that jacli derived from the model "
                                    f"({short(e)}), although the model's forward pass runs at this input",
                                    option="--method fd", hint="method='fd'") from None
            raise InputError(f"the model rejected the input: {short(e)}") from None
        return dict(zip(names, values))

    def _forward_runs(self, feeds) -> bool:
        try:
            self.session.run(None, {**self._fed(self.session), **{
                s.name: np.require(feeds[s.name], requirements="C") for s in self.inputs
                if s.name in feeds and s.name in self.session.jacli_inputs}})
            return True
        except Exception:  # the model's own failure: the input's fault
            return False


    def _fed(self, sess) -> dict:
        """The weights ``sess`` takes as inputs (a float64 graph's under their ``NARROW`` names,
        a derivative graph's adjoint kernels under their ``ADJOINT`` names)."""
        fed = getattr(sess, "jacli_fed", None)
        if fed is None:
            names = {name: name.removeprefix(wire.NARROW) for name in sess.jacli_inputs}
            fed = {name: self._weights[w] for name, w in names.items() if w in self._weights}
            fed.update((name, self._weight(name)) for name in sess.jacli_inputs if name.startswith(wire.ADJOINT))
            sess.jacli_fed = fed
        return fed


def _session(data: bytes, constant=None, intra: int | None = None):
    """An onnxruntime session of the serialized graph ``data``; ``constant(name)``: the array
    to hold as the constant for input ``name``, or None to leave it an input (wire.constants:
    onnxruntime is handed the arrays, one copy shared by every session, and transforms and
    pre-packs what it can)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # errors come back as exceptions; nothing else is for the user
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = intra or threads()
    # memory: no arena of the session's own (it would keep the session's peak), but the one
    # all sessions share (arena.py); nodes run in an order that frees early (a float64 graph
    # casts one weight at a time)
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    arena.configure(opts)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # idle pool threads sleep instead of spinning: on a busy machine spinning took a 2-thread
    # transformer-block VJP from 61 to 154 ms (with one thread there is no pool)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    held = []  # the constants' OrtValues, kept alive with the session (they share the arrays' memory)
    if constant is not None:
        data, names = wire.constants(data, constant)
        held = [ort.OrtValue.ortvalue_from_numpy(np.require(constant(n), requirements="C")) for n in names]
        if names:
            opts.add_external_initializers(names, held)
    try:
        with _native_stderr_captured():
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelLoadError(f"onnxruntime cannot run this model: {short(e)}") from None
    sess.jacli_inputs = frozenset(i.name for i in sess.get_inputs())  # looked up on every run
    sess.jacli_held = held
    return sess


@contextlib.contextmanager
def _native_stderr_captured():
    """File descriptor 2 pointed at a temporary file while native code runs, so that lines
    onnxruntime's C++ side writes there directly (whatever the logger severity) never reach
    the terminal; discarded afterwards (failures come back as exceptions)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to capture
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _spec(value_info) -> TensorSpec:
    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) if t.HasField("shape") else None
    return TensorSpec(value_info.name, shape, _ONNX_DTYPES.get(t.elem_type, "float32"))


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in [a.g, *a.graphs] if a.HasField("g") else a.graphs:
                yield from _all_nodes(g)
