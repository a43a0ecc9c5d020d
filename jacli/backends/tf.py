"""Keras (``.keras``, ``.h5`` from Keras 3 or Keras 2/tf_keras) models, and the TensorFlow
backend they share with SavedModel directories (``savedmodel.py``).

Derivatives come from TensorFlow's autodiff inside ``tf.function``: VJPs with
``GradientTape.gradient(output_gradients=...)``, JVPs by two reverse passes (or, where a
second derivative is missing, ``ForwardAccumulator``); each
compiled once per input signature and reused, so repeated blocks do not re-trace.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Sequence

import numpy as np

from ..errors import InputError, InternalError, JacliError, LimitationError, ModelLoadError, UnsafeModelError
from ..model import MapUnavailable, Model, TensorSpec
from ._common import Constants, require, short
from .tf_inline import CALL_OPS

UNROLL = 16  # up to this many cotangents, the sequential VJP is unrolled in the graph ...
UNROLL_OPS = 4096  # ... while that many copies of the backward pass hold at most this many forward operations


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" not in sys.modules:
        with _native_stderr_silenced():  # TF's C++ start-up chatter bypasses TF_CPP_MIN_LOG_LEVEL
            require("tensorflow", "tensorflow", "tf", "Keras/TensorFlow")
    tf = require("tensorflow", "tensorflow", "tf", "Keras/TensorFlow")
    tf.get_logger().setLevel("CRITICAL")  # TF logs recovered errors with tracebacks; jacli reports its own
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.FATAL)
    except ImportError:
        pass
    return tf


def load_keras(path: str, trust: bool = False, custom_objects=()) -> "TFModel":
    """``custom_objects``: modules the user imported (``--custom-objects``) that define the
    model's own classes; those classes are given to Keras, and their layers pass the check."""
    from .keras_checks import checked_copy, hdf5_objects

    provided = _custom_objects(custom_objects)
    _tf()  # TensorFlow first (its environment and logging), then Keras
    keras = require("keras", "keras", "tf", "Keras")
    # Keras loads a private copy, checked first (unless trusted); safe_mode is the second line of defence
    with checked_copy(path, trust, screen=lambda problems: _screen(path, problems, provided)) as (local, route):
        try:
            objects = {**hdf5_objects(local), **provided} if route == "hdf5" else provided
            model = keras.saving.load_model(local, compile=False, safe_mode=not trust,
                                            custom_objects=objects or None)
        except ValueError as e:
            if "safe_mode" in str(e) or "lambda" in str(e).lower():
                raise UnsafeModelError(
                    f"{path} contains a Lambda layer whose Python bytecode would run on load; "
                    "pass --trust-model if you trust its source"
                ) from None
            model = _load_tf_keras(path, local, route, trust, e, provided)
        except Exception as e:
            model = _load_tf_keras(path, local, route, trust, e, provided)
    # the layers themselves, traced into each of TFModel's graphs: through a tf.function of its own,
    # the call would be one function-call op, whose gradient TensorFlow builds as higher-order forward
    # and backward functions (4x the tracing, and slower pfor maps)
    fn = lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False)  # noqa: E731
    inputs = [TensorSpec(_clean(t.name), tuple(t.shape), t.dtype if isinstance(t.dtype, str) else t.dtype.name) for t in model.inputs]
    outputs = [
        TensorSpec(name, tuple(t.shape), t.dtype if isinstance(t.dtype, str) else t.dtype.name)
        for name, t in zip(_output_names(model), model.outputs)
    ]
    m = TFModel(path=path, format="keras", backend="tensorflow", inputs=inputs, outputs=outputs, fn=fn, kwargs=False,
                supports_float64=True)
    m.keras_model = model  # rebuilt in float64 when first needed (_forward64)
    return m


def _load_tf_keras(path: str, local: str, route: str, trust: bool, first: Exception, provided: dict):
    """Keras 2 (tf_keras) .h5 files that Keras 3 cannot read: the same checked HDF5 copy. When
    both fail, the reason that matters comes first: Keras 3's for a file Keras 3 wrote,
    tf_keras's for a Keras 2 file."""
    first_error = short(first).replace(local, path)
    if route != "hdf5":
        raise _keras_load_error(path, first_error, first) from None
    try:
        import tf_keras
    except ImportError:
        raise _keras_load_error(path, f"{first_error} (installing tf_keras may help)", first) from None
    try:
        return tf_keras.models.load_model(local, compile=False, safe_mode=not trust, custom_objects=provided or None)
    except Exception as e:
        reasons = [f"Keras 3: {first_error}", f"tf_keras: {short(e).replace(local, path)}"]
        if not _written_by_keras3(local):
            reasons.reverse()
        raise _keras_load_error(path, "; ".join(reasons), e, first) from None

_MISSING_CLASS = re.compile(r"(?:Could not locate|Unknown) (?:class|layer|object)[:\s]*'?([A-Za-z_][\w.>]*)'?")
_CLASS = re.compile(r"^class '([^']+)'")  # the check's words for a class ...
_CUSTOM_CLASS = re.compile(  # ... a user's own
    r"^class '([^']+)' (?:from module '([^']+)'|registered as '([^']+)'|without a module)")


def _keras_load_error(path: str, reason: str, *errors: BaseException) -> ModelLoadError:
    """The load failure, naming the class Keras could not find (and how to supply it)."""
    for e in errors:
        missing = _MISSING_CLASS.search(str(e))
        if missing:
            return ModelLoadError(f"cannot load Keras model {path}: it uses the class {missing.group(1)!r}, which "
                                  f"is not defined here ({missing.group(0)})",
                                  option="--custom-objects FILE.py (the Python file that defines it; its code runs)",
                                  hint="custom_objects=['FILE.py'], or import the module that defines it first")
    return ModelLoadError(f"cannot load Keras model {path}: {reason}")


def _written_by_keras3(path: str) -> bool:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version", b"")
        return str(version.decode() if isinstance(version, bytes) else version).startswith("3")
    except Exception:  # unreadable: the loaders' messages say why
        return True


def _custom_objects(modules) -> dict:
    """The classes and functions the user's modules define, by name and by the name they were
    registered under (``register_keras_serializable``): what Keras may look up."""
    provided = {}
    for module in modules:
        for name, obj in vars(module).items():
            if (isinstance(obj, type) or callable(obj)) and getattr(obj, "__module__", None) == module.__name__:
                provided[name] = obj
    if provided:
        keras = require("keras", "keras", "tf", "Keras")
        owned = set(map(id, provided.values()))
        provided.update({k: v for k, v in keras.saving.get_custom_objects().items() if id(v) in owned})
    return provided


def _screen(path: str, problems: list[str], provided: dict) -> list[str]:
    """The check's problems less those about classes the user supplied with --custom-objects
    (its code is theirs); where only custom classes remain, an error that says how to supply them."""
    problems = [p for p in problems if not (_CLASS.search(p) and _CLASS.search(p).group(1) in provided)]
    classes = [m.groups() for m in (_CUSTOM_CLASS.search(p) for p in problems) if m]
    if classes and len(classes) == len(problems):
        named = ", ".join(f"{c!r} from module {m!r}" if m else f"{c!r} registered as {r!r}" if r else repr(c)
                          for c, m, r in classes)
        raise UnsafeModelError(
            f"{path} uses classes from outside Keras ({named}), which Keras would import or look up (running "
            "their code)", option="--custom-objects FILE.py (the module that defines them; its code runs), or "
            "--trust-model to let Keras import them", hint="custom_objects=['FILE.py'] (its code runs), or trust=True")
    return problems


class TFModel(Model):
    traced_maps = True  # every map strategy is a tf.function graph of its own
    # TensorFlow's BFC allocator reuses its own memory (no page faults past glibc's mmap
    # threshold), and its pfor maps gain from larger batches: Keras' MobileNetV3Small at 256
    # samples (64x64, reverse mode) took 1,568 against 1,702 ms with 2 threads and 1,437
    # against 1,667 ms with 1 in 16 MiB blocks instead of 8 (34 against 17 samples a call).
    # 32 MiB was faster still with 2 threads (1,336 ms) but took ResNet50 at 64 samples to
    # 3.3 GB peak RSS against 2.2 GB (16 MiB: 2.2 GB), past the 2 GiB budget plus the model
    block_bytes = 16 << 20

    def __init__(self, *, fn, kwargs: bool, **kw):
        super().__init__(**kw)
        self.fn, self.kwargs = fn, kwargs
        tf = _tf()
        names = [s.name for s in self.inputs]

        def call(xs):
            out = self.fn(**dict(zip(names, xs))) if self.kwargs else self.fn(*xs)
            if isinstance(out, dict):
                return out
            out = out if isinstance(out, (list, tuple)) else [out]
            return dict(zip([s.name for s in self.outputs], out))

        def pullback(xs, wrt_mask, persistent=False):
            with tf.GradientTape(persistent=persistent, watch_accessed_variables=False) as tape:
                for x, on in zip(xs, wrt_mask):
                    if on:
                        tape.watch(x)
                ys = call(xs)
            targets = [x for x, on in zip(xs, wrt_mask) if on]

            def grads(cts):
                keys = [k for k in ys if k in cts]
                return tape.gradient([ys[k] for k in keys], targets, output_gradients=[cts[k] for k in keys],
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO)

            return grads

        def pushforward(xs, ts, of):
            names_in = [s.name for s in self.inputs]
            primals = [x for n, x in zip(names_in, xs) if n in ts]
            with tf.autodiff.ForwardAccumulator(primals, [ts[n] for n in names_in if n in ts]) as acc:
                ys = call(xs)
            return {k: acc.jvp(ys[k], unconnected_gradients=tf.UnconnectedGradients.ZERO) for k in of}

        def pushforward_by_double_vjp(xs, ts, of):
            """J t = d/du <Jᵀu, t> (at any u, here 0): two reverse passes (also through
            operations forward-mode AD cannot cross, e.g. loops whose bodies read variables)."""
            mask = tuple(s.name in ts for s in self.inputs)
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    for x, on in zip(xs, mask):
                        if on:
                            inner.watch(x)
                    ys = call(xs)
                us = {k: tf.zeros_like(ys[k]) for k in of}
                outer.watch(list(us.values()))
                grads = inner.gradient([ys[k] for k in of], [x for x, on in zip(xs, mask) if on],
                                       output_gradients=[us[k] for k in of],
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
            tangents = [ts[s.name] for s in self.inputs if s.name in ts]
            out = outer.gradient(grads, [us[k] for k in of], output_gradients=tangents,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return dict(zip(of, out))

        # one cotangent/tangent per call; or k of them after one forward pass, vectorised with pfor or
        # (cotangents) one after another
        self._vjp_fn = tf.function(lambda xs, cts, mask: pullback(xs, mask)(cts), reduce_retracing=True)
        vjp_map = lambda xs, cts, mask: tf.vectorized_map(pullback(xs, mask), cts)  # noqa: E731
        # pfor traces the gradient once: a first-order tape (cheaper graphs); or the same compiled by XLA
        self._vjp_map_fn = tf.function(vjp_map, reduce_retracing=True)
        self._vjp_xla_fn = tf.function(vjp_map, reduce_retracing=True, jit_compile=True)  # once per shape (compiles)
        self._vjp_seq_fn = tf.function(  # the k cotangents one after another (a while loop), one forward pass
            lambda xs, cts, mask: tf.map_fn(pullback(xs, mask, persistent=True), cts, parallel_iterations=1,
                                            fn_output_signature=[x.dtype for x, on in zip(xs, mask) if on]),
            reduce_retracing=True)

        @tf.function  # not reduce_retracing: that would relax the static k this graph unrolls
        def vjp_unrolled(xs, cts, mask):  # the same for a small, static k: k gradient calls in the graph
            grads = pullback(xs, mask, persistent=True)
            rows = [grads({n: c[i] for n, c in cts.items()}) for i in range(next(iter(cts.values())).shape[0])]
            return [tf.stack(column) for column in zip(*rows)]

        self._vjp_unrolled_fn = vjp_unrolled
        # JVPs: the double-VJP trick, or (when that fails on this model) forward-mode AD
        def over_k(push):  # k tangents after one forward pass, vectorised with pfor
            return lambda xs, ts, of: tf.vectorized_map(lambda t: push(xs, t, of), ts)

        self._jvp_fns = {
            (by_vjp, mapped): tf.function(over_k(push) if mapped else push, reduce_retracing=True)
            for by_vjp, push in ((False, pushforward), (True, pushforward_by_double_vjp)) for mapped in (False, True)
        }
        self._tangent_route = None  # JVPs by two reverse passes (True) or forward-mode AD (False): the one that worked
        self._unmappable: set[tuple[str, str]] = set()  # (vjp|jvp, strategy) that failed on this model
        self._compiled: set[tuple] = set()  # the shapes XLA has compiled the map for (_shapes)
        self._call_fn = tf.function(call, reduce_retracing=True)
        self._graphs = {}  # see _traced
        self._seeds = Constants(tf.constant)

    def _xs(self, xs):
        return [xs[s.name] for s in self.inputs]

    def _run(self, f, *args, xs=None, what: str = "the forward pass"):
        """Call ``f``; a framework error becomes the user's ``InputError`` when the forward pass
        itself fails on these inputs. Where the forward pass runs (``xs`` given: ``f`` derives
        something from the model), it is a ``LimitationError`` for an operation TensorFlow
        has no gradient for, else jacli's own ``InternalError``."""
        try:
            return f(*args)
        except JacliError:
            raise
        except Exception as e:  # tf.errors.* on bad shapes, ValueError/TypeError while tracing
            if not _framework_error(e):
                raise
            if xs is None:
                raise InputError(f"the model rejected the input: {short(e)}") from None
            self._forward(xs)  # raises the InputError when the input is the problem
            raise _derivative_error(e, what) from None

    def _traced(self, fn, seed_axes: tuple[int, ...], xs: list, *rest):
        """Call ``fn`` through its graph for these shapes and dtypes, traced once with the
        inputs' batch axis and the seeds' ``seed_axes`` left open. Calling the traced graph
        directly skips tf.function's per-call signature matching, which costs more than a
        small Jacobian; and no block of any size is traced again."""
        xs = [np.asarray(x) for x in xs]
        rest = ({k: np.asarray(v) for k, v in rest[0].items()}, *rest[1:]) if rest else ()
        seeds = rest[0] if rest else {}
        opened = lambda a, axes: (tuple(None if i in axes else d for i, d in enumerate(a.shape)), a.dtype)  # noqa: E731
        x_specs = [opened(x, (0,)) for x in xs]
        seed_specs = {k: opened(v, seed_axes) for k, v in seeds.items()}
        key = (fn, rest[1:], *x_specs, *seed_specs.items())
        graph = self._graphs.get(key)
        if graph is None:
            spec = _tf().TensorSpec
            args = [[spec(*s) for s in x_specs]] + ([{k: spec(*s) for k, s in seed_specs.items()}, *rest[1:]] if rest else [])
            graph = self._graphs[key] = fn.get_concrete_function(*args)
        if rest:  # the engine's recurring read-only seed blocks become tensors once, not on every call
            rest = ({k: v if v.flags.writeable else self._seeds(v) for k, v in seeds.items()}, *rest[1:])
        return graph(xs, *rest)

    def _forward(self, xs):
        ys = self._run(self._traced, self._call_fn, (), self._xs(xs))
        return {k: np.asarray(v) for k, v in ys.items()}

    def _forward64(self, xs):
        """A Keras model's layers rebuilt with a float64 dtype policy, weights copied; a
        SavedModel's signature frozen and retyped to float64 (tf_float64.py). Built once:
        a failure to build is kept and raised again."""
        if getattr(self, "_fn64", None) is None:
            try:
                self._fn64 = self._float64_fn()
            except LimitationError as e:
                self._fn64 = e
        if isinstance(self._fn64, LimitationError):
            raise self._fn64
        try:
            out = self._fn64(*[v.astype(np.float64) if v.dtype.kind == "f" else v for v in self._xs(xs)])
        except Exception as e:
            if not _framework_error(e):
                raise
            self._forward(xs)  # the user's input error, if it is one
            raise LimitationError(f"the float64 copy of this {self.format} model fails: {short(e)}") from None
        if not isinstance(out, dict):
            out = dict(zip(self.output_names(), out if isinstance(out, (list, tuple)) else [out]))
        return {k: np.asarray(v) for k, v in out.items()}

    def _float64_fn(self):
        tf = _tf()
        if self.format == "savedmodel":
            from .tf_float64 import float64_function

            if self.inlined is None:
                raise LimitationError(f"no float64 copy of this SavedModel: {self.not_inlined}")
            return float64_function(tf, self.inlined, [s.name for s in self.inputs])
        model64 = _float64_keras(self.keras_model)
        return tf.function(lambda *a: model64(list(a) if len(a) > 1 else a[0], training=False), reduce_retracing=True)

    def _vjp(self, xs, cts, wrt: Sequence[str], fn=None, seed_axes=(0,)):
        mask = tuple(s.name in wrt for s in self.inputs)
        grads = self._run(self._traced, fn or self._vjp_fn, seed_axes, self._xs(xs), dict(cts), mask, xs=xs,
                          what="the gradient (reverse mode)")
        names = [s.name for s in self.inputs if s.name in wrt]
        return {n: np.asarray(g) for n, g in zip(names, grads)}

    def _jvp(self, xs, ts, of: Sequence[str], mapped: bool = False):
        """J t by two reverse passes (J t = d/du <Jᵀu, t>), or by forward-mode AD; where the
        first fails on this model (an operation without a second derivative, or without a
        forward rule), the other; the route that worked is kept. TensorFlow's forward mode
        takes the same double-back trick op by op: through Keras' layers (MobileNetV3Small) the
        whole-graph one traced 5x faster, in a third of the memory, and ran 25% faster, and
        through an inlined SavedModel signature 2.8x faster, in a third of the memory, and ran
        15% faster (26 against 30 ms); but through a function-call op (a signature that is
        not inlined) two nested tapes make TensorFlow build higher-order functions, and
        forward mode is faster there (74 against 142 ms).
        Where both fail, a limitation that names reverse mode (or, for an operation without any
        gradient, finite differences)."""
        axes = (0, 1) if mapped else (0,)
        run = lambda by_vjp: {k: np.asarray(v) for k, v in self._run(  # noqa: E731
            self._traced, self._jvp_fns[by_vjp, mapped], axes, self._xs(xs), dict(ts), tuple(of), xs=xs,
            what="the forward-mode derivative" + (" (by two reverse passes)" if by_vjp else "")).items()}
        first = self._tangent_route if self._tangent_route is not None else not self._calls_functions()
        routes = (first, not first)
        failed = []
        for by_vjp in routes:
            try:
                out = run(by_vjp)
            except (LimitationError, InternalError) as e:
                failed.append(e)
                continue
            self._tangent_route = by_vjp
            return out
        missing = [e for e in failed if getattr(e, "operator", None)]
        if missing:  # no gradient at all: reverse mode cannot help either
            raise missing[-1]
        raise self._forward_limitation(*failed) from None

    @staticmethod
    def _forward_limitation(first, then) -> LimitationError:
        return LimitationError(f"forward mode: TensorFlow cannot push tangents through this model ({first.message}; "
                               f"then {then.message})", option="--mode reverse", hint="mode='reverse'")

    def _map_strategies(self, prim) -> tuple[str, ...]:
        if self._has_loops():  # pfor through a loop's gradient traces for minutes, or fails: fold k instead
            return ()
        kind = "vjp" if prim == self._vjp else "jvp"
        options = ("vectorised", "sequential", "xla") if kind == "vjp" else ("vectorised",)
        return tuple(s for s in options if (kind, s) not in self._unmappable)

    def compiles(self, strategy: str, xs, seeds) -> bool:
        """XLA compiles its map once per shape of the inputs and seeds: a Keras MobileNetV3Small's
        first call took 10.4 s with it, 7.5 s without, and 400 MiB more; then 2.1-2.8x faster."""
        return strategy == "xla" and _shapes(xs, seeds) not in self._compiled

    def _calls_functions(self) -> bool:
        """Whether the model's forward graph (as traced so far) calls functions: a SavedModel's
        signature where it is not inlined (tf_inline.py); not a Keras model's layers, nor an
        inlined signature, traced into jacli's graphs."""
        graph = self._forward_graph()
        return graph is not None and any(op.type in CALL_OPS for op in graph.get_operations())

    def _forward_graph(self):
        """The model's forward graph as first traced (``_traced``), or None before any forward pass."""
        return next((g.graph for key, g in self._graphs.items() if key[0] is self._call_fn), None)

    def _forward_ops(self) -> int:
        """How many operations the model's forward graph (as traced so far) holds, with the functions it calls."""
        if getattr(self, "_ops", None) is None:
            graph = self._forward_graph()
            if graph is None:
                return 0
            self._ops = sum(1 for _ in _operations(graph))
        return self._ops

    def _has_loops(self) -> bool:
        """Whether the model's forward graph (as traced for the inputs seen so far) holds a loop."""
        if getattr(self, "_loops", None) is None:
            graph = self._forward_graph()
            if graph is None:
                return False
            self._loops = any(op.type in _LOOP_OPS for op in _operations(graph))
        return self._loops

    def _vjp_jvp_map(self, prim, xs, seeds, names, strategy=""):
        if not strategy:  # no map of its own for this model (_map_strategies): one call per seed
            return super()._vjp_jvp_map(prim, xs, seeds, names)
        if strategy == "xla":
            try:
                out = self._vjp(xs, seeds, names, fn=self._vjp_xla_fn, seed_axes=(0, 1))
            except (InternalError, LimitationError) as e:  # an operation XLA cannot compile
                if getattr(e, "operator", None):
                    raise
                self._unmappable.add(("vjp", strategy))
                raise MapUnavailable(str(e)) from None
            self._compiled.add(_shapes(xs, seeds))
            return out
        if strategy == "vectorised":
            kind = "vjp" if prim == self._vjp else "jvp"
            try:
                if kind == "jvp":
                    return self._jvp(xs, seeds, names, mapped=True)
                return self._vjp(xs, seeds, names, fn=self._vjp_map_fn, seed_axes=(0, 1))
            except (InternalError, LimitationError) as e:  # pfor cannot vectorise this model's derivative
                if getattr(e, "operator", None):  # an operation without any gradient: no map helps
                    raise
                self._unmappable.add((kind, strategy))
                self._tangent_route = None  # decided under pfor: decide again without it
                return self._vjp_jvp_map(prim, xs, seeds, names, "sequential" if kind == "vjp" else "")
        k = len(next(iter(seeds.values())))
        if k <= UNROLL and k * self._forward_ops() <= UNROLL_OPS:  # k static: one graph per k, no loop overhead
            # (tracing k backward passes of MobileNetV3Small, 1,076 operations, took 23 s against 7 s for the loop)
            return self._vjp(xs, seeds, names, fn=self._vjp_unrolled_fn, seed_axes=(1,))
        return self._vjp(xs, seeds, names, fn=self._vjp_seq_fn, seed_axes=(0, 1))


def _shapes(*groups) -> tuple:
    return tuple((k, v.shape, v.dtype.str) for g in groups for k, v in sorted(g.items()))


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while native libraries initialise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _clean(name: str) -> str:
    return name.split(":")[0]


def _output_names(model) -> list[str]:
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    return [_clean(t.name.split("/")[0]) for t in model.outputs]


_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16"}


def _float64_keras(model):
    """The Keras model rebuilt from its config with every float dtype set to float64, and its
    weights copied one at a time (``set_weights(get_weights())`` held every weight twice more
    at once: building ResNet50's copy and its first forward pass peaked 510 MB above the
    model, now 360, of which the copy keeps 275)."""
    try:
        clone = model.__class__.from_config(_retype(model.get_config()))
        if len(clone.weights) != len(model.weights):
            raise ValueError(f"the rebuilt model has {len(clone.weights)} weights, the model {len(model.weights)}")
        for mine, theirs in zip(clone.weights, model.weights):
            w = np.asarray(theirs)
            mine.assign(w.astype(np.float64) if w.dtype.kind == "f" else w)
    except Exception as e:
        raise LimitationError(f"cannot rebuild this Keras model in float64: {short(e)}") from None
    return clone


def _retype(config):
    """A Keras config with every float ``dtype`` (a name or a DTypePolicy) replaced by float64."""
    if isinstance(config, list):
        return [_retype(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for k, v in config.items():
        if k == "dtype" and isinstance(v, str) and v in _FLOAT_DTYPES:
            v = "float64"
        elif k == "dtype" and isinstance(v, dict) and v.get("config", {}).get("name") in _FLOAT_DTYPES:
            v = {**v, "config": {**v["config"], "name": "float64"}}
        else:
            v = _retype(v)
        out[k] = v
    return out


def _framework_error(e: BaseException) -> bool:
    """An error TensorFlow or Keras raised about the model or its inputs (not a bug of jacli's
    Python code, which keeps its traceback)."""
    return isinstance(e, (ValueError, TypeError, LookupError, NotImplementedError)) or \
        type(e).__module__.split(".")[0] in ("tensorflow", "keras", "tf_keras")


def _derivative_error(e: BaseException, what: str) -> JacliError:
    """What a failure of a derivative means, given that the model's forward pass runs."""
    cause = short(e)
    text = str(e)
    missing = re.search(r"No gradient defined for operation\s*'?[^' ]*'? \(op type: (\w+)\)", text) or \
        re.search(r"gradient registry has no entry for:? ?(\w+)", text)
    if missing:
        return LimitationError(f"TensorFlow has no gradient for the operation {missing.group(1)} in this model",
                               operator=missing.group(1), option="--method fd (finite differences)",
                               hint="method='fd' (finite differences)")
    return InternalError(f"{what} that jacli derived from the model failed, although the model's forward pass "
                         f"runs: {cause}")


_LOOP_OPS = ("While", "StatelessWhile")


def _operations(graph):
    """The operations of a graph and of every function it calls, directly or not."""
    seen, todo = set(), [graph]
    while todo:
        graph = todo.pop()
        if id(graph) in seen:
            continue
        seen.add(id(graph))
        yield from graph.get_operations()
        for function in getattr(graph, "_functions", {}).values():  # the functions this graph calls
            sub = getattr(function, "graph", None)
            if sub is not None:
                todo.append(sub)
