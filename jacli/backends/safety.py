"""Static checks on untrusted model files, run before a framework is handed the file.

Each ``*_problems`` function reads the file as data (zip entries, JSON, protocol buffers),
never through the framework's loader, and returns a list of human-readable problems; an
empty list means nothing was found. ``refuse`` turns problems into one UnsafeModelError.
What each format can do on load, and why these checks look where they do, is in
docs/security.md.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from collections import deque
from pathlib import Path

from ..errors import ModelLoadError, UnsafeModelError


def refuse(path: str, problems: list[str]) -> None:
    """Raise UnsafeModelError listing ``problems`` (at most a handful, then a count)."""
    if not problems:
        return
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise UnsafeModelError(f"refusing to load {path}: {shown}. Pass --trust-model only if you trust its source")


# --- TensorFlow SavedModel ------------------------------------------------------------------
_TF_OPS = {
    "runs Python code": "PyFunc PyFuncStateless EagerPyFunc",
    "reads files": (
        "ReadFile MatchingFiles ImmutableConst InitializeTableFromTextFile InitializeTableFromTextFileV2 "
        "GenerateVocabRemapping LoadAndRemapMatrix RecordInput Restore RestoreV2 RestoreSlice DTensorRestoreV2 "
        "WholeFileReader WholeFileReaderV2 TextLineReader TextLineReaderV2 FixedLengthRecordReader "
        "FixedLengthRecordReaderV2 TFRecordReader TFRecordReaderV2 LMDBReader TFRecordDataset TFRecordDatasetV2 "
        "TextLineDataset FixedLengthRecordDataset FixedLengthRecordDatasetV2 CSVDataset CSVDatasetV2 "
        "ExperimentalCSVDataset SqlDataset ExperimentalSqlDataset LMDBDataset ExperimentalLMDBDataset "
        "MatchingFilesDataset ExperimentalMatchingFilesDataset LoadDataset SnapshotDatasetReader "
        "SnapshotNestedDatasetReader SnapshotChunkDataset ListSnapshotChunksDataset"
    ),
    "writes files": (
        "WriteFile Save SaveV2 SaveSlices MergeV2Checkpoints ShardedFilename ShardedFilespec SaveDataset "
        "SaveDatasetV2 DatasetToTFRecord ExperimentalDatasetToTFRecord DistributedSave SnapshotDataset "
        "SnapshotDatasetV2 CacheDataset CacheDatasetV2 CreateSummaryFileWriter CreateSummaryDbWriter SummaryWriter "
        "WriteSummary WriteScalarSummary WriteHistogramSummary WriteImageSummary WriteAudioSummary "
        "WriteGraphSummary WriteRawProtoSummary ImportEvent FlushSummaryWriter CloseSummaryWriter "
        "StatsAggregatorSetSummaryWriter DumpTensor CalibrationStatisticsSaver FileSystemSetConfiguration"
    ),
    "uses the network": (
        "RpcServer RpcServerStart RpcServerRegister RpcClient RpcCall RpcCheckStatus RpcGetValue "
        "DeleteRpcFutureResource RemoteCall DataServiceDataset DataServiceDatasetV2 DataServiceDatasetV3 "
        "DataServiceDatasetV4 RegisterDataset RegisterDatasetV2"
    ),
    "sends tensors to debugger files or URLs": (
        "DebugIdentity DebugIdentityV2 DebugIdentityV3 DebugNanCount DebugNumericSummary DebugNumericSummaryV2 "
        "Copy CopyHost"
    ),
    "builds and runs a graph from a string": "DatasetFromGraph",
    "ends the process": "Abort",
}
DANGEROUS_TF_OPS = {op: what for what, ops in _TF_OPS.items() for op in ops.split()}
_RESTORE_OPS = {"Restore", "RestoreV2", "RestoreSlice"}
_LOAD_TIME_CHILDREN = {"_create_resource", "_initialize", "_destroy_resource"}


def _tf_op_danger(node) -> str | None:
    if node.op in DANGEROUS_TF_OPS:
        return DANGEROUS_TF_OPS[node.op]
    if node.op == "PrintV2" and node.attr["output_stream"].s.startswith(b"file://"):
        return "writes files"
    if node.op in ("DecodeProtoV2", "EncodeProto") and node.attr["descriptor_source"].s not in (b"", b"local://"):
        return "reads files"
    return None


def savedmodel_problems(path: str) -> list[str]:
    """Operations that ``tf.saved_model.load`` plus a call of the ``serving_default``
    signature (and its gradients) could run, which touch files, the network or Python;
    and asset files that resolve outside the model directory.

    A TF2 SavedModel (one MetaGraph with an object graph, the case ``tf.saved_model.load``
    treats as such) runs: the serving signature's function; resource set-up functions
    (``_create_resource``, ``_initialize``, ``_destroy_resource``) and the objects' own
    save/restore functions during load; registered custom gradients of reached nodes.
    The MetaGraph's GraphDef (where the SaveV2/RestoreV2 checkpoint functions every
    SavedModel carries are called from) is not run. A TF1 SavedModel's GraphDef is pruned
    and run by the loader (restore op, init ops, signatures): every node is scanned
    except the saver's save subgraph, and Restore ops only inside its restore subgraph."""
    saved_model = _parse_saved_model(Path(path))
    metas = list(saved_model.meta_graphs)
    problems: list[str] = []
    if len(metas) == 1 and metas[0].HasField("object_graph_def"):
        meta = metas[0]
        problems += _TFLibrary(meta.graph_def.library).scan(_tf2_roots(meta))
    else:
        for meta in metas:
            problems += _scan_tf1(meta)
    problems += _escaping_assets(metas)
    return list(dict.fromkeys(problems))


def _parse_saved_model(root: Path):
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    pb, pbtxt = root / "saved_model.pb", root / "saved_model.pbtxt"
    try:
        if pb.exists():
            saved_model.ParseFromString(pb.read_bytes())
        else:
            text_format.Parse(pbtxt.read_text(encoding="utf-8"), saved_model)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ModelLoadError(f"cannot load SavedModel {root}: saved_model.pb is corrupt ({str(e)[:200]})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read SavedModel {root}: {e.strerror}") from None
    return saved_model


def _tf2_roots(meta) -> list[tuple[str, str]]:
    """(function name, why it runs) for everything tf.saved_model.load and the serving call run."""
    nodes = meta.object_graph_def.nodes

    def functions(node_id: int) -> list[str]:
        if not 0 <= node_id < len(nodes):
            return []
        node = nodes[node_id]
        kind = node.WhichOneof("kind")
        if kind == "function":
            return list(node.function.concrete_functions)
        if kind == "bare_concrete_function":
            return [node.bare_concrete_function.concrete_function_name]
        return []

    def child(node_id: int, name: str) -> int:
        if 0 <= node_id < len(nodes):
            for ref in nodes[node_id].children:
                if ref.local_name == name:
                    return ref.node_id
        return -1

    roots = [(f, "the serving_default signature") for f in functions(child(child(0, "signatures"), "serving_default"))]
    for node in nodes:
        for ref in node.children:
            if ref.local_name in _LOAD_TIME_CHILDREN:
                roots += [(f, f"resource set-up ({ref.local_name}) run during loading") for f in functions(ref.node_id)]
        for saveable in node.saveable_objects.values():
            for fn_id in (saveable.save_function, saveable.restore_function):
                roots += [(f, "object state save/restore run during loading") for f in functions(fn_id)]
    return roots


class _TFLibrary:
    """A GraphDef's function library, walked from given roots through calls, functional
    control flow (any ``func`` attribute) and registered custom gradients."""

    def __init__(self, library):
        self.functions = {f.signature.name: f for f in library.function}
        self.custom_gradients = {g.registered_op_type: g.gradient_func for g in library.registered_gradients}
        self.gradients = {g.function_name: g.gradient_func for g in library.gradient}

    def callees(self, node) -> list[str]:
        names = [node.op] if node.op in self.functions else []
        for value in node.attr.values():
            kind = value.WhichOneof("value")
            if kind == "func":
                names.append(value.func.name)
            elif kind == "list":
                names += [f.name for f in value.list.func]
        return [n for n in names if n in self.functions]

    def custom_gradient(self, node) -> str | None:
        if "_gradient_op_type" not in node.attr:
            return None
        name = self.custom_gradients.get(node.attr["_gradient_op_type"].s.decode(errors="replace"))
        return name if name in self.functions else None

    def scan(self, roots: list[tuple[str, str]]) -> list[str]:
        problems, seen = [], set()
        queue = deque((name, why) for name, why in roots if name in self.functions)
        while queue:
            name, why = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            if name in self.gradients:
                queue.append((self.gradients[name], why))
            for node in self.functions[name].node_def:
                danger = _tf_op_danger(node)
                if danger:
                    problems.append(f"{node.op} ({danger}) in {why}")
                queue.extend((callee, why) for callee in self.callees(node))
                gradient = self.custom_gradient(node)
                if gradient:
                    queue.append((gradient, f"{why} (a custom gradient)"))
        return problems


def _scan_tf1(meta) -> list[str]:
    graph = {node.name: node for node in meta.graph_def.node}

    def closure(start: list[str]) -> set[str]:
        seen, stack = set(), [n.lstrip("^").split(":")[0] for n in start if n]
        while stack:
            name = stack.pop()
            if name in seen or name not in graph:
                continue
            seen.add(name)
            stack += [i.lstrip("^").split(":")[0] for i in graph[name].input]
        return seen

    saver = meta.saver_def
    save_only = closure([saver.save_tensor_name]) if saver.save_tensor_name else set()
    restore = closure([saver.restore_op_name]) if saver.restore_op_name else set()
    run = closure([name for name in graph if name not in save_only])
    library = _TFLibrary(meta.graph_def.library)
    problems, roots = [], []
    for name in sorted(run):
        node = graph[name]
        danger = _tf_op_danger(node)
        if danger and not (node.op in _RESTORE_OPS and name in restore):
            problems.append(f"{node.op} ({danger}) in the graph the TF1 loader runs (node {name!r})")
        roots += [(f, f"the TF1 graph (node {name!r})") for f in library.callees(node)]
        gradient = library.custom_gradient(node)
        roots += [(gradient, f"the TF1 graph (node {name!r}, a custom gradient)")] if gradient else []
    return problems + library.scan(roots)


def _escaping_assets(metas) -> list[str]:
    return [
        f"asset file {a.filename!r} lies outside the model's assets directory"
        for meta in metas
        for a in meta.asset_file_def
        if not _inside(a.filename)
    ]


def _inside(relative: str) -> bool:
    """A relative path that stays inside its base directory (no '..' escape, not absolute)."""
    parts = relative.replace("\\", "/").split("/")
    return bool(relative) and not os.path.isabs(relative) and not re.match(r"^[A-Za-z]:", relative) and ".." not in parts


# --- Keras ----------------------------------------------------------------------------------
_LAMBDA_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda"}


def keras_problems(path: str) -> list[str]:
    """Layers that carry Python bytecode or call arbitrary functions (Lambda, TF-Keras
    TFOpLambda), classes from outside Keras (importing their module runs its code), and
    vocabulary files named by path, found in a ``.keras``/``.h5`` model's JSON config.
    A config that cannot be read yields no problems: the loader reports the corruption."""
    config = _keras_config(path)
    problems: list[str] = []
    stack = [config]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack += obj
            continue
        if not isinstance(obj, dict):
            continue
        name = obj.get("config", {}).get("name") if isinstance(obj.get("config"), dict) else None
        cls, module = obj.get("class_name"), obj.get("module")
        if cls in _LAMBDA_LAYERS:
            problems.append(f"{cls} layer {name!r} holds Python code that would run on load")
            continue
        if cls == "__lambda__" or obj.get("function_type") == "lambda":
            problems.append("a serialized Python lambda that would run on load")
        elif isinstance(cls, str) and isinstance(module, str) and module.split(".")[0] not in ("keras", "tf_keras"):
            problems.append(f"class {cls!r} from module {module!r}, which Keras would import (running its code)")
        for key in ("vocabulary", "vocabulary_file"):
            if isinstance(obj.get(key), str):
                problems.append(f"layer {name!r} reads its vocabulary from the file {obj[key]!r}")
        stack += list(obj.values())
    return list(dict.fromkeys(problems))


def _keras_config(path: str):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        if magic.startswith(b"\x89HDF"):
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
            if raw is None:
                return None
            return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except Exception:  # corrupt files are the loader's to report, with its own message
        return None
    return None


# --- TorchScript ----------------------------------------------------------------------------
_TORCHSCRIPT_CALLS = {
    r"\bfrom_file\b": "torch.from_file, which reads, creates and (shared) writes files",
    r"\bops\.(_?c10d\w*|symm_mem|_dist\w*)\.": "distributed communication operators (network)",
}


def torchscript_problems(path: str) -> list[str]:
    """TorchScript archives hold source code (``code/*.py``) that ``torch.jit.load``
    compiles, and runs at once where a class defines ``__setstate__``. The language has no
    Python escape, but a few operators reach outside the process; find calls to them."""
    problems = []
    try:
        with zipfile.ZipFile(path) as z:
            sources = [(n, z.read(n).decode("utf-8", errors="replace")) for n in z.namelist() if "/code/" in n and n.endswith(".py")]
    except Exception as e:  # what cannot be checked is not loaded
        raise ModelLoadError(f"cannot read TorchScript archive {path}: corrupt or truncated ({str(e)[:200]})") from None
    for name, source in sources:
        for pattern, what in _TORCHSCRIPT_CALLS.items():
            if re.search(pattern, source):
                problems.append(f"{name.split('/code/', 1)[1]} calls {what}")
    return list(dict.fromkeys(problems))


# --- ONNX -----------------------------------------------------------------------------------
def onnx_external_data_problems(proto, model_dir: str) -> list[str]:
    """External-data tensors whose file lies outside the model's directory (an absolute
    path, a '..' escape or a symbolic link pointing elsewhere)."""
    from onnx import TensorProto

    base = Path(model_dir).resolve()
    problems = []
    for tensor in _onnx_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve() if _inside(location) else None
        if target is None or (target != base and base not in target.parents):
            problems.append(f"tensor {tensor.name!r} reads its data from {location!r}, outside the model's directory")
    return problems


def _onnx_tensors(proto):
    graphs = [proto.graph]
    nodes = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes += list(g.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs += list(attr.graphs)


def onnx_undecodable_strings(proto) -> list[str]:
    """Fields whose text is not valid UTF-8. ONNX is proto2, which does not check this; the
    protobuf runtime then hands such values back as bytes where every caller expects str."""
    from google.protobuf.descriptor import FieldDescriptor as F

    found, stack = [], [(proto, "model")]
    while stack and len(found) < 3:
        message, where = stack.pop()
        for field in message.DESCRIPTOR.fields:
            if field.type not in (F.TYPE_STRING, F.TYPE_MESSAGE):
                continue
            if field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED:
                values = list(getattr(message, field.name))
            elif field.type == F.TYPE_MESSAGE and not message.HasField(field.name):
                continue
            else:
                values = [getattr(message, field.name)]
            if field.type == F.TYPE_STRING:
                found += [f"{where}.{field.name} = {v!r}" for v in values if isinstance(v, bytes)]
            else:
                stack += [(v, f"{where}.{field.name}") for v in values]
    return found
