"""An ONNX file's weights left where they are: the protobuf wire format read just far
enough (the model's fields, its graph's fields, each top-level initializer's fields) to find
the large inline initializers, so that the graph can be parsed, checked and run without a
copy of them.

:func:`split` gives the *skeleton* (the same model with each such initializer made a graph
input of its type and shape) and, per initializer, where its bytes lie in the file;
``numpy.frombuffer`` on the file's bytes then gives the values without a copy, and every
onnxruntime session (the model's, its derivative graphs') is fed those arrays instead of
holding a copy of its own. Pure Python: no ``onnx`` import.

Only what is unambiguous is moved: a tensor whose fields are exactly a UTF-8 name, a
floating-point data type, its dims and one ``raw_data`` of exactly dims×itemsize bytes
(so the checker's own tensor checks hold for it: one value field, a defined non-string
type, data not too small; and the parser misses nothing but the opaque raw bytes), whose
name no other initializer has, and, below IR version 4 (where every
initializer must be a graph input), that is already an input. Everything else, including
initializers of subgraphs and functions, stays in the skeleton as it was, for ``onnx`` and
onnxruntime to judge. Nor is anything moved from a model whose movable weights hold less
than :data:`MOVED_TOTAL` in all (a few copies of them cost little, and onnxruntime can
pre-pack only embedded weights). A file this reader cannot walk gives None, and the
caller parses it whole. Derivative graphs of a model with fed weights take a fed Conv
kernel's adjoint under :data:`ADJOINT` too (rules/conv.py), which the model computes once
and feeds beside the weight.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np

MOVED_BYTES = 1 << 20  # initializers of at least this many bytes are fed, not embedded
# ... when they hold this much in all: below it, the copies each session keeps cost little,
# and embedded weights let onnxruntime pre-pack them (fed ones it cannot: ResNet-18's
# tiled VJP ran 2x slower with its 1-9 MB conv kernels fed)
MOVED_TOTAL = 64 << 20
# A derivative graph's session may hold them as constants instead (``constants``): onnxruntime
# then transforms and pre-packs them (its blocked Conv layout: Keras' ResNet50 as ONNX, 94 MB
# of weights, ran its tiled VJP 18-25% faster with one thread, 28-40% with two), each session copies of its own, about this
# many times the weights (that VJP session: 422 MB); the model's sessions do so while these
# copies fit in CONSTANT_SHARE of the call's memory budget, and are fed beyond it
CONSTANT_COPIES = 5
CONSTANT_SHARE = 0.25
NARROW = "jacli.narrow:"  # prefix of a float64 graph's inputs that take a weight in its own precision
# prefix of a derivative graph's inputs that take a fed Conv kernel's adjoint (ADJOINT + "<group>:" + name,
# rules/conv.py), computed once from the weight and fed beside it
ADJOINT = "jacli.adjoint:"

# ONNX element type -> numpy dtype: the floating-point weights (integer tensors, indices and
# shapes, stay constants the derivative rules can read)
_DTYPES = {1: "<f4", 10: "<f2", 11: "<f8"}
_ELEM_TYPES = {v: k for k, v in _DTYPES.items()}
_MODEL_IR_VERSION, _MODEL_GRAPH = 1, 7
_GRAPH_INITIALIZER, _GRAPH_INPUT = 5, 11
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 1, 2, 8, 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# where a constant's data would lie (constants): never read, since onnxruntime is handed the
# array itself (add_external_initializers); a name no file beside any model has
PLACEHOLDER = "jacli:fed-by-jacli"


class Weight(NamedTuple):
    name: str
    elem_type: int  # the ONNX element type
    shape: tuple
    offset: int  # where its raw bytes start in the file
    nbytes: int
    listed: bool  # also a graph input in the file (an initializer as an input's default)

    def array(self, data) -> np.ndarray:
        """The values: a read-only view on ``data`` (the file's bytes), no copy."""
        dtype = np.dtype(_DTYPES[self.elem_type])
        return np.frombuffer(data, dtype, self.nbytes // dtype.itemsize, self.offset).reshape(self.shape)


class _Malformed(Exception):
    pass


def split(data: bytes) -> tuple[bytes, list[Weight]] | None:
    """(skeleton, weights moved out of it), or None when the file cannot be walked (then
    nothing is moved; the protobuf parser reports what is wrong)."""
    try:
        found = _split(memoryview(data), MOVED_BYTES)
    except _Malformed:
        return None
    if found is None or sum(w.nbytes for w in found[1]) < MOVED_TOTAL:
        return data, []
    return found


def _split(buf: memoryview, moved_bytes: int):
    top = list(_fields(buf, 0, len(buf)))
    graphs = [f for f in top if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != 2:
        raise _Malformed  # no graph, or several (protobuf merges them): not for this reader
    ir = [f for f in top if f[0] == _MODEL_IR_VERSION]
    ir_version = _varint(buf, ir[-1][2], ir[-1][3])[0] if ir and ir[-1][1] == 0 else 0
    _, _, g0, g1, _ = graphs[0]
    fields = list(_fields(buf, g0, g1))
    inputs = {_name(buf, f[2], f[3]) for f in fields if f[0] == _GRAPH_INPUT and f[1] == 2}
    found, names = {}, []
    for index, (number, wire, v0, v1, _) in enumerate(fields):
        if number == _GRAPH_INITIALIZER and wire == 2:
            weight = _weight(buf, v0, v1, moved_bytes)
            names.append(weight.name if weight else _name(buf, v0, v1, _TENSOR_NAME))
            if weight and (ir_version >= 4 or weight.name in inputs):
                found[index] = weight._replace(listed=weight.name in inputs)
    counts = Counter(names)
    moved = [w for w in found.values() if counts[w.name] == 1]
    if not moved:
        return None
    keep = {w.name for w in moved}
    graph = bytearray()
    for index, (number, wire, v0, v1, f0) in enumerate(fields):
        if index not in found or found[index].name not in keep:
            graph += buf[f0:v1]
    for w in moved:
        if not w.listed:
            graph += _message(_GRAPH_INPUT, _value_info(w))
    out = bytearray()
    for number, wire, v0, v1, f0 in top:
        out += _message(_MODEL_GRAPH, bytes(graph)) if number == _MODEL_GRAPH else buf[f0:v1]
    return bytes(out), moved


def constants(data: bytes, lookup) -> tuple[bytes, list[str]]:
    """The serialized model ``data`` with each graph input that ``lookup(name)`` gives an
    array for made an initializer of that array's type and shape, its data external at
    :data:`PLACEHOLDER` (the caller hands onnxruntime the arrays: add_external_initializers),
    and the names so made. Constant weights are what onnxruntime's optimisers can transform
    and pre-pack (a fed Conv kernel they cannot). Nothing is changed in a model below IR
    version 4 (every initializer an input there) or one this reader cannot walk."""
    buf = memoryview(data)
    try:
        top = list(_fields(buf, 0, len(buf)))
        graphs = [f for f in top if f[0] == _MODEL_GRAPH and f[1] == 2]
        ir = [f for f in top if f[0] == _MODEL_IR_VERSION and f[1] == 0]
        if len(graphs) != 1 or not ir or _varint(buf, ir[-1][2], ir[-1][3])[0] < 4:
            return data, []
        fields = list(_fields(buf, graphs[0][2], graphs[0][3]))
        names = [_name(buf, f[2], f[3]) if f[0] == _GRAPH_INPUT and f[1] == 2 else None for f in fields]
    except _Malformed:
        return data, []
    counts = Counter(names)
    made, graph, tensors = [], bytearray(), bytearray()
    for (number, wire, v0, v1, f0), name in zip(fields, names):
        array = lookup(name) if isinstance(name, str) and counts[name] == 1 else None
        if array is None or np.dtype(array.dtype).str not in _ELEM_TYPES:
            graph += buf[f0:v1]
            continue
        made.append(name)
        tensor = b"".join(_varint_field(_TENSOR_DIMS, d) for d in array.shape)
        tensor += _varint_field(_TENSOR_TYPE, _ELEM_TYPES[np.dtype(array.dtype).str])
        tensor += _message(_TENSOR_NAME, name.encode()) + _varint_field(_TENSOR_LOCATION, _EXTERNAL)
        tensor += _message(_TENSOR_EXTERNAL, _message(1, b"location") + _message(2, PLACEHOLDER.encode()))
        tensors += _message(_GRAPH_INITIALIZER, tensor)
    if not made:
        return data, []
    out = bytearray()
    for number, wire, v0, v1, f0 in top:
        out += _message(_MODEL_GRAPH, bytes(graph + tensors)) if number == _MODEL_GRAPH else buf[f0:v1]
    return bytes(out), made


def _weight(buf, start, end, moved_bytes) -> Weight | None:
    """The initializer at buf[start:end] as a Weight, if it is one to move."""
    seen: dict[int, list] = {}
    for number, wire, v0, v1, _ in _fields(buf, start, end):
        seen.setdefault(number, []).append((wire, v0, v1))
    if not set(seen) <= {_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_LOCATION}:
        return None  # typed data, segments, external data, text: what the parser is to see
    once = [_TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW]
    if any(len(seen.get(n, ())) != 1 for n in once) or len(seen.get(_TENSOR_LOCATION, ())) > 1:
        return None
    (tw, t0, t1), (nw, n0, n1), (rw, r0, r1) = (seen[n][0] for n in once)
    if tw != 0 or nw != 2 or rw != 2 or r1 - r0 < moved_bytes:
        return None
    if _TENSOR_LOCATION in seen:
        lw, l0, l1 = seen[_TENSOR_LOCATION][0]
        if lw != 0 or _varint(buf, l0, l1)[0] != 0:  # not DEFAULT: external data
            return None
    elem_type = _varint(buf, t0, t1)[0]
    dims = []
    for wire, v0, v1 in seen.get(_TENSOR_DIMS, ()):
        if wire == 0:
            dims.append(_varint(buf, v0, v1)[0])
        elif wire == 2:  # packed
            pos = v0
            while pos < v1:
                value, pos = _varint(buf, pos, v1)
                dims.append(value)
        else:
            return None
    try:
        name = bytes(buf[n0:n1]).decode("utf-8")
    except UnicodeDecodeError:
        return None  # the checks on the skeleton report it
    if elem_type not in _DTYPES or not name or any(d >= 1 << 63 for d in dims):  # a negative int64
        return None
    if math.prod(dims) * np.dtype(_DTYPES[elem_type]).itemsize != r1 - r0:
        return None  # the checker and onnxruntime judge a size that does not match
    return Weight(name, elem_type, tuple(int(d) for d in dims), r0, r1 - r0, False)


def _value_info(w: Weight) -> bytes:
    """An encoded ValueInfoProto: ``w.name``, a tensor of its element type and shape."""
    shape = b"".join(_message(1, _varint_field(1, d)) for d in w.shape)  # TensorShapeProto.dim {dim_value}
    tensor = _varint_field(1, w.elem_type) + _message(2, shape)  # TypeProto.Tensor {elem_type, shape}
    return _message(1, w.name.encode()) + _message(2, _message(1, tensor))  # {name, type {tensor_type}}


def _name(buf, start, end, number: int = 1) -> str | bytes | None:
    """The last string field ``number`` of the message at buf[start:end] (a ValueInfoProto's
    or TensorProto's name)."""
    found = None
    for n, wire, v0, v1, _ in _fields(buf, start, end):
        if n == number and wire == 2:
            found = bytes(buf[v0:v1])
    try:
        return found.decode("utf-8") if found is not None else None
    except UnicodeDecodeError:
        return found


def _fields(buf, start: int, end: int):
    """(number, wire type, value start, value end, field start) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(buf, pos, end)
        elif wire == 2:
            size, value_start = _varint(buf, pos, end)
            pos = value_start + size
        elif wire in (1, 5):
            value_start, pos = pos, pos + (8 if wire == 1 else 4)
        else:  # groups: no ONNX message has them
            raise _Malformed
        if number == 0 or pos > end:
            raise _Malformed
        yield number, wire, value_start, pos, field_start


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value)


def _message(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload
