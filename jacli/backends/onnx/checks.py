"""Checks on untrusted ONNX models, beside their loader (model.py): external data that
would be read from outside the model's folder, and text that is not UTF-8. Custom-domain
operators are refused by the loader itself. See docs/security.md."""
from __future__ import annotations

import stat
from pathlib import Path

from ... import limits
from ...errors import ModelLoadError
from ..refusal import inside


def onnx_external_data_problems(proto, model_dir: str) -> list[str]:
    """External-data tensors whose file lies outside the model's directory (an absolute
    path, a '..' escape or a symbolic link pointing elsewhere), or is not a regular file (a
    FIFO would hang the load, a device never end); and external data over the read limit."""
    from onnx import TensorProto

    base = Path(model_dir).resolve()
    problems, sizes = [], {}
    for tensor in tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve() if inside(location) else None
        if target is None or (target != base and base not in target.parents):
            problems.append(f"tensor {tensor.name!r} reads its data from {location!r}, outside the model's directory")
            continue
        try:
            st = target.stat()
        except OSError:
            continue  # missing: the loader reports it
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"tensor {tensor.name!r} reads its data from {location!r}, which is not a regular file")
        sizes[target] = st.st_size
    limits.check_fits(sum(sizes.values()), "the model's external data", ModelLoadError, "see JACLI_READ_LIMIT")
    return problems


def tensors(proto):
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
