"""The ONNX project's CNN architectures (onnx/backend/test/data/light, shipped in the onnx
wheel) with random weights, for the gradient-check tests and benchmarks.

The light models hold no weights: each weight is a ConstantOfShape node of its shape. Here
each becomes a seeded random initializer — He-scaled (N(0, 2/fan_in)) for Conv and Gemm
weights, small biases, BatchNorm scales in [0.5, 1.5] and variances in [0.5, 2] (also the
Mul/Add pairs DenseNet-121 and Inception-v2 spell batch norm with) — the final Softmax is
dropped (its saturated outputs say little about a gradient), and the batch axis is made
dynamic (a Reshape to a leading 1 copies the batch size instead). The input stays
3x224x224: their Reshapes and 7x7 pools fix it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet", "vgg19",
         "zfnet512")
# rough cost of one 224x224 forward pass, GFLOP (for choosing what CI can afford)
GFLOP = {"bvlc_alexnet": 0.7, "densenet121": 2.9, "inception_v1": 1.6, "inception_v2": 2.0, "resnet50": 4.1,
         "shufflenet": 0.14, "squeezenet": 0.35, "vgg19": 19.6, "zfnet512": 1.2}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model ``name`` (one of NAMES) with random weights, no final Softmax and a
    dynamic batch axis."""
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    g = model.graph
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i, name_in in enumerate(n.input):
            consumers.setdefault(name_in, []).append((n, i))
    made, keep = [], []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[n.input[0]])
            made.append(numpy_helper.from_array(_weight(rng, shape, _role(n.output[0], consumers)), n.output[0]))
        else:
            keep.append(n)
    last = keep[-1]
    if last.op_type == "Softmax":
        keep.pop()
        g.output[0].name = last.input[0]
    used = {i for n in keep for i in n.input}
    for n in keep:
        if n.op_type == "Reshape" and n.input[1] in shapes and shapes[n.input[1]].size and shapes[n.input[1]][0] == 1:
            target = shapes[n.input[1]].copy()
            target[0] = 0  # copy the batch size
            shapes[n.input[1]] = target
    inits = [numpy_helper.from_array(v, k) for k, v in shapes.items() if k in used]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(inits + made)
    init = {t.name for t in g.initializer} | set(shapes)
    kept_inputs = [v for v in g.input if v.name not in init]
    for v in [*kept_inputs, *g.output]:
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del g.input[:]
    g.input.extend(kept_inputs)
    del g.value_info[:]
    model.ir_version = max(model.ir_version, 7)  # initializers need not be graph inputs
    onnx.checker.check_model(model)
    return model


def _role(name: str, consumers: dict) -> tuple[str, int, dict]:
    """(op, input position, attributes) of the first consumer, looking through Unsqueeze."""
    while True:
        node, i = consumers[name][0]
        if node.op_type != "Unsqueeze":
            return node.op_type, i, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        name = node.output[0]


def _weight(rng, shape, role) -> np.ndarray:
    op, i, attrs = role
    if op == "Conv" and i == 1:
        w = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[1] * int(np.prod(shape[2:]))))
    elif op == "Gemm" and i == 1:
        w = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[1] if attrs.get("transB") else shape[0]))
    elif (op == "BatchNormalization" and i == 1) or op == "Mul":
        w = rng.uniform(0.5, 1.5, shape)
    elif op == "BatchNormalization" and i == 4:
        w = rng.uniform(0.5, 2.0, shape)
    else:  # biases, BatchNorm shifts and means
        w = 0.1 * rng.standard_normal(shape)
    return w.astype(np.float32)


def save(name: str, directory, seed: int = 0) -> Path:
    path = Path(directory) / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(name, seed), str(path))
    return path
