"""TensorFlow SavedModel directories (Keras 3 ``model.export()``, Keras 2
``model.save(dir)``, ``tf.saved_model.save``): loaded from a private copy checked first
(``savedmodel_checks``), their ``serving_default`` signature inlined into jacli's graphs
(``tf_inline``) or called as one function, and differentiated as a ``tf.TFModel``.
"""
from __future__ import annotations

from typing import Mapping

from ..errors import ModelLoadError
from ..model import TensorSpec
from ._common import short
from .tf import _LOOP_OPS, TFModel, _operations, _tf
from .tf_inline import NotInlined, inline


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
    sigs = getattr(loaded, "signatures", None)
    if not isinstance(sigs, Mapping):  # a damaged object graph: "signatures" names some other object
        raise ModelLoadError(f"SavedModel {path} has no signatures (its object graph names something else there)")
    if "serving_default" not in sigs:
        raise ModelLoadError(f"SavedModel {path} has no 'serving_default' signature (it has: {', '.join(sigs) or 'none'})")
    sig = sigs["serving_default"]
    if not isinstance(getattr(sig, "structured_outputs", None), Mapping):
        raise ModelLoadError(f"SavedModel {path}: its 'serving_default' signature does not return named tensors")
    # the signature's operations, traced into each of TFModel's graphs (tf_inline.py); where that
    # fails, the signature itself, called as one function-call op
    try:
        inlined = inline(tf, sig, trust)
        why = inlined.why_called()
    except NotInlined as e:
        inlined, why = None, str(e)
    if why:
        _restore_handle_data(sig)
    _, kw = sig.structured_input_signature
    inputs = [TensorSpec(n, tuple(s.shape), s.dtype.name) for n, s in kw.items()]
    outputs = [TensorSpec(n, tuple(s.shape), s.dtype.name) for n, s in sig.structured_outputs.items()]
    m = TFModel(path=path, format="savedmodel", backend="tensorflow", inputs=inputs, outputs=outputs,
                fn=sig if why else inlined, kwargs=True, supports_float64=True)
    m._keep = loaded  # the signature's variables live as long as the loaded object
    m.inlined, m.not_inlined = inlined, why  # the float64 copy is made from the inlined signature
    return m


def _restore_handle_data(fn) -> None:
    """Loops (``While``) in a loaded SavedModel carry the variables their body reads as loop
    variables; the loaded graphs give those outputs no handle data (the variable's dtype and
    shape), and TensorFlow then fails to differentiate the loop a second time, or in forward
    mode ("Tried to take gradients ... of a variable without handle data"). Each such output
    gets the handle data of its loop input, in every function the signature calls."""
    tf = _tf()
    try:
        from tensorflow.python.ops import handle_data_util
    except ImportError:  # a TensorFlow without this module: nothing to restore
        return
    for op in _operations(fn.graph):
        if op.type in _LOOP_OPS:
            for src, dst in zip(op.inputs, op.outputs):
                if dst.dtype == tf.resource and not handle_data_util.get_resource_handle_data(dst).is_set:
                    handle_data_util.copy_handle_data(src, dst)
