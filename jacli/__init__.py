"""jacli: Jacobians of saved neural-network models, from the command line or Python.

    >>> import jacli
    >>> model = jacli.load("sample_models/mlp.onnx")
    >>> J = jacli.jacobian(model, x)          # (B, 10, 500) per-sample Jacobians

Imports no framework: each backend is imported when a model of its format is loaded.
"""
__version__ = "0.1.0"

__all__ = ["load", "jacobian", "check", "svd", "det", "diff", "__version__"]


def load(path, format=None, trust=False, custom_objects=()):
    from .api import load as _load

    return _load(path, format=format, trust=trust, custom_objects=custom_objects)


def jacobian(model, x, **kwargs):
    from .api import jacobian as _jacobian

    return _jacobian(model, x, **kwargs)


load.__doc__ = "Load a saved model; see jacli.api.load."
jacobian.__doc__ = "The Jacobian of a model at x; see jacli.api.jacobian."


def check(model, x, **kwargs):
    from .api import check as _check

    return _check(model, x, **kwargs)


check.__doc__ = "Check a model's automatic derivatives against finite differences at x; see jacli.api.check."


def svd(model, x, **kwargs):
    from .api import svd as _svd

    return _svd(model, x, **kwargs)


def det(model, x, **kwargs):
    from .api import det as _det

    return _det(model, x, **kwargs)


svd.__doc__ = "Singular values and condition numbers of a model's per-sample Jacobians at x; see jacli.api.svd."
det.__doc__ = "sign, log|det| and det of a model's square per-sample Jacobians at x; see jacli.api.det."


def diff(a, b, x=None, **kwargs):
    from .api import diff as _diff

    return _diff(a, b, x, **kwargs)


diff.__doc__ = "Compare two models' outputs and Jacobians (or a model with a baseline file); see jacli.api.diff."
