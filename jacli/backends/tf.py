"""Keras (``.keras``, ``.h5`` from Keras 3 or Keras 2/tf_keras) and TensorFlow SavedModel
directories (Keras 3 ``model.export()``, Keras 2 ``model.save(dir)``, ``tf.saved_model.save``).

Derivatives come from TensorFlow's autodiff inside ``tf.function``: VJPs with
``GradientTape.gradient(output_gradients=...)``, JVPs with ``ForwardAccumulator``; each
compiled once per input signature and reused, so repeated blocks do not re-trace.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Sequence

import numpy as np

from ..errors import InputError, ModelLoadError, UnsafeModelError, UnsupportedError
from ..model import Model, TensorSpec
from ._common import Constants, require, short

UNROLL = 16  # up to this many cotangents, the sequential VJP is unrolled in the graph


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


def load_keras(path: str, trust: bool = False) -> "TFModel":
    from .keras_checks import checked_copy

    tf = _tf()
    keras = require("keras", "keras", "tf", "Keras")
    # Keras loads a private copy, checked first (unless trusted); safe_mode is the second line of defence
    with checked_copy(path, trust) as (local, route):
        try:
            model = keras.saving.load_model(local, compile=False, safe_mode=not trust)
        except ValueError as e:
            if "safe_mode" in str(e) or "lambda" in str(e).lower():
                raise UnsafeModelError(
                    f"{path} contains a Lambda layer whose Python bytecode would run on load; "
                    "pass --trust-model if you trust its source"
                ) from None
            model = _load_tf_keras(path, local, route, trust, e)
        except Exception as e:
            model = _load_tf_keras(path, local, route, trust, e)
    fn = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), reduce_retracing=True)
    inputs = [TensorSpec(_clean(t.name), tuple(t.shape), t.dtype if isinstance(t.dtype, str) else t.dtype.name) for t in model.inputs]
    outputs = [
        TensorSpec(name, tuple(t.shape), t.dtype if isinstance(t.dtype, str) else t.dtype.name)
        for name, t in zip(_output_names(model), model.outputs)
    ]
    m = TFModel(path=path, format="keras", backend="tensorflow", inputs=inputs, outputs=outputs, fn=fn, kwargs=False,
                supports_float64=True)
    m.keras_model = model  # rebuilt in float64 when first needed (_forward64)
    return m


def _load_tf_keras(path: str, local: str, route: str, trust: bool, first: Exception):
    """Keras 2 (tf_keras) .h5 files that Keras 3 cannot read: the same checked HDF5 copy."""
    first_error = short(first).replace(local, path)
    if route != "hdf5":
        raise ModelLoadError(f"cannot load Keras model {path}: {first_error}") from None
    try:
        import tf_keras
    except ImportError:
        raise ModelLoadError(f"cannot load Keras model {path}: {first_error} (installing tf_keras may help)") from None
    try:
        return tf_keras.models.load_model(local, compile=False, safe_mode=not trust)
    except Exception as e:
        raise ModelLoadError(f"cannot load Keras model {path}: {short(e).replace(local, path)}") from None


def load_savedmodel(path: str, trust: bool = False) -> "TFModel":
    from .savedmodel_checks import checked_copy

    tf = _tf()
    # tf.saved_model.load runs graph code (resource initialisers, TF1 init ops): it loads a private copy,
    # checked first unless trusted
    with checked_copy(path, trust) as local:
        try:
            loaded = tf.saved_model.load(local)
        except Exception as e:
            raise ModelLoadError(f"cannot load SavedModel {path}: {short(e).replace(local, path)}") from None
    sigs = getattr(loaded, "signatures", {})
    if "serving_default" not in sigs:
        raise ModelLoadError(f"SavedModel {path} has no 'serving_default' signature (it has: {', '.join(sigs) or 'none'})")
    sig = sigs["serving_default"]
    _, kw = sig.structured_input_signature
    inputs = [TensorSpec(n, tuple(s.shape), s.dtype.name) for n, s in kw.items()]
    outputs = [TensorSpec(n, tuple(s.shape), s.dtype.name) for n, s in sig.structured_outputs.items()]
    m = TFModel(path=path, format="savedmodel", backend="tensorflow", inputs=inputs, outputs=outputs, fn=sig, kwargs=True)
    m._keep = loaded  # the signature's variables live as long as the loaded object
    return m


class TFModel(Model):
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

        # one cotangent/tangent per call; or k of them after one forward pass, vectorised with pfor or
        # (cotangents) one after another
        self._vjp_fn = tf.function(lambda xs, cts, mask: pullback(xs, mask)(cts), reduce_retracing=True)
        self._vjp_map_fn = tf.function(
            lambda xs, cts, mask: tf.vectorized_map(pullback(xs, mask, persistent=True), cts), reduce_retracing=True)
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
        self._jvp_fn = tf.function(pushforward, reduce_retracing=True)
        self._jvp_map_fn = tf.function(
            lambda xs, ts, of: tf.vectorized_map(lambda t: pushforward(xs, t, of), ts), reduce_retracing=True)
        self._call_fn = tf.function(call, reduce_retracing=True)
        self._graphs = {}  # see _traced
        self._seeds = Constants(tf.constant)

    def _xs(self, xs):
        return [xs[s.name] for s in self.inputs]

    def _run(self, f, *args):
        try:
            return f(*args)
        except (ValueError, TypeError) as e:
            raise InputError(f"the model rejected the input: {short(e)}") from None
        except Exception as e:  # tf.errors.* on bad shapes reach here
            if type(e).__module__.startswith("tensorflow"):
                raise InputError(f"the model rejected the input: {short(e)}") from None
            raise

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
        """Keras models only: the same layers rebuilt with a float64 dtype policy, weights copied."""
        if getattr(self, "_fn64", None) is None:
            model64 = _float64_keras(self.keras_model)
            self._fn64 = _tf().function(lambda *a: model64(list(a) if len(a) > 1 else a[0], training=False),
                                        reduce_retracing=True)
        out = self._run(self._fn64, *[v.astype(np.float64) if v.dtype.kind == "f" else v for v in self._xs(xs)])
        if not isinstance(out, dict):
            out = dict(zip(self.output_names(), out if isinstance(out, (list, tuple)) else [out]))
        return {k: np.asarray(v) for k, v in out.items()}

    def _vjp(self, xs, cts, wrt: Sequence[str], fn=None, seed_axes=(0,)):
        mask = tuple(s.name in wrt for s in self.inputs)
        grads = self._run(self._traced, fn or self._vjp_fn, seed_axes, self._xs(xs), dict(cts), mask)
        names = [s.name for s in self.inputs if s.name in wrt]
        return {n: np.asarray(g) for n, g in zip(names, grads)}

    def _jvp(self, xs, ts, of: Sequence[str], fn=None, seed_axes=(0,)):
        outs = self._run(self._traced, fn or self._jvp_fn, seed_axes, self._xs(xs), dict(ts), tuple(of))
        return {k: np.asarray(v) for k, v in outs.items()}

    def _map_strategies(self, prim) -> tuple[str, ...]:
        return ("vectorised", "sequential") if prim == self._vjp else ("vectorised",)

    def _vjp_jvp_map(self, prim, xs, seeds, names, strategy=""):
        if prim != self._vjp:
            return self._jvp(xs, seeds, names, fn=self._jvp_map_fn, seed_axes=(0, 1))
        if strategy != "sequential":
            return self._vjp(xs, seeds, names, fn=self._vjp_map_fn, seed_axes=(0, 1))
        if len(next(iter(seeds.values()))) <= UNROLL:  # k static: one graph per k, no loop overhead
            return self._vjp(xs, seeds, names, fn=self._vjp_unrolled_fn, seed_axes=(1,))
        return self._vjp(xs, seeds, names, fn=self._vjp_seq_fn, seed_axes=(0, 1))


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
    """The Keras model rebuilt from its config with every float dtype set to float64, and its weights copied."""
    try:
        clone = model.__class__.from_config(_retype(model.get_config()))
        clone.set_weights([w.astype(np.float64) if w.dtype.kind == "f" else w for w in model.get_weights()])
    except Exception as e:
        raise UnsupportedError(f"cannot rebuild this Keras model in float64: {short(e)}") from None
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
