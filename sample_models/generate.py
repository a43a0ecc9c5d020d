"""Regenerate every sample model and input in this folder, deterministically.

    python sample_models/generate.py            (needs jacli[all]: torch, tensorflow, keras, tf_keras, onnx)
    python sample_models/generate.py GROUP ...  (only these: inputs, onnx, torch, torch_export, keras)

The same weights (numpy, seed 0) go into every format, so every format must give the
same Jacobian:
  mlp       500 -> 100 (tanh) -> 10 (softmax), the classic vectorised-backprop benchmark
  map2d     f(x, y) = (x^2 - y^2, 2xy), whose Jacobian [[2x, -2y], [2y, 2x]] is known in closed form
  multi     two named inputs a (3,), b (4,) -> two named outputs: s = tanh([a, b] W), p = a * (V b)
  mlp_b1    the mlp as ONNX with its batch axis fixed at 1 (jacli loops/chunks over a batch)
  mlp.pt2   the mlp as a torch.export program with a dynamic batch axis
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def weights():
    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "W1": (rng.standard_normal((500, 100)) / np.sqrt(500)).astype(f32),
        "b1": (0.1 * rng.standard_normal(100)).astype(f32),
        "W2": (rng.standard_normal((100, 10)) / np.sqrt(100)).astype(f32),
        "b2": (0.1 * rng.standard_normal(10)).astype(f32),
        # map2d as two linear maps and a product: [(x - y), x] * [(x + y), 2y]
        "P": np.array([[1, 1], [-1, 0]], f32),
        "Q": np.array([[1, 0], [1, 2]], f32),
        # multi
        "W": (rng.standard_normal((7, 5)) / np.sqrt(7)).astype(f32),
        "V": (rng.standard_normal((4, 3)) / 2).astype(f32),
    }


def inputs(w):
    rng = np.random.default_rng(1)
    np.save(HERE / "mlp_input.npy", rng.standard_normal((4, 500)).astype(np.float32))
    np.save(HERE / "map2d_input.npy", np.array([[1.5, 0.5], [1.0, -2.0], [0.0, 0.0]], np.float32))
    np.savez(HERE / "multi_input.npz", a=rng.standard_normal((3, 3)).astype(np.float32),
             b=rng.standard_normal((3, 4)).astype(np.float32))


# --- numpy references (used by the tests too) -------------------------------------------
def mlp_numpy(w, x):
    h = np.tanh(x @ w["W1"] + w["b1"])
    z = h @ w["W2"] + w["b2"]
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- torch ------------------------------------------------------------------------------
def torch_modules(w) -> dict:
    """The sample models as torch.nn.Modules: mlp, map2d, multi."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in w.items()}

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(500, 100), torch.nn.Linear(100, 10)
            with torch.no_grad():
                self.l1.weight.copy_(t["W1"].T), self.l1.bias.copy_(t["b1"])
                self.l2.weight.copy_(t["W2"].T), self.l2.bias.copy_(t["b2"])

        def forward(self, x):
            return torch.softmax(self.l2(torch.tanh(self.l1(x))), dim=-1)

    class Map2d(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("P", t["P"].clone())
            self.register_buffer("Q", t["Q"].clone())

        def forward(self, x):
            return (x @ self.P) * (x @ self.Q)

    class Multi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("W", t["W"].clone())
            self.register_buffer("V", t["V"].clone())

        def forward(self, a, b):
            return torch.tanh(torch.cat([a, b], dim=1) @ self.W), a * (b @ self.V)

    return {"mlp": MLP(), "map2d": Map2d(), "multi": Multi()}


def torch_models(w):
    import torch

    m = torch_modules(w)
    torch.jit.save(torch.jit.trace(m["mlp"].eval(), torch.zeros(2, 500)), HERE / "mlp.pt")
    torch.jit.save(torch.jit.script(m["map2d"]), HERE / "map2d.pt")
    torch.jit.save(torch.jit.script(m["multi"]), HERE / "multi.pt")


def export_program(module, example: tuple, dynamic_batch: bool = True):
    """``module`` (in eval mode) as a torch.export program, its inputs' batch axis one
    dynamic dimension (or fixed at the example's size); without stack traces, which would
    record this machine's paths."""
    import torch

    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in example) if dynamic_batch else None
    program = torch.export.export(module.eval(), example, dynamic_shapes=shapes)
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    return program


def torch_export_models(w):
    import torch

    torch.export.save(export_program(torch_modules(w)["mlp"], (torch.zeros(2, 500),)), HERE / "mlp.pt2")


# --- onnx ---------------------------------------------------------------------------------
def onnx_models(w):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(nodes, inputs, outputs, inits, name, batch="batch"):
        vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, *shape])  # noqa: E731
        graph = helper.make_graph(nodes, name, [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="jacli-samples")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, HERE / f"{name}.onnx")

    mlp_nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h0"]),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
    ]
    mlp_w = {k: w[k] for k in ("W1", "b1", "W2", "b2")}
    save(mlp_nodes, [("x", [500])], [("probs", [10])], mlp_w, "mlp")
    save(mlp_nodes, [("x", [500])], [("probs", [10])], mlp_w, "mlp_b1", batch=1)
    save([helper.make_node("MatMul", ["xy", "P"], ["u"]), helper.make_node("MatMul", ["xy", "Q"], ["v"]),
          helper.make_node("Mul", ["u", "v"], ["f"])], [("xy", [2])], [("f", [2])],
         {"P": w["P"], "Q": w["Q"]}, "map2d")
    save([helper.make_node("Concat", ["a", "b"], ["ab"], axis=1), helper.make_node("MatMul", ["ab", "W"], ["sw"]),
          helper.make_node("Tanh", ["sw"], ["s"]), helper.make_node("MatMul", ["b", "V"], ["bv"]),
          helper.make_node("Mul", ["a", "bv"], ["p"])],
         [("a", [3]), ("b", [4])], [("s", [5]), ("p", [3])], {"W": w["W"], "V": w["V"]}, "multi")


# --- keras / tensorflow -----------------------------------------------------------------
def keras_models(w):
    import keras

    def mlp(k):
        x = k.Input((500,), name="x")
        h = k.layers.Dense(100, activation="tanh", name="dense1")(x)
        y = k.layers.Dense(10, activation="softmax", name="probs")(h)
        model = k.Model(x, y, name="mlp")
        model.get_layer("dense1").set_weights([w["W1"], w["b1"]])
        model.get_layer("probs").set_weights([w["W2"], w["b2"]])
        return model

    def map2d(k):
        x = k.Input((2,), name="xy")
        u = k.layers.Dense(2, use_bias=False, name="P")(x)
        v = k.layers.Dense(2, use_bias=False, name="Q")(x)
        model = k.Model(x, k.layers.Multiply(name="f")([u, v]), name="map2d")
        model.get_layer("P").set_weights([w["P"]])
        model.get_layer("Q").set_weights([w["Q"]])
        return model

    def multi(k):
        a, b = k.Input((3,), name="a"), k.Input((4,), name="b")
        s = k.layers.Dense(5, use_bias=False, activation="tanh", name="s")(k.layers.Concatenate(axis=1)([a, b]))
        bv = k.layers.Dense(3, use_bias=False, name="bv")(b)
        p = k.layers.Multiply(name="p")([a, bv])
        model = k.Model([a, b], {"s": s, "p": p}, name="multi")
        model.get_layer("s").set_weights([w["W"]])
        model.get_layer("bv").set_weights([w["V"]])
        return model

    for build in (mlp, map2d, multi):
        m = build(keras)
        m.save(HERE / f"{m.name}.keras")
        _rm(HERE / f"{m.name}_savedmodel")
        m.export(HERE / f"{m.name}_savedmodel", verbose=False)
    mlp(keras).save(HERE / "mlp.h5")

    import tf_keras

    m = mlp(tf_keras)
    m.save(HERE / "mlp_tfkeras.h5")
    _rm(HERE / "mlp_tfkeras_savedmodel")
    m.save(HERE / "mlp_tfkeras_savedmodel", save_format="tf")


def _rm(p: Path):
    if p.exists():
        shutil.rmtree(p)


GROUPS = {"inputs": inputs, "onnx": onnx_models, "torch": torch_models, "torch_export": torch_export_models,
          "keras": keras_models}


def main(groups=()):
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        sys.exit(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    w = weights()
    for name, build in GROUPS.items():
        if not groups or name in groups:
            build(w)
    print("wrote", ", ".join(sorted(p.name for p in HERE.iterdir() if p.name != "generate.py" and not p.name.startswith("__"))))


if __name__ == "__main__":
    main(sys.argv[1:])
