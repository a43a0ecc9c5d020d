"""Real Keras architectures at tiny sizes, saved in every format that can hold them, with
TensorFlow's own float64 autodiff on the same weights as the reference.

Each builder makes a Keras 3 model (TensorFlow backend) in the current float policy; the
reference rebuilds it under a float64 policy, copies the weights, and differentiates it
with ``tf.GradientTape``, one output element at a time (no jacli code involved).

Formats: ``keras`` (.keras), ``h5`` (Keras 3's legacy .h5), ``export`` (Keras 3
``model.export()``), ``tfsave`` (``tf.saved_model.save`` of a module calling the model), and
``tfk`` (Keras 2: the same architecture in tf_keras with the same weights, ``model.save(dir)``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # keras_custom_layers

CUSTOM_LAYERS = Path(__file__).resolve().parent / "keras_custom_layers.py"


@contextlib.contextmanager
def floatx(dtype: str):
    import keras

    before = keras.config.floatx(), keras.config.dtype_policy().name
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(before[0])
        keras.config.set_dtype_policy(before[1])


# --- builders: name -> (build(), inputs(rng, batch)) --------------------------------------
def _lstm():
    import keras

    x = keras.Input((5, 3), name="a")
    return keras.Model(x, keras.layers.LSTM(4, name="y")(x))


def _gru():
    import keras

    x = keras.Input((4, 3), name="a")
    return keras.Model(x, keras.layers.GRU(3, return_sequences=True, name="y")(x))


def _bilstm():
    import keras

    x = keras.Input((4, 3), name="a")
    return keras.Model(x, keras.layers.Bidirectional(keras.layers.LSTM(2), name="y")(x))


def _attention():
    """A transformer block's attention half: self-attention, residual, LayerNormalization."""
    import keras

    x = keras.Input((4, 6), name="a")
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(x, x)
    return keras.Model(x, keras.layers.LayerNormalization(name="y")(x + h))


def _embedding():
    """Integer token ids through an Embedding, joined with float features: only the float
    input is differentiated."""
    import keras

    ids, feats = keras.Input((5,), dtype="int32", name="a_ids"), keras.Input((3,), name="b_feats")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4)(ids))
    joined = keras.layers.Concatenate()([pooled, keras.layers.Dense(4, activation="tanh")(feats)])
    return keras.Model([ids, feats], keras.layers.Dense(2, name="y")(joined))


def _two_in_two_out():
    import keras

    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    y1 = keras.layers.Dense(2, name="y1")(keras.layers.Concatenate()([a, b]))
    y2 = keras.layers.Dense(3, activation="tanh", name="y2")(a)
    return keras.Model([a, b], [y1, y2])


def _custom():
    import keras
    from keras_custom_layers import ScaledSoftsign

    x = keras.Input((4,), name="a")
    return keras.Model(x, ScaledSoftsign(1.5, name="y")(keras.layers.Dense(3)(x)))


def _mobilenet():
    import keras

    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)


def _convnet():
    """MobileNetV3's blocks in miniature (strided conv, batch norm, hard-swish, depthwise
    conv, 1x1 conv, pooling): cheap enough to trace every map strategy in a test."""
    import keras

    x = keras.Input((12, 12, 3), name="a")
    h = keras.layers.Conv2D(6, 3, strides=2, padding="same")(x)
    h = keras.layers.Activation("hard_swish")(keras.layers.BatchNormalization()(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 1)(h))
    return keras.Model(x, keras.layers.Dense(20, name="y")(h))


def _mobilenet_v3():
    """Keras's own MobileNetV3Small, small: its hard-sigmoid is ``keras.ops`` arithmetic on a
    layer's output (``x + 3.0``, ``x * (1 / 6)``), which Keras 3's .h5 records without modules."""
    import keras

    return keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=4,
                                               include_preprocessing=False, classifier_activation=None)


def _convnext():
    """Keras's own ConvNeXt (keras.applications' constructor, one block a stage, narrow):
    LayerScale and StochasticDepth, layers its applications module defines; the layer scale
    large enough (0.5) that each block's branch counts in the Jacobian."""
    from keras.src.applications.convnext import ConvNeXt

    return ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 24, 32], drop_path_rate=0.1,
                    layer_scale_init_value=0.5, name="convnext_mini", include_preprocessing=False,
                    weights=None, input_shape=(32, 32, 3), classes=4, classifier_activation=None)


def _scaled_sum():
    """InceptionResNetV2's residual join, CustomScaleLayer (x + 0.17 * branch), on a small
    convolutional branch: the third layer Keras's applications define."""
    import keras
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    x = keras.Input((6, 6, 2), name="a")
    branch = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(x)
    h = CustomScaleLayer(scale=0.17)([x, branch])
    return keras.Model(x, keras.layers.Dense(3, name="y")(keras.layers.Flatten()(h)))


BUILDERS = {"lstm": _lstm, "gru": _gru, "bilstm": _bilstm, "attention": _attention, "embedding": _embedding,
            "two_io": _two_in_two_out, "custom": _custom, "mobilenet": _mobilenet, "convnet": _convnet,
            "mobilenet_v3": _mobilenet_v3, "convnext": _convnext, "scaled_sum": _scaled_sum}


# --- Keras applications (weights=None): CI size (32x32x1, 2 logits) or full (224x224x3, 1000) ------
APPLICATIONS = {  # name -> (keras.applications class, extra arguments)
    "mobilenet_v3_small": ("MobileNetV3Small", {"include_preprocessing": False}),  # inputs N(0, 1), not 0-255
    "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35}),
    "resnet50": ("ResNet50", {}),
    "efficientnet_b0": ("EfficientNetB0", {}),
}


def application(name: str, size: str = "ci"):
    """A Keras application with random weights (seeded) and logits as its output."""
    import keras

    keras.utils.set_random_seed(0)
    cls, extra = APPLICATIONS[name]
    shape, classes = ((32, 32, 1), 2) if size == "ci" else ((224, 224, 3), 1000)
    return getattr(keras.applications, cls)(input_shape=shape, weights=None, classes=classes,
                                            classifier_activation=None, **extra)


def save_with_custom_gradient(model, path: Path, factor: float, rows=(1,)) -> Path:
    """A Keras model of one input and one (batch, width) output as a SavedModel whose output
    passes through a ``tf.custom_gradient`` identity with gradient ``factor`` on the output
    entries ``rows`` (1 elsewhere), saved with the custom gradient."""
    import tensorflow as tf

    mask = np.ones(int(model.outputs[0].shape[-1]), np.float32)
    mask[list(rows)] = factor

    @tf.custom_gradient
    def planted(y):
        return tf.identity(y), lambda g: g * mask

    shape = tuple(model.inputs[0].shape[1:])
    module = tf.Module()
    module.model = model
    call = tf.function(lambda x: {"y": planted(model(x))},
                       input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="x")])
    tf.saved_model.save(module, str(path), signatures={"serving_default": call},
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=True))
    return path


def tf_keras_twin(name: str, model):
    """The same recurrent architecture in tf_keras (Keras 2), with the same weights."""
    import tf_keras

    layer = {"lstm": lambda: tf_keras.layers.LSTM(4), "gru": lambda: tf_keras.layers.GRU(3, return_sequences=True)}
    shape = {"lstm": (5, 3), "gru": (4, 3)}[name]
    x = tf_keras.Input(shape, name="a")
    twin = tf_keras.Model(x, layer[name]()(x))
    twin.set_weights(model.get_weights())
    return twin


def inputs(model, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in model.inputs:
        shape = (batch, *t.shape[1:])
        name = t.name.split(":")[0]
        out[name] = rng.integers(0, 20, shape).astype("int32") if "int" in str(t.dtype) else \
            rng.standard_normal(shape).astype(np.float32)
    return out


# --- saving --------------------------------------------------------------------------------
def save(name: str, model, fmt: str, directory: Path) -> Path:
    import tensorflow as tf

    path = directory / f"{name}_{fmt}"
    if fmt == "keras":
        path = path.with_suffix(".keras")
        model.save(path)
    elif fmt == "h5":
        path = path.with_suffix(".h5")
        model.save(path)
    elif fmt == "export":
        model.export(str(path), verbose=False)
    elif fmt == "tfsave":
        specs = [tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
        module = tf.Module()
        module.model = model
        def outputs(*xs):
            ys = model(list(xs) if len(xs) > 1 else xs[0])
            return {f"out{i}": y for i, y in enumerate(ys if isinstance(ys, (list, tuple)) else [ys])}

        call = tf.function(outputs, input_signature=specs)
        tf.saved_model.save(module, str(path), signatures={"serving_default": call})
    elif fmt == "tfk":
        tf_keras_twin(name, model).save(str(path))
    else:
        raise ValueError(fmt)
    return path


def output_index(model, name: str) -> int:
    """Which of the Keras model's outputs a loaded model's output is: ``output_i`` (export)
    and ``out<i>`` (tfsave) by number, else by Keras's own output name."""
    import re

    numbered = re.fullmatch(r"(?:output_|out)(\d+)", name)
    if numbered:
        return int(numbered.group(1))
    names = list(model.output_names)
    return names.index(name) if name in names else 0  # tf_keras names its single output after the layer


def input_index(model, name: str) -> int:
    names = [t.name.split(":")[0] for t in model.inputs]
    return names.index(name) if name in names or len(names) > 1 else 0


# --- the reference: TensorFlow's float64 autodiff ---------------------------------------------
def reference(name: str, model, xs: dict[str, np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    """J[(output index, float input index)] of shape (B, *out, *in), in float64: the model
    rebuilt under a float64 policy with the same weights, differentiated by GradientTape one
    output element at a time."""
    import tensorflow as tf

    with floatx("float64"):
        twin = BUILDERS[name]()
    twin.set_weights([w.astype(np.float64) if w.dtype.kind == "f" else w for w in model.get_weights()])
    names = [t.name.split(":")[0] for t in model.inputs]
    tensors = [tf.constant(xs[n].astype(np.float64) if xs[n].dtype.kind == "f" else xs[n]) for n in names]
    floats = [i for i, t in enumerate(tensors) if t.dtype.is_floating]
    with tf.GradientTape(persistent=True) as tape:
        for i in floats:
            tape.watch(tensors[i])
        ys = twin(tensors if len(tensors) > 1 else tensors[0], training=False)
        ys = ys if isinstance(ys, (list, tuple)) else [ys]
        flat = [tf.reshape(y, (y.shape[0], -1)) for y in ys]
        elements = [[f[:, j] for j in range(f.shape[1])] for f in flat]
    out = {}
    for o, (y, row) in enumerate(zip(ys, elements)):
        for i in floats:
            grads = [tape.gradient(e, tensors[i], unconnected_gradients=tf.UnconnectedGradients.ZERO) for e in row]
            J = np.stack([g.numpy() for g in grads], axis=1)  # (B, m, *in)
            out[o, i] = J.reshape((J.shape[0], *y.shape[1:], *tensors[i].shape[1:]))
    return out
