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


# --- torch.export (.pt2) --------------------------------------------------------------------
# What an untrusted program's nodes may call (torch's verifier allows operators and a few
# functions only): aten and prims operators except the two that touch files, the
# higher-order operators that only structure a computation, and arithmetic on sizes.
_PT2_FILE_OPS = {"from_file": "reads, creates and (shared) writes files", "save": "writes files"}
_PT2_HIGHER_ORDER = set(
    "cond while_loop while_loop_stack_output map_impl scan associative_scan invoke_subgraph wrap_with_set_grad_enabled "
    "wrap_with_autocast auto_functionalized auto_functionalized_v2 flex_attention hints_wrapper out_dtype strict_mode "
    "tag_activation_checkpoint _export_tracepoint".split()
)
_PT2_FUNCTIONS = {
    *(f"_operator.{f}" for f in "getitem add sub mul truediv floordiv mod pow neg pos abs and_ or_ not_ lshift rshift "
                                "eq ne lt le gt ge".split()),
    *(f"math.{f}" for f in ("ceil", "floor", "trunc")),
    *(f"torch.sym_{f}" for f in "int float ite max min not sqrt sum".split()),
    "torch._C._set_grad_enabled", "torch.autograd.grad_mode.set_grad_enabled",
    "torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast",
}
# Shape expressions, which sympy.sympify evaluates as Python while the program loads: sympy
# classes, torch's size functions, symbols (s0, u1), numbers and operators; no attribute access.
_SYMPY_NAMES = set(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge Equality Unequality LessThan "
    "StrictLessThan GreaterThan StrictGreaterThan And Or Not true false True False oo zoo nan positive negative "
    "nonnegative nonpositive integer real finite precision evaluate FloorDiv ModularIndexing Where PythonMod CleanDiv "
    "CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity".split()
)
_SYMPY_TOKEN = re.compile(r"\s+|'[\w.+-]*'|\d+(?:\.\d*)?(?:e[-+]?\d+)?|[A-Za-z_]\w*|==|!=|<=|>=|\*\*|[-+*/%(),=<>]")
# Shape guards, which the program's module runs as Python code: input sizes compared.
_GUARD = re.compile(r"(?:\s+|L(?=\[)|\['\w+'\]|\[\d+\]|\.(?:size|stride)\(\)|\.storage_offset\(\)|\d+"
                    r"|==|!=|<=|>=|//|\*\*|[-+*/%<>(),]|(?:and|or|not)\b)*")
_ENDS_A_STRING = re.compile(r"[\"'\\\x00-\x1f\x7f]")  # could end a string literal in generated code
_PT2_IDENTIFIERS = ("name", "as_name", "user_input_name")  # become Python identifiers in generated code
_PT2_PATHS = ("parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn")  # quoted there


def torch_export_problems(path: str, data: bytes) -> list[str]:
    """What ``torch.export.load`` and the program's ``module()`` could run besides tensor
    operators, found in ``data`` (the bytes that will be loaded) with the archive reader
    torch uses (PT2ArchiveReader), never through the loader:

    - pickles: sample inputs (and old-style weights/constants files) must load with
      ``torch.load(weights_only=True)``, which torch tries first and falls back from to
      unrestricted unpickling; pickled weights and constants (tensor subclasses, Python and
      TorchBind objects), which torch unpickles without restriction, are refused;
    - AOTInductor code (a native library loaded with the archive), and the old layout (a
      top-level ``version``) that ``torch.export.load`` falls back to, with its own pickles;
    - in each program (``models/*.json``): shape expressions (``sympy.sympify`` evaluates
      them as Python), shape guards (run as Python by the module), names and module paths
      that torch writes into the module's generated Python code, calls of anything but
      operators and size arithmetic (and of ``from_file``/``save``, which touch files),
      inputs that are not tensors, and TorchBind objects.

    These follow torch 2.13's loader (the version jacli pins); under another version every
    archive is refused."""
    import io

    import torch
    from torch.export.pt2_archive import PT2ArchiveReader

    def read(name: str) -> bytes:
        try:
            return reader.read_bytes(name)
        except Exception as e:
            raise ModelLoadError(f"cannot read {name} in {path}: corrupt or truncated archive ({str(e)[:200]})") \
                from None

    def read_json(name: str):
        try:
            return json.loads(read(name))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ModelLoadError(f"cannot load {path}: {name} is not valid JSON (corrupt?)") from None

    try:
        if "version" in zipfile.ZipFile(io.BytesIO(data)).namelist():
            return ["the old torch.export layout (a top-level 'version', serialized_*.pt pickles), "
                    "which jacli does not check"]
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except Exception as e:  # what cannot be checked is not loaded
        raise ModelLoadError(f"cannot read {path} as a torch.export archive: {str(e)[:200] or type(e).__name__} "
                             "(corrupt, truncated or not a .pt2?)") from None
    problems = []
    if not torch.__version__.startswith("2.13."):
        problems.append(f"jacli checks .pt2 archives for torch 2.13's loader, and this is torch {torch.__version__}")
    if any(n.startswith("data/aotinductor/") for n in names):
        problems.append("AOTInductor compiled code (data/aotinductor/), a native library that loading would run")
    for member in names:
        if not member.startswith("models/"):
            continue
        model = member[len("models/"):-len(".json")]  # as torch.export.load names it
        problems += _program_problems(read_json(member))
        for pickle in (f"data/sample_inputs/{model}.pt", f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
            if pickle in names and not _loads_weights_only(torch, read(pickle)):
                problems.append(f"a pickle that needs arbitrary code ({pickle})")
        for kind in ("weights", "constants"):
            config = f"data/{kind}/{model}_{kind}_config.json"
            if config in names:
                problems += _payload_problems(path, read_json(config), f"data/{kind}/")
    return list(dict.fromkeys(problems))


def _loads_weights_only(torch, data: bytes) -> bool:
    """Whether torch's restricted unpickler reads it, called exactly as torch.export.load
    calls it first (an empty artifact is not unpickled at all)."""
    import io

    if not data:
        return True
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        return False
    return True


def _payload_problems(path: str, config, folder: str) -> list[str]:
    """Weights and constants that torch unpickles without restriction: pickled tensors
    (``use_pickle``), and constants that are TorchBind (``custom_obj_*``) or Python
    (``opaque_obj_*``) objects."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise ModelLoadError(f"cannot load {path}: the {folder} payload config is malformed (corrupt?)")
    problems = []
    for entry in entries.values():
        member = f"{folder}{entry.get('path_name')}"
        if folder == "data/constants/" and not str(entry.get("path_name")).startswith("tensor_"):
            problems.append(f"a pickled Python or TorchBind object ({member})")
        elif entry.get("use_pickle"):
            problems.append(f"a pickled tensor, which torch loads without restriction ({member})")
    return problems


def _program_problems(program) -> list[str]:
    """Every field of a serialized program (``models/*.json``) that loading or running it
    would evaluate or write into Python code, checked wherever it occurs (subgraphs too)."""
    problems, stack = [], [program]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack += obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                problems += _field_problems(key, value)
                stack.append(value)
    return problems


def _field_problems(key: str, value) -> list[str]:
    in_code = "which torch writes into generated Python code"
    if key == "expr_str" and not (isinstance(value, str) and _plain_sympy(value)):
        return [f"a shape expression that is not plain arithmetic ({_cut(value)}), "
                "which loading would evaluate as Python"]
    if key == "guards_code" and isinstance(value, list):
        return [f"a shape guard that is not a size comparison ({_cut(g)}), which the model would run as Python code"
                for g in value if not (isinstance(g, str) and _GUARD.fullmatch(g))]
    if key in ("target", "as_operator"):
        problem = _call_problem(value)
        return [problem] if problem else []
    if key in _PT2_IDENTIFIERS and not (value in (None, "") or isinstance(value, str) and value.isidentifier()):
        return [f"a name that is not an identifier ({_cut(value)}), {in_code}"]
    if key in ("forward_arg_names", "field_names") and isinstance(value, list):
        return [f"an argument name that is not an identifier ({_cut(v)}), {in_code}"
                for v in value if not (isinstance(v, str) and v.isidentifier())]
    if key in _PT2_PATHS and not (isinstance(value, str) and not _ENDS_A_STRING.search(value)):
        return [f"a module path with quotes, backslashes or control characters ({_cut(value)}), {in_code}"]
    if key in ("in_spec", "out_spec"):
        keys = _spec_keys(value)
        if keys is None:
            return [f"an argument structure ({key}) that jacli cannot read"]
        return [f"an argument key with quotes, backslashes or control characters ({_cut(k)}), {in_code}"
                for k in keys if _ENDS_A_STRING.search(k)]
    if key == "input_specs" and isinstance(value, list):
        return [p for p in map(_input_problem, value) if p]
    if key == "class_fqn":
        return [f"a TorchBind object of class {_cut(value)}, which jacli does not check"]
    return []


def _plain_sympy(expr: str) -> bool:
    """Only the tokens of a size expression, back to back; its names are sympy's and
    torch's (_SYMPY_NAMES) or symbols (s0, u1)."""
    end = 0
    for m in _SYMPY_TOKEN.finditer(expr):
        word = m.group()
        if m.start() != end:
            return False
        if re.match(r"[A-Za-z_]", word) and word not in _SYMPY_NAMES and not re.fullmatch(r"[a-z]+\d+", word):
            return False
        end = m.end()
    return end == len(expr)


def _call_problem(target) -> str | None:
    if not isinstance(target, str):
        return f"a call of {_cut(target)}, which jacli cannot check"
    m = re.fullmatch(r"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?", target)
    if m and m[1] in ("aten", "prims") and m[3] and m[2] not in _PT2_FILE_OPS:
        return None
    if (m and m[1] == "higher_order" and not m[3] and m[2] in _PT2_HIGHER_ORDER) or target in _PT2_FUNCTIONS:
        return None
    if m and m[2] in _PT2_FILE_OPS:
        return f"a call of {target}, which {_PT2_FILE_OPS[m[2]]}"
    return f"a call of {_cut(target)}, which jacli does not allow in an untrusted program"


def _spec_keys(spec) -> list[str] | None:
    """The keys (dict keys, field names) in a serialized pytree spec, found in the contexts of
    its nodes; None when it cannot be read."""
    try:
        stack, keys = [json.loads(spec)], []
        while stack:
            obj = stack.pop()
            if isinstance(obj, list):
                stack += obj
            elif isinstance(obj, dict):
                context = obj.get("context")
                if isinstance(context, str):
                    keys += _leaves(json.loads(context))
                stack += [v for k, v in obj.items() if k != "context"]
        return keys
    except (TypeError, ValueError, RecursionError):
        return None


def _leaves(obj) -> list:
    if isinstance(obj, list):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return _leaves(list(obj)) + _leaves(list(obj.values()))
    return [obj] if isinstance(obj, str) else []


def _input_problem(spec) -> str | None:
    """Inputs must be parameters, buffers, tensor constants or user tensors (a constant string
    input would be written into the module's input checks as Python code)."""
    kind, body = next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else ("?", None)
    if kind == "user_input":
        arg = body.get("arg") if isinstance(body, dict) else None
        return None if isinstance(arg, dict) and list(arg) == ["as_tensor"] else "a user input that is not a tensor"
    if kind in ("parameter", "buffer", "tensor_constant"):
        return None
    return f"an input of kind {_cut(kind)}, which jacli does not check"


def _cut(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
