"""Models for the gradient-check tests, in every format, from seeded numpy weights.

Correct models: an MLP with softmax, a CNN (conv, ReLU, average pooling, softmax) and a
normalizing-flow affine coupling layer (y = [x1, x2·exp(s(x1)) + t(x1)], logdet = Σ s).
Broken ones: the coupling layer with a misplaced ``detach()`` on exp(s) (TorchScript), a
SavedModel whose ``tf.custom_gradient`` for z³ returns 2z² (TensorFlow), a ReLU layer to
be evaluated at a switch point, and batch-norm-in-training-style per-batch statistics.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

F32 = np.float32
MLP_IN, MLP_HIDDEN, MLP_OUT = 6, 12, 4
CUBE_ROWS = (3, 4)  # the outputs of the broken SavedModel that go through the wrong custom gradient


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) / np.sqrt(scale or shape[0])).astype(F32)

    return {
        "W1": w(MLP_IN, MLP_HIDDEN), "b1": w(MLP_HIDDEN, scale=10), "W2": w(MLP_HIDDEN, MLP_OUT), "b2": w(MLP_OUT, scale=10),
        "K": w(3, 3, 1, 3, scale=9), "kb": w(3, scale=10), "D": w(12, 3), "db": w(3, scale=10),  # CNN, HWIO kernel
        "C1": w(2, 8), "c1": w(8, scale=10), "Cs": w(8, 2), "Ct": w(8, 2),  # coupling
        "A": w(4, 3), "B": w(4, 2),  # broken SavedModel
    }


# --- TorchScript --------------------------------------------------------------------------
def torch_models(w: dict, out: Path) -> dict[str, Path]:
    import torch

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in w.items():
                self.register_buffer(k, torch.from_numpy(v.copy()))

    class MLP(Weights):
        def forward(self, x):
            return torch.softmax(torch.tanh(x @ self.W1 + self.b1) @ self.W2 + self.b2, dim=-1)

    class CNN(Weights):
        def forward(self, x):  # (B, 1, 6, 6) -> (B, 3)
            h = torch.relu(torch.nn.functional.conv2d(x, self.K.permute(3, 2, 0, 1), self.kb))
            h = torch.nn.functional.avg_pool2d(h, 2)
            return torch.softmax(h.permute(0, 2, 3, 1).reshape(-1, 12) @ self.D + self.db, dim=-1)

    class Coupling(Weights):
        def __init__(self, detach: bool):
            super().__init__()
            self.detach = detach

        def forward(self, x):
            x1, x2 = x[:, :2], x[:, 2:]
            h = torch.tanh(x1 @ self.C1 + self.c1)
            s = torch.tanh(h @ self.Cs)
            scale = torch.exp(s.detach() if self.detach else s)  # the bug: y2 loses d exp(s)/d x1
            y = torch.cat([x1, x2 * scale + h @ self.Ct], dim=1)
            return y, s.sum(dim=1)

    class Relu(Weights):
        def forward(self, x):
            return torch.relu(x @ self.W1 + self.b1) @ self.W2

    class BatchStats(Weights):
        def forward(self, x):  # normalised with the batch's own statistics, as batch norm in training mode
            z = (x - x.mean(dim=0, keepdim=True)) / (x.std(dim=0, keepdim=True) + 1e-3)
            return torch.tanh(z @ self.W1)

    models = {"mlp": MLP(), "cnn": CNN(), "coupling": Coupling(False), "coupling_detach": Coupling(True),
              "relu": Relu(), "batchstats": BatchStats()}
    paths = {}
    for name, module in models.items():
        paths[name] = out / f"{name}.pt"
        torch.jit.save(torch.jit.script(module.eval()), paths[name])
    return paths


# --- Keras (.keras) and SavedModel exports ------------------------------------------------
def keras_models(w: dict, out: Path) -> dict[str, Path]:
    import keras

    def mlp():
        x = keras.Input((MLP_IN,), name="x")
        h = keras.layers.Dense(MLP_HIDDEN, activation="tanh", name="h")(x)
        y = keras.layers.Dense(MLP_OUT, activation="softmax", name="probs")(h)
        m = keras.Model(x, y, name="mlp")
        m.get_layer("h").set_weights([w["W1"], w["b1"]])
        m.get_layer("probs").set_weights([w["W2"], w["b2"]])
        return m

    def cnn():
        x = keras.Input((6, 6, 1), name="x")
        h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(x)
        h = keras.layers.Flatten()(keras.layers.AveragePooling2D(2)(h))
        m = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="probs")(h), name="cnn")
        m.get_layer("conv").set_weights([w["K"], w["kb"]])
        m.get_layer("probs").set_weights([w["D"], w["db"]])
        return m

    def coupling():
        x = keras.Input((4,), name="x")
        x1, x2 = x[:, :2], x[:, 2:]
        h = keras.layers.Dense(8, activation="tanh", name="c1")(x1)
        s = keras.layers.Dense(2, activation="tanh", use_bias=False, name="s")(h)
        t = keras.layers.Dense(2, use_bias=False, name="t")(h)
        y = keras.layers.Concatenate(name="y")([x1, x2 * keras.ops.exp(s) + t])
        m = keras.Model(x, {"y": y, "logdet": keras.ops.sum(s, axis=-1)}, name="coupling")
        m.get_layer("c1").set_weights([w["C1"], w["c1"]])
        m.get_layer("s").set_weights([w["Cs"]])
        m.get_layer("t").set_weights([w["Ct"]])
        return m

    paths = {}
    for build in (mlp, cnn, coupling):
        m = build()
        paths[f"{m.name}.keras"] = out / f"{m.name}.keras"
        m.save(paths[f"{m.name}.keras"])
        paths[f"{m.name}_savedmodel"] = out / f"{m.name}_savedmodel"
        m.export(paths[f"{m.name}_savedmodel"], verbose=False)
    return paths


def savedmodel_wrong_custom_gradient(w: dict, out: Path) -> Path:
    """y = [tanh(x A), cube(x B)] where cube's custom gradient is 2z² instead of 3z²."""
    import tensorflow as tf

    @tf.custom_gradient
    def cube(z):
        def grad(dy):
            return dy * 2.0 * z * z  # wrong: d(z³)/dz = 3z²

        return z * z * z, grad

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = tf.Variable(w["A"]), tf.Variable(w["B"])

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.concat([tf.tanh(x @ self.A), cube(x @ self.B)], axis=1)}

    m = Model()
    path = out / "custom_gradient_savedmodel"
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
    return path


# --- ONNX -----------------------------------------------------------------------------------
def onnx_mlp(w: dict, out: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h0"]),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_IN])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", MLP_OUT])],
        [numpy_helper.from_array(w[k], k) for k in ("W1", "b1", "W2", "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = out / "mlp.onnx"
    onnx.save(model, path)
    return path


# --- numpy references -------------------------------------------------------------------------
def relu_preactivation(w: dict, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w["W1"] + w["b1"]


def near_switch(w: dict, x: np.ndarray, unit: int, offset: float = 1e-7) -> np.ndarray:
    """x moved along W1[:, unit] so that hidden unit ``unit``'s pre-activation is ``offset``:
    that ReLU is within the finite-difference step of its switch point."""
    col = w["W1"][:, unit].astype(np.float64)
    z = relu_preactivation(w, x)[unit]
    return (x + (offset - z) * col / (col @ col)).astype(F32)
