"""ONNX models, run by onnxruntime (CPU).

* ``model``: the loader and :class:`OnnxModel` (forward, VJP, JVP through derived graphs)
* ``arena``: the one onnxruntime memory arena all of jacli's sessions share
* ``cache``: the on-disk cache of checked signatures and derived graphs
* ``derive``: VJP/JVP graphs by graph transformation, with ``graph`` (what rules build
  with) and ``rules/`` (one module per operator family, registered in ``rules.registry``)
* ``float64``: the model in double precision, for finite differences
* ``locate``: intermediate tensors and their J·v, for ``jacli diff --locate``
"""
from .model import OnnxModel, load

__all__ = ["OnnxModel", "load"]
