"""Checks on untrusted TensorFlow SavedModels, run on the copy TensorFlow then loads.

``checked_copy`` reads the model's directory once into a private copy (a new 0700
directory nobody else can change), parses ``saved_model.pb`` from the bytes copied and,
unless trusted, walks exactly what ``tf.saved_model.load`` and a call of the
``serving_default`` signature (and its gradients) would run, checking every operation
against an allow-list of op types. What is refused, and why, is in docs/security.md.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections import deque
from pathlib import Path

from .. import limits
from ..errors import ModelLoadError
from .refusal import cut, inside, refuse

MAX_FILES = 10_000
# Op families (TensorFlow's own grouping, gen_<family>.py) that compute on tensors, and
# whose stateless ops are allowed; no family of I/O, queues, datasets, summaries, Python,
# RPC or debugging is among them.
_FAMILIES = ("math_ops array_ops nn_ops linalg_ops spectral_ops bitwise_ops special_math_ops control_flow_ops "
             "functional_ops resource_variable_ops state_ops random_ops stateless_random_ops stateless_random_ops_v2 "
             "image_ops string_ops list_ops").split()
# Stateful ops that are allowed: variables, calls and control flow, random numbers, checks,
# tensor arrays and stacks (loops and their gradients), hash tables (lookup layers).
_STATEFUL = set(
    "VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp VarIsInitializedOp "
    "VariableShape DestroyResourceOp DisableCopyOnRead ResourceGather ResourceGatherNd ResourceScatterAdd "
    "ResourceScatterSub ResourceScatterMul ResourceScatterDiv ResourceScatterMin ResourceScatterMax "
    "ResourceScatterUpdate ResourceScatterNdAdd ResourceScatterNdSub ResourceScatterNdMax ResourceScatterNdMin "
    "ResourceScatterNdUpdate ResourceStridedSliceAssign Variable VariableV2 TemporaryVariable "
    "StatefulPartitionedCall If While Case RandomUniform RandomUniformInt RandomStandardNormal TruncatedNormal "
    "ParameterizedTruncatedNormal RandomGamma RandomPoisson RandomPoissonV2 RandomShuffle Multinomial "
    "StatelessRandomGetAlg CheckNumerics CheckNumericsV2 Assert DeepCopy Empty GuaranteeConst "
    "TensorArrayV3 TensorArrayReadV3 TensorArrayWriteV3 TensorArrayGatherV3 TensorArrayScatterV3 "
    "TensorArrayConcatV3 TensorArraySplitV3 TensorArraySizeV3 TensorArrayCloseV3 TensorArrayGradV3 "
    "TensorArrayGradWithShape StackV2 StackPushV2 StackPopV2 StackCloseV2 HashTableV2 MutableHashTableV2 "
    "MutableDenseHashTableV2 MutableHashTableOfTensorsV2 AnonymousHashTable AnonymousMutableHashTable "
    "AnonymousMutableDenseHashTable AnonymousMutableHashTableOfTensors LookupTableFindV2 LookupTableImportV2 "
    "LookupTableInsertV2 LookupTableRemoveV2 LookupTableSizeV2 LookupTableExportV2 InitializeTableV2".split()
)
# In those families, yet they reach outside: a memory-mapped file named by an attribute, a
# function run on another device or task, the end of the process.
_REACH_OUT = {"ImmutableConst": "memory-maps a file", "RemoteCall": "runs a function on another task",
              "Abort": "ends the process"}
# What some of the refused ops do, for the message (the allow-list decides).
_WHY = {**dict.fromkeys("PyFunc PyFuncStateless EagerPyFunc".split(), "runs Python code"),
        **dict.fromkeys("WriteFile Save SaveV2 SaveSlices MergeV2Checkpoints".split(), "writes files"),
        **dict.fromkeys("ReadFile MatchingFiles Restore RestoreV2 RestoreSlice".split(), "reads files"),
        **dict.fromkeys("Print PrintV2".split(), "prints, or writes files"), **_REACH_OUT}
_RESTORE_OPS = {"Restore", "RestoreV2", "RestoreSlice"}
_LOAD_TIME_CHILDREN = {"_create_resource", "_initialize", "_destroy_resource"}
_INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer", "local_variables", "local_resources")


@contextlib.contextmanager
def checked_copy(path: str, trust: bool):
    """Yield the path of a private copy of the SavedModel directory ``path``, checked
    unless ``trust``."""
    folder = tempfile.mkdtemp(prefix="jacli-savedmodel-")  # mode 0700
    try:
        local = Path(folder) / "model"
        pb = _copy_tree(path, local)
        if not trust:
            refuse(path, savedmodel_problems(path, _parse(path, *pb)))
        yield str(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_tree(path: str, dst: Path) -> tuple[bytes, bool]:
    """Copy the directory's regular files (a symbolic link only when it points at a file
    inside the directory), within the read limit; returns saved_model.pb's bytes (or the
    .pbtxt's, and True)."""
    root = Path(os.path.realpath(path))
    if not root.is_dir():
        raise ModelLoadError(f"SavedModel {path} is not a directory")
    used, count, pb = 0, 0, None
    for here, dirs, files in os.walk(root, followlinks=False):
        rel = Path(here).relative_to(root)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in dirs:
            if (Path(here) / name).is_symlink():
                raise ModelLoadError(f"SavedModel {path}: {rel / name} is a symbolic link to a directory; "
                                     "copy the model without links")
        for name in files:
            count += 1
            if count > MAX_FILES:
                raise ModelLoadError(f"SavedModel {path} holds more than {MAX_FILES} files")
            source = Path(here) / name
            if source.is_symlink():
                target = Path(os.path.realpath(source))
                if root not in target.parents:
                    raise ModelLoadError(f"SavedModel {path}: {rel / name} is a symbolic link to a file outside "
                                         "the model's directory")
            if not stat.S_ISREG(os.stat(source).st_mode):
                raise ModelLoadError(f"SavedModel {path}: {rel / name} is not a regular file (a device, FIFO or "
                                     "socket)")
            data = limits.read_regular(str(source), "SavedModel file", ModelLoadError, used)
            used += len(data)
            with open(dst / rel / name, "xb") as f:
                f.write(data)
            if rel == Path(".") and name in ("saved_model.pb", "saved_model.pbtxt") and (pb is None or pb[1]):
                pb = (data, name.endswith("txt"))
    if pb is None:
        raise ModelLoadError(f"{path} is a directory without saved_model.pb; it is not a TensorFlow SavedModel")
    return pb


def _parse(path: str, data: bytes, text: bool):
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), saved_model)
        else:
            saved_model.ParseFromString(data)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ModelLoadError(f"cannot load SavedModel {path}: saved_model.pb is corrupt ({str(e)[:200]})") from None
    return saved_model


def savedmodel_problems(path: str, saved_model) -> list[str]:
    """Everything ``tf.saved_model.load`` plus a call of ``serving_default`` (and its
    gradients) would run, against the op allow-list; duplicate names; asset files that
    resolve outside the model directory.

    A TF2 SavedModel (one MetaGraph with an object graph, the case ``tf.saved_model.load``
    treats as such) runs: the serving signature's function; resource set-up functions
    (``_create_resource``, ``_initialize``, ``_destroy_resource``) and the objects' own
    save/restore functions during load; registered custom gradients of reached nodes. Its
    GraphDef (where the checkpoint functions every SavedModel carries are called from) is
    not run. A TF1 SavedModel's GraphDef is pruned and run by the loader: the saver's restore
    op, the init ops (the init signature, main op, legacy init op, table and local-variable
    initializers) and the signatures, each with everything it depends on."""
    metas = list(saved_model.meta_graphs)
    problems = [p for meta in metas for p in _duplicates(meta)]
    if problems:
        return problems
    if len(metas) == 1 and metas[0].HasField("object_graph_def"):
        meta = metas[0]
        problems += _Library(meta.graph_def.library).scan(_tf2_roots(meta))
    else:
        for meta in metas:
            problems += _scan_tf1(meta)
    problems += [f"asset file {a.filename!r} lies outside the model's assets directory"
                 for meta in metas for a in meta.asset_file_def if not inside(a.filename)]
    return list(dict.fromkeys(problems))


def _duplicates(meta) -> list[str]:
    """Names that readers could resolve to different things (TensorFlow keeps the last)."""
    found = []
    for i, node in enumerate(meta.object_graph_def.nodes):
        names = [ref.local_name for ref in node.children]
        found += [f"object {i} has two children named {cut(n)}" for n in sorted({n for n in names if names.count(n) > 1})]
    for kind, names in (("function", [f.signature.name for f in meta.graph_def.library.function]),
                        ("graph node", [n.name for n in meta.graph_def.node])):
        found += [f"two {kind}s named {cut(n)}" for n in sorted({n for n in names if names.count(n) > 1})]
    return found


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


_ALLOWED: set[str] = set()


def allowed_ops() -> set[str]:
    """The op types an untrusted SavedModel may run (see the constants above)."""
    if not _ALLOWED:
        import importlib

        from tensorflow.python.framework import op_def_registry

        for family in _FAMILIES:
            module = importlib.import_module(f"tensorflow.python.ops.gen_{family}")
            for name in dir(module):
                op = op_def_registry.get(name) if name[:1].isupper() else None
                if op is not None and (not op.is_stateful or name in _STATEFUL) and name not in _REACH_OUT:
                    _ALLOWED.add(name)
        _ALLOWED.update(op for op in _STATEFUL if op_def_registry.get(op) is not None)
    return _ALLOWED


def _op_problem(op: str, where: str) -> str | None:
    if op in allowed_ops():
        return None
    what = _WHY.get(op, "not an op jacli allows in an untrusted model")
    return f"{op} ({what}) in {where}"


def graph_def_problems(graph_def, where: str) -> list[str]:
    """The allow-list check of a GraphDef all of whose nodes run (a signature with its
    functions inlined, tf_inline.py), and of every function they lead to."""
    library = _Library(graph_def.library)
    problems, functions = [], []
    for node in graph_def.node:
        found, more = library.node_problems(node, where)
        problems += found
        functions += more
    return list(dict.fromkeys(problems + library.scan(functions)))


class _Library:
    """A GraphDef's function library, walked from given roots through calls, functional
    control flow (any ``func`` attribute) and registered custom gradients."""

    def __init__(self, library):
        self.functions = {f.signature.name: f for f in library.function}
        self.custom_gradients = {g.registered_op_type: g.gradient_func for g in library.registered_gradients}
        self.gradients = {g.function_name: g.gradient_func for g in library.gradient}

    def callees(self, node) -> tuple[list[str], list[str]]:
        """(functions of the library, op types) that ``node`` runs besides its own op: a
        ``func`` attribute may also name an op, which TensorFlow then runs on its own."""
        names = []
        for value in node.attr.values():
            kind = value.WhichOneof("value")
            if kind == "func":
                names.append(value.func.name)
            elif kind == "list":
                names += [f.name for f in value.list.func]
        return [n for n in names if n in self.functions], [n for n in names if n not in self.functions]

    def node_problems(self, node, where: str) -> tuple[list[str], list[tuple[str, str]]]:
        """What is wrong with one node, and the functions it leads to."""
        functions, ops = self.callees(node)
        problems = [p for op in ops if (p := _op_problem(op, where))]
        if node.op in self.functions:
            functions.append(node.op)
        elif problem := _op_problem(node.op, where):
            problems.append(problem)
        if node.op == "PrintV2" and node.attr["output_stream"].s.startswith(b"file://"):
            problems.append(f"PrintV2 (writes files) in {where}")
        found = [(f, where) for f in functions]
        if "_gradient_op_type" in node.attr:
            gradient = self.custom_gradients.get(node.attr["_gradient_op_type"].s.decode(errors="replace"))
            if gradient in self.functions:
                found.append((gradient, f"{where} (a custom gradient)"))
        return problems, found

    def scan(self, roots: list[tuple[str, str]]) -> list[str]:
        problems, seen = [], set()
        queue = deque(roots)
        while queue:
            name, why = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            if name not in self.functions:
                problems.append(f"a call of the function {cut(name)}, which the model does not define, in {why}")
                continue
            if name in self.gradients:
                queue.append((self.gradients[name], why))
            for node in self.functions[name].node_def:
                found, more = self.node_problems(node, why)
                problems += found
                queue.extend(more)
        return problems


def _scan_tf1(meta) -> list[str]:
    """Every node the TF1 loader runs, wherever the file says it is: restore op, init ops and
    signatures, with all they depend on. Restore ops only in the saver's restore op, reading
    from the file name the loader feeds it."""
    graph = {node.name: node for node in meta.graph_def.node}

    def base(name: str) -> str:
        return name.lstrip("^").split(":")[0]

    def closure(start) -> set[str]:
        seen, stack = set(), [base(n) for n in start if n]
        while stack:
            name = stack.pop()
            if name in seen or name not in graph:
                continue
            seen.add(name)
            stack += [base(i) for i in graph[name].input]
        return seen

    saver = meta.saver_def
    roots = [saver.restore_op_name] if saver.restore_op_name else []
    for key in _INIT_COLLECTIONS:
        if key in meta.collection_def:
            collection = meta.collection_def[key]
            roots += list(collection.node_list.value)
            roots += [_initializer(raw) for raw in collection.bytes_list.value]
    for signature in meta.signature_def.values():
        roots += [t.name for t in (*signature.inputs.values(), *signature.outputs.values())]
    missing = [r for r in roots if r and base(r) not in graph]
    if missing:
        return [f"the loader would run {cut(missing[0])}, which the graph does not hold"]
    run, restore = closure(roots), closure([saver.restore_op_name])
    library = _Library(meta.graph_def.library)
    problems, functions = [], []
    for name in sorted(run):
        node, where = graph[name], f"the graph the TF1 loader runs (node {cut(name)})"
        if node.op in _RESTORE_OPS and name in restore and node.input and base(node.input[0]) == base(
                saver.filename_tensor_name):
            continue  # the saver's restore op reads the model's own checkpoint, from the path the loader feeds
        found, more = library.node_problems(node, where)
        problems += found
        functions += more
    return problems + library.scan(functions)


def _initializer(raw: bytes) -> str:
    """The initializer op of a serialized VariableDef (a local variable's); a name no graph
    holds when there is none."""
    from tensorflow.core.framework import variable_pb2

    variable = variable_pb2.VariableDef()
    try:
        variable.ParseFromString(raw)
    except Exception:
        return "<a collection entry that is not a VariableDef>"
    return variable.initializer_name or "<a variable without an initializer>"
