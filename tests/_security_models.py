"""Malicious (and matching harmless) model files for tests/test_security.py.

Every malicious payload does one visible, harmless thing: it creates the file ``marker``.
A test that loads such a model without --trust-model asserts that the marker does not
exist; the same model with --trust-model must create it, which proves the payload is live
and that the refusal is what stopped it.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]], np.float32)  # 3 -> 2 weights shared by the TF models


# --- torch ------------------------------------------------------------------------------
class _OpensMarker:
    """Unpickling this calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_pickles(d: Path, marker: str) -> dict[str, Path]:
    import torch

    files = {"zip": d / "evil_zip.pt", "legacy": d / "evil_legacy.pt", "legacy_pkl": d / "evil_legacy.pkl"}
    torch.save({"model": _OpensMarker(marker)}, files["zip"])
    torch.save({"model": _OpensMarker(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"model": _OpensMarker(marker)}, files["legacy_pkl"], _use_new_zipfile_serialization=False)
    return files


def torch_sequential(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A plain torch.save of Linear(3, 2) + Tanh; returns its weight and bias."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    torch.save(module, path)
    return module[0].weight.detach().numpy().copy(), module[0].bias.detach().numpy().copy()


def torchscript_from_file(path: Path, marker: str) -> None:
    """A TorchScript archive whose __setstate__ (run by torch.jit.load) calls torch.from_file,
    which creates ``marker``. TorchScript's compiler drops an unused from_file, so the
    archive's code is edited the way an attacker would write it."""
    import torch
    from typing import Tuple

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

        @torch.jit.export
        def __getstate__(self):
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]):
            self.w = state[0]
            self.training = state[1]

    clean = path.with_name("clean_" + path.name)
    torch.jit.save(torch.jit.script(Scale()), clean)
    payload = (f'    t = torch.from_file("{marker}", True, 16, dtype=0)\n'
               '    self.training = bool(torch.ge(torch.sum(t), 0))\n    self.w = (state)[0]\n')
    edited = 0
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py") and b"    self.w = (state)[0]\n" in data:
                data = data.replace(b"    self.w = (state)[0]\n", payload.encode())
                edited += 1
            dst.writestr(info, data)
    assert edited == 1


# --- torch.export (.pt2) --------------------------------------------------------------------
B = np.array([0.5, -0.25], np.float32)  # bias of the .pt2 programs: y = tanh(x W + B)


class _ZerosOpeningMarker:
    """Unpickling this creates ``marker`` and gives torch.zeros(2, 3): a valid sample input."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        code = f"__import__('builtins').open({self.marker!r}, 'w').close() or __import__('torch').zeros(2, 3)"
        return (eval, (code,))


def torch_export_archives(d: Path, marker: str) -> dict[str, Path]:
    """A clean .pt2 program y = tanh(x W + B) (batch axis dynamic), and copies whose payload
    creates ``marker`` from a place where loading or running a .pt2 runs Python code. Each
    payload leaves the program working (trusted, it gives the clean Jacobian), so only the
    refusal stops it:
      pickle      the sample inputs: a pickle that only torch.load(weights_only=False) reads,
                  which torch.export.load falls back to (while loading)
      expression  a shape expression, which sympy.sympify evaluates (while loading)
      guard       a shape guard, compiled into the program's module (on every call)
      path        a parameter path that leaves the quoted string torch writes it into, in
                  the module's generated code (on every call)"""
    import torch

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            with torch.no_grad():
                self.lin.weight.copy_(torch.from_numpy(W.T)), self.lin.bias.copy_(torch.from_numpy(B))

        def forward(self, x):
            return torch.tanh(self.lin(x))

    batch = {0: torch.export.Dim("batch")}
    files = {kind: d / f"{kind}.pt2" for kind in ("clean", "pickle", "expression", "guard", "path")}
    program = torch.export.export(Dense().eval(), (torch.zeros(2, 3),), dynamic_shapes=(batch,))
    torch.export.save(program, files["clean"])
    opens = f"__import__('builtins').open({marker!r}, 'w').close()"

    def pickle(members):
        buffer = io.BytesIO()
        torch.save(((_ZerosOpeningMarker(marker),), {}), buffer)
        members["data/sample_inputs/model.pt"] = buffer.getvalue()

    def expression(program):
        sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] += f" + 0*Max(0, {opens} or 0)"

    def guard(program):
        program["guards_code"] = [f"{opens} is None"]

    def path(members):
        path_without_dots = f'str(bytes({tuple(marker.encode())}), "ascii")'
        opens_without_dots = f'getattr(__import__("builtins"), "open")({path_without_dots}, "w")'
        lin = 'getattr(self, "lin")'
        name = (f'lin._parameters")[list(getattr({lin}, "_parameters"))[{opens_without_dots} and -1]] '
                f'if 1 else getattr({lin}, "')
        assert "." not in name[4:]  # torch splits a path at its dots
        program = json.loads(members["models/model.json"])
        for spec in program["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "lin.bias":
                spec["parameter"]["parameter_name"] = name
        members["models/model.json"] = json.dumps(program).encode()
        config = json.loads(members["data/weights/model_weights_config.json"])
        config["config"][name] = config["config"].pop("lin.bias")
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    pt2_edited(files["clean"], files["pickle"], pickle)
    pt2_edited(files["clean"], files["expression"], program_edit(expression))
    pt2_edited(files["clean"], files["guard"], program_edit(guard))
    pt2_edited(files["clean"], files["path"], path)
    return files


def program_edit(edit):
    """An edit of a .pt2's members that passes its program (models/model.json) through ``edit``."""

    def apply(members):
        program = json.loads(members["models/model.json"])
        edit(program)
        members["models/model.json"] = json.dumps(program).encode()

    return apply


def pt2_edited(src: Path, dst: Path, edit) -> None:
    """A copy of the .pt2 archive ``src`` whose members, named without the archive's top
    folder as torch names them, went through ``edit(members: dict[str, bytes])``."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n[len(root) + 1:]: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)


# --- keras ----------------------------------------------------------------------------------
def keras_lambdas(d: Path, marker: str) -> dict[str, Path]:
    """The same Lambda model as Keras 3 .keras, Keras 3 legacy .h5 and tf_keras .h5. The
    lambda's body creates ``marker``; Keras calls it while rebuilding the model."""
    import keras
    import tf_keras

    body = f"lambda t: __import__('pathlib').Path({marker!r}).write_text('pwned') and t * 2"

    def build(k):
        x = k.Input((3,), name="x")
        y = k.layers.Lambda(eval(body))(x)
        return k.Model(x, k.layers.Dense(2, name="dense")(y))

    files = {"keras": d / "lambda.keras", "keras3_h5": d / "lambda_k3.h5", "tf_keras_h5": d / "lambda_tfk.h5"}
    build(keras).save(files["keras"])
    build(keras).save(files["keras3_h5"])
    build(tf_keras).save(files["tf_keras_h5"])
    Path(marker).unlink(missing_ok=True)  # building the models ran the lambda
    return files


def keras_with_config(src: Path, dst: Path, edit) -> None:
    """A copy of the .keras archive ``src`` whose config.json went through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(info, data)


def h5_with_config(src: Path, dst: Path, edit) -> None:
    """A copy of the Keras .h5 file ``src`` whose model_config went through ``edit``."""
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)


# --- tensorflow SavedModel ------------------------------------------------------------------
def savedmodels(d: Path, marker: str) -> dict[str, Path]:
    """TF2 SavedModels (y = x @ W) that write ``marker`` from different places, plus clean
    ones, and TF1 SavedModels with and without a writing init op."""
    import tensorflow as tf

    sig = [tf.TensorSpec([None, 3], tf.float32, name="x")]

    class Clean(tf.Module):
        def __init__(self):
            self.w = tf.Variable(W)

        @tf.function(input_signature=sig)
        def serve(self, x):
            return {"y": tf.matmul(x, self.w)}

    class WritesInServe(Clean):
        @tf.function(input_signature=sig)
        def serve(self, x):
            tf.io.write_file(marker, "pwned")
            return {"y": tf.matmul(x, self.w)}

    class PyFuncInServe(Clean):
        @tf.function(input_signature=sig)
        def serve(self, x):
            y = tf.py_function(lambda t: t, [x], tf.float32)
            return {"y": tf.matmul(tf.reshape(y, [-1, 3]), self.w)}

    class UnreachableWriter(Clean):  # a function nothing in loading or serving calls
        @tf.function(input_signature=[])
        def dump(self):
            tf.io.write_file(marker, "pwned")
            return tf.constant(0)

    @tf.custom_gradient
    def identity_writing_gradient(x):
        def grad(dy):
            tf.io.write_file(marker, "pwned")
            return dy

        return tf.identity(x), grad

    class WritesInGradient(Clean):
        @tf.function(input_signature=sig)
        def serve(self, x):
            return {"y": tf.matmul(identity_writing_gradient(x), self.w)}

    class WritingResource(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="jacli_test_resource")

        def _initialize(self):  # tf.saved_model.load runs this
            tf.io.write_file(marker, "pwned")
            return tf.constant(0)

    class WritesOnLoad(Clean):
        def __init__(self):
            super().__init__()
            self.resource = WritingResource()

        @tf.function(input_signature=sig)
        def serve(self, x):
            _ = self.resource.resource_handle
            return {"y": tf.matmul(x, self.w)}

    out = {}
    for cls in (Clean, WritesInServe, PyFuncInServe, UnreachableWriter, WritesInGradient, WritesOnLoad):
        m = cls()
        out[cls.__name__] = d / cls.__name__
        tf.saved_model.save(m, str(out[cls.__name__]), signatures={"serving_default": m.serve})
    for name, writes in (("TF1Clean", False), ("TF1WritesOnLoad", True)):
        out[name] = d / name
        _tf1_savedmodel(out[name], marker if writes else None)
    Path(marker).unlink(missing_ok=True)
    return out


def _tf1_savedmodel(path: Path, marker: str | None) -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 3], name="x")
        w = v1.get_variable("w", initializer=tf.constant(W))
        y = tf.matmul(x, w)
        main_op = tf.group(tf.io.write_file(marker, "pwned")) if marker else None
        with v1.Session() as s:
            s.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            signature = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(s, ["serve"], signature_def_map={"serving_default": signature},
                                                 main_op=main_op)
            builder.save()


def savedmodel_with_asset(src: Path, dst: Path, filename: str) -> None:
    """A copy of the SavedModel ``src`` that declares an asset file named ``filename``."""
    import shutil

    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(src, dst)
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((dst / "saved_model.pb").read_bytes())
    asset = sm.meta_graphs[0].asset_file_def.add()
    asset.filename = filename
    asset.tensor_info.name = "asset_path:0"
    (dst / "saved_model.pb").write_bytes(sm.SerializeToString())


# --- onnx -----------------------------------------------------------------------------------
def onnx_matmul(path: Path, external_location: str | None = None, custom_domain: str | None = None) -> None:
    """y = x @ W (x: (batch, 3)); W inline, or stored as external data at ``external_location``
    (relative to the model's directory); with ``custom_domain``, an extra op from that domain."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    opsets = [helper.make_opsetid("", 17)]
    if custom_domain:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"]),
                 helper.make_node("Evil", ["y0"], ["y"], domain=custom_domain)]
        opsets.append(helper.make_opsetid(custom_domain, 1))
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if external_location is not None:
        tensor = model.graph.initializer[0]
        data_file = (path.parent / external_location)
        if not data_file.exists():
            data_file.parent.mkdir(parents=True, exist_ok=True)
            data_file.write_bytes(W.tobytes())
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", str(W.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, path)


# --- issue 11: files that fooled the checks of earlier releases -------------------------------
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def keras_polyglots(d: Path, marker: str) -> dict[str, Path]:
    """tf_keras models with a Lambda (and a ThresholdedReLU, which Keras 3 removed, so that
    Keras 3 fails and tf_keras, whose .h5 loader ignores safe_mode, is tried) hidden where a
    check reading the first bytes does not look:
      zip_h5     a harmless .keras zip at byte 0, the HDF5 model in the user block (65536)
      userblock  junk at byte 0, the HDF5 model at 512 (for --format keras on a .bin)
      prefixed   a Keras 3 .keras Lambda archive after 100 bytes of junk (zip readers accept it)
    Each is live: tf_keras (or Keras) itself runs the lambda."""
    import h5py
    import tf_keras

    body = f"lambda t: __import__('pathlib').Path({marker!r}).write_text('pwned') and t * 2"
    x = tf_keras.Input((3,), name="x")
    y = tf_keras.layers.ThresholdedReLU(0.0)(tf_keras.layers.Lambda(eval(body))(x))
    model = tf_keras.Model(x, tf_keras.layers.Dense(2, name="dense")(y))
    files = {"zip_h5": d / "polyglot.h5", "userblock": d / "userblock.bin", "prefixed": d / "prefixed.keras"}
    for name, block in (("zip_h5", 65536), ("userblock", 512)):
        with h5py.File(files[name], "w", userblock_size=block) as f:
            model.save(f)
        data = bytearray(files[name].read_bytes())
        assert data[block:block + 8] == HDF5_SIGNATURE
        front = io.BytesIO()
        with zipfile.ZipFile(front, "w") as z:  # harmless, as the first bytes show it
            z.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"layers": []}}))
            z.writestr("model.weights.h5", b"")
        front = front.getvalue() if name == "zip_h5" else b"junk" * 16
        data[:len(front)] = front
        files[name].write_bytes(bytes(data))
    lambdas = keras_lambdas(d, marker)
    files["prefixed"].write_bytes(b"#" * 100 + lambdas["keras"].read_bytes())
    Path(marker).unlink(missing_ok=True)
    return files


def torchscript_torch_save(path: Path, marker: str) -> None:
    """A scripted module whose forward calls torch.save (aten::save), writing ``marker``."""
    import torch

    class Saver(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.target = marker

        def forward(self, x):
            torch.save(x, self.target)
            return x * self.w

    torch.jit.save(torch.jit.script(Saver()), path)


def torchscript_with_code(clean: Path, path: Path, old: bytes, new: bytes) -> None:
    """A copy of the TorchScript archive ``clean`` with ``old`` replaced by ``new`` in its code."""
    edited = 0
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py") and old in data:
                data, edited = data.replace(old, new), edited + 1
            dst.writestr(info, data)
    assert edited


def savedmodel_two_serving_defaults(d: Path, marker: str) -> Path:
    """A TF2 SavedModel whose signature map holds two children named serving_default: the
    first clean, the last (the one TensorFlow keeps) writing ``marker``."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    sig = [tf.TensorSpec([None, 3], tf.float32, name="x")]

    class Two(tf.Module):
        def __init__(self):
            self.w = tf.Variable(W)

        @tf.function(input_signature=sig)
        def serve(self, x):
            return {"y": tf.matmul(x, self.w)}

        @tf.function(input_signature=sig)
        def writes(self, x):
            tf.io.write_file(marker, "pwned")
            return {"y": tf.matmul(x, self.w)}

    m, path = Two(), d / "TwoServingDefaults"
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve, "zz_other": m.writes})
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    nodes = sm.meta_graphs[0].object_graph_def.nodes
    signatures = next(ref.node_id for ref in nodes[0].children if ref.local_name == "signatures")
    renamed = [ref for ref in nodes[signatures].children if ref.local_name == "zz_other"]
    assert len(renamed) == 1
    renamed[0].local_name = "serving_default"
    (path / "saved_model.pb").write_bytes(sm.SerializeToString())
    Path(marker).unlink(missing_ok=True)
    return path


def savedmodel_tf1_save_tensor_trick(d: Path, marker: str) -> Path:
    """A TF1 SavedModel whose main op writes ``marker``, and whose saver_def names that op as
    its save tensor (a check that skips the save subgraph skips it)."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = d / "TF1SaveTensorTrick"
    _tf1_savedmodel(path, marker)
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    meta = sm.meta_graphs[0]
    (main_op,) = meta.collection_def["saved_model_main_op"].node_list.value
    meta.saver_def.save_tensor_name = main_op
    (path / "saved_model.pb").write_bytes(sm.SerializeToString())
    Path(marker).unlink(missing_ok=True)
    return path
