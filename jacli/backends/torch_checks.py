"""Checks on untrusted torch archives, run on the bytes that torch then loads from memory:
TorchScript (``torch.jit.save``) and torch.export (``.pt2``). Both are allow-lists: what
the check cannot read, or does not recognise, is refused. What each format can do on load,
and why the checks look where they do, is in docs/security.md."""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile

from .. import limits
from ..errors import ModelLoadError
from .refusal import cut as _cut

# --- TorchScript ----------------------------------------------------------------------------
# Operators outside the allowed namespaces (aten, and the prim operators below) are refused,
# and so are these aten operators, the only ones that name a file.
FILE_OPS = {"from_file": "reads, creates and (shared) writes files", "save": "writes files"}
# prim operators that compute on values (no printing, no Python, no RPC, no profiling).
_PRIM_OPS = set(
    "NumToTensor RaiseException TupleIndex TupleUnpack Uninitialized abs data device dtype grad index itemsize "
    "layout max min name nbytes rangelist requires_grad tolist type unchecked_cast unchecked_unwrap_optional "
    "EnumName EnumValue StringIndex is_cpu is_cuda is_meta is_mps is_nested is_quantized is_sparse is_sparse_csr "
    "is_xpu is_mkldnn is_vulkan is_ipu is_xla is_maia is_mtia".split()
)
# Builtin functions that TorchScript's serialized code calls by their bare name.
_BUILTINS = set(
    "annotate uninitialized unchecked_cast isinstance int float bool str complex len range list tuple dict getattr "
    "hasattr min max abs round divmod enumerate zip sorted any all ord chr hash hex oct bin pow sum".split()
)


def torchscript_problems(path: str, data: bytes) -> list[str]:
    """TorchScript archives hold source code (``code/**.py``) that ``torch.jit.load``
    compiles, and runs at once where a class defines ``__setstate__``. Every source is
    parsed, and every call in it must be a tensor operator (aten, except ``save`` and
    ``from_file``), one of a few prim operators, a builtin, or a class or method of the
    archive's own code; TorchBind classes (native code) are refused. The archive is read
    with torch's own zip reader, which must agree with Python's."""
    import torch

    sources = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = limits.zip_members(z, f"TorchScript archive {path}", ModelLoadError)
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
        if records != {i.filename.split("/", 1)[-1] for i in infos if not i.filename.endswith("/")}:
            return ["an archive that torch's zip reader and Python's read differently"]
        pickled = []
        for name in sorted(records):
            if name.startswith("code/") and name.endswith(".py"):
                sources[name] = bytes(reader.get_record(name))
            elif name.endswith(".pkl") and b"torch.classes" in bytes(reader.get_record(name)):
                pickled.append(name)
    except ModelLoadError:
        raise
    except Exception as e:  # what cannot be checked is not loaded
        raise ModelLoadError(f"cannot read TorchScript archive {path}: corrupt or truncated ({str(e)[:200]})") \
            from None
    trees, problems = {}, [f"{name} holds a TorchBind object (native code jacli does not check)" for name in pickled]
    for name, source in sources.items():
        try:
            if not _PRINTED.fullmatch(source) or not _plain_tokens(source.decode("ascii")):
                raise ValueError("not as torch prints code")
            trees[name] = ast.parse(source.decode("ascii"), filename=name)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            problems.append(f"{name} is not TorchScript jacli can read")
    methods = {n.name for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name, tree in trees.items():
        problems += [f"{name[len('code/'):]} {p}" for p in _TorchScriptCode(methods).problems(tree)]
    return list(dict.fromkeys(problems))


# Code as torch prints it: printable ASCII lines, plain one-line strings with simple escapes
# only (others go to the constants table), no comments, no backslash outside a string.
# Anything else could lex differently for TorchScript than for the Python parser used here.
_PRINTED = re.compile(rb"[ -~\n]*")
_STRING = re.compile(r"""\"(?:[^"\\]|\\[\\'"nt])*\"|'(?:[^'\\]|\\[\\'"nt])*'""")


def _plain_tokens(source: str) -> bool:
    import tokenize

    escapes = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.COMMENT, tokenize.ERRORTOKEN):
                return False
            if token.type == tokenize.STRING:
                if not _STRING.fullmatch(token.string):
                    return False
                escapes += token.string.count("\\")
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    return source.count("\\") == escapes


class _TorchScriptCode:
    """Every call and name of one parsed source, against the allow-lists above."""

    _REFUSED_NODES = (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Lambda, ast.AsyncFunctionDef,
                      ast.Await, ast.Yield, ast.YieldFrom, ast.Try, ast.ClassDef)

    def __init__(self, methods: set[str]):
        self.methods = methods  # functions and methods defined in the archive's code

    def problems(self, tree) -> list[str]:
        found, self.aliases = [], set()
        for node in ast.walk(tree):  # `_0 = __torch__.m.f` then `_0(x)`: local names for the archive's functions
            if isinstance(node, ast.Assign) and self._dotted(node.value).startswith("__torch__."):
                self.aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, self._REFUSED_NODES) and not self._plain_class(node, tree):
                found.append(f"has a {type(node).__name__} statement, which TorchScript code does not hold")
            elif isinstance(node, ast.Attribute) and self._dotted(node).startswith("__torch__.torch.classes."):
                found.append(f"uses the TorchBind class {self._dotted(node)} (native code jacli does not check)")
            elif isinstance(node, ast.Call):
                problem = self._call_problem(node.func) or self._getattr_problem(node)
                if problem:
                    found.append(problem)
        return found

    @staticmethod
    def _plain_class(node, tree) -> bool:
        """Classes are allowed at the top of a file only (as torch writes them)."""
        return isinstance(node, ast.ClassDef) and node in tree.body

    @staticmethod
    def _dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""

    def _getattr_problem(self, call) -> str | None:
        """getattr(obj, "name") with a constant name, of a value other than a module of torch."""
        if not (isinstance(call.func, ast.Name) and call.func.id in ("getattr", "hasattr")):
            return None
        target = self._dotted(call.args[0]).split(".")[0] if call.args else ""
        if len(call.args) != 2 or target in ("torch", "ops", "__torch__") or not (
                isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str)):
            return f"calls {call.func.id}() on {target or 'something'} other than an object by a constant name"
        return None

    def _call_problem(self, func) -> str | None:
        if isinstance(func, ast.Name):
            if func.id in _BUILTINS or func.id in self.methods or func.id in self.aliases:
                return None
            return f"calls {func.id}, which is not a TorchScript builtin"
        if not isinstance(func, ast.Attribute):
            return "calls something that is not a named function or method"
        dotted = self._dotted(func)
        parts = dotted.split(".")
        if parts[0] == "__torch__":
            return None  # a class or function of the archive's own code, itself checked
        if parts[:2] == ["torch", "ops"]:
            parts = parts[1:]
        if parts[0] == "ops" and len(parts) == 3:
            return _operator_problem(parts[1], parts[2])
        if parts[0] == "torch" and len(parts) == 2:
            return _operator_problem("aten", parts[1])
        if parts[0] in ("torch", "ops"):
            return f"calls {dotted}, which jacli does not allow in an untrusted archive"
        if func.attr in self.methods or _operator_problem("aten", func.attr) is None:
            return None  # a method of the archive's classes, or of tensors, lists, dicts, strings (aten)
        return f"calls a method .{func.attr}(), which is neither a tensor operator nor defined in the archive"


def _operator_problem(namespace: str, op: str) -> str | None:
    if namespace == "aten" and op in FILE_OPS:
        return f"calls torch.{op}, which {FILE_OPS[op]}"
    if namespace == "aten" and op in _aten_operators() or namespace == "prim" and op in _PRIM_OPS:
        return None
    return f"calls the operator {namespace}::{op}, which jacli does not allow in an untrusted archive"


_ATEN: set[str] = set()


def _aten_operators() -> set[str]:
    """The names of the aten operators registered with the installed torch."""
    if not _ATEN:
        import torch

        _ATEN.update(s.name[len("aten::"):] for s in torch._C._jit_get_all_schemas() if s.name.startswith("aten::"))
    return _ATEN


# --- torch.export (.pt2) --------------------------------------------------------------------
# What an untrusted program's nodes may call (torch's verifier allows operators and a few
# functions only): aten and prims operators except the two that touch files, the
# higher-order operators that only structure a computation, and arithmetic on sizes.
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
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [i.filename for i in limits.zip_members(z, f"torch.export archive {path}", ModelLoadError)]
        if "version" in names:
            return ["the old torch.export layout (a top-level 'version', serialized_*.pt pickles), "
                    "which jacli does not check"]
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except ModelLoadError:
        raise
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
    if m and m[1] in ("aten", "prims") and m[3] and m[2] not in FILE_OPS:
        return None
    if (m and m[1] == "higher_order" and not m[3] and m[2] in _PT2_HIGHER_ORDER) or target in _PT2_FUNCTIONS:
        return None
    if m and m[2] in FILE_OPS:
        return f"a call of {target}, which {FILE_OPS[m[2]]}"
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
