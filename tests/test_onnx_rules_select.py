"""Derivative rules of contraction and selection operators (rules/linalg.py, rules/movement.py):
Einsum, Det, TopK (values), ScatterND/ScatterElements (none/add/mul), GatherElements/GatherND
(also before opset 16, without scatter-add), Compress, ReverseSequence and Hardmax, on the
attribute sets and inputs of onnx's own node tests and on tables of our own, against float64
finite differences of onnx.reference, VJP and JVP, plus the adjoint identity; and a module
of them exported by torch.onnx (both exporters) against torch float64 autograd."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto as TP

from jacli.backends.onnx.derive import build_vjp
from jacli.errors import UnsupportedError
from onnx_harness import I64, RNG, _session, assert_close, jacobians, node_model
from onnx_rules_check import as_rule_case, check_rule, node_tests

NODE_TESTS = [("einsum", "Einsum"), ("det", "Det"), ("topk", "TopK"), ("scatternd", "ScatterND"),
              ("scatterelements", "ScatterElements"), ("gatherelements", "GatherElements"),
              ("gathernd", "GatherND"), ("compress", "Compress"), ("reversesequence", "ReverseSequence")]
FLOAT_INPUTS = {"Einsum": None, "ScatterND": (0, 2), "ScatterElements": (0, 2)}  # None: every input


def _node_cases():
    for module, op in NODE_TESTS:
        for name, model, inputs in node_tests(module, op):
            wrts = FLOAT_INPUTS.get(op, (0,))
            for wrt in range(len(inputs)) if wrts is None else wrts:
                if np.asarray(inputs[wrt]).dtype.kind == "f" and np.asarray(inputs[wrt]).size:
                    yield pytest.param(model, inputs, wrt, id=f"{name}-wrt{wrt}")


def _unique_scatter(model, inputs):
    """Whether a mul-scatter writes each position once (else its updates have no rule)."""
    node = model.graph.node[0]
    reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
    if reduction != "mul":
        return True
    idx = np.asarray(inputs[1])
    if node.op_type == "ScatterND":
        rows = idx.reshape(-1, idx.shape[-1]).tolist()
    else:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        coords = list(np.indices(idx.shape))
        coords[axis] = idx
        rows = np.stack([c.ravel() for c in coords], 1).tolist()
    return len({tuple(r) for r in rows}) == len(rows)


@pytest.mark.parametrize("model, inputs, wrt", list(_node_cases()))
def test_selection_rule_on_onnx_node_test(model, inputs, wrt):
    op = model.graph.node[0].op_type
    if op == "Det":
        inputs = [RNG.standard_normal(np.shape(inputs[0]))]  # the node tests' matrices are singular-ish
    if op == "TopK":  # distinct values: the selection does not change within finite differences
        inputs = [RNG.permutation(np.arange(np.size(inputs[0]))).reshape(np.shape(inputs[0])) * 0.1] + inputs[1:]
    case, feeds = as_rule_case(model, inputs, wrt=wrt)
    reduction = next((a.s.decode() for a in model.graph.node[0].attribute if a.name == "reduction"), "none")
    if reduction in ("max", "min"):
        with pytest.raises(UnsupportedError, match=f"reduction='{reduction}'"):
            build_vjp(case, ["x"], ["y"])
        return
    if op in ("ScatterND", "ScatterElements") and wrt == 2 and not _unique_scatter(model, inputs):
        with pytest.raises(UnsupportedError, match="reduction='mul'"):
            build_vjp(case, ["x"], ["y"])
        return
    check_rule(case, feeds)


EINSUM = [
    ("ij,jk->ik", [[3, 4], [4, 2]]), ("bij,bjk->bik", [[2, 3, 4], [2, 4, 2]]), ("...ij,...jk", [[2, 3, 4], [2, 4, 2]]),
    ("ij->", [[3, 4]]), ("ij,ij->i", [[3, 4], [3, 4]]), ("i,j->ij", [[3], [4]]), ("ijk->kji", [[2, 3, 4]]),
    ("ij,jk,kl->il", [[2, 3], [3, 4], [4, 2]]), ("bn,anm,bm->ba", [[2, 3], [4, 3, 2], [2, 2]]),
    ("ii->i", [[3, 3]]), ("...i,...i->...", [[2, 4, 3], [2, 4, 3]]), ("bii->bi", [[2, 3, 3]]), ("ii", [[3, 3]]),
    ("ijk,k", [[2, 3, 4], [4]]),
]


@pytest.mark.parametrize("equation, shapes", EINSUM, ids=[e for e, _ in EINSUM])
def test_einsum_equations(equation, shapes):
    for k in range(len(shapes)):  # each operand in turn is x, the others initializers
        inputs = {("x" if i == k else f"in{i}"): (list(s) if i == k else RNG.standard_normal(s).astype(np.float32))
                  for i, s in enumerate(shapes)}
        model, feeds = node_model("Einsum", inputs, {"equation": equation}, opset=12)
        check_rule(model, feeds)


def test_det_of_singular_matrices_and_sizes_1_to_3():
    """The cofactor rule is exact where X^-1 does not exist (rank n-1: the gradient is not 0)."""
    for shape in ([2, 1, 1], [3, 2, 2], [2, 3, 3]):
        model, feeds = node_model("Det", {"x": shape}, opset=11)
        check_rule(model, feeds)
    singular = np.array([[1, 2, 3], [2, 4, 6], [1, 0, 1]], np.float32)
    model, _ = node_model("Det", {"x": [3, 3]}, opset=11)
    rows, cols = jacobians(model, {"x": singular})
    cof = np.array([[np.linalg.det(np.delete(np.delete(singular, i, 0), j, 1)) * (-1) ** (i + j) for j in range(3)]
                    for i in range(3)])
    np.testing.assert_allclose(rows.reshape(3, 3), cof, atol=1e-5)
    np.testing.assert_allclose(cols.reshape(3, 3), cof, atol=1e-5)
    assert np.abs(cof).max() > 1


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
@pytest.mark.parametrize("reduction", ["none", "add", "mul"])
@pytest.mark.parametrize("wrt", [0, 2])
def test_scatter_reductions(op, reduction, wrt):
    """Duplicate positions for add (and for mul w.r.t. the data), distinct ones otherwise."""
    dup = reduction == "add" or (reduction == "mul" and wrt == 0)
    if op == "ScatterND":
        idx = I64(0, 2, 0) if dup else I64(0, 2, 3)
        idx, upd = idx.reshape(3, 1), [3, 3]
    else:
        idx = np.array([[1, 0, 1], [2, 2, 0]] if dup else [[1, 0, 2], [2, 1, 0]], np.int64)
        upd = [2, 3]
    names = ["data", "i", "u"]
    shapes = {"data": [4, 3], "i": idx, "u": upd}
    inputs = {("x" if k == wrt else n): v for k, (n, v) in enumerate(zip(names, shapes.values()))}
    attrs = {"reduction": reduction} | ({"axis": 1} if op == "ScatterElements" else {})
    model, feeds = node_model(op, inputs, attrs, opset=18)
    check_rule(model, feeds)


def test_scatter_mul_updates_with_duplicate_positions_is_refused():
    model, _ = node_model("ScatterND", {"d": np.ones((4, 3), np.float32), "i": I64(0, 0).reshape(2, 1), "x": [2, 3]},
                          {"reduction": "mul"}, opset=18)
    with pytest.raises(UnsupportedError, match="constant and distinct"):
        build_vjp(model, ["x"], ["y"])


@pytest.mark.parametrize("opset", [13, 16])
@pytest.mark.parametrize("op", ["GatherElements", "GatherND", "Gather"])
def test_gathers_with_repeated_indices_before_and_from_opset_16(opset, op):
    """Before opset 16 there is no scatter-add: the cotangents of repeated positions are summed
    with a one-hot matrix."""
    idx = {"GatherElements": np.array([[0, 0, 2], [1, 1, 1], [2, 0, 0]], np.int64),
           "GatherND": np.array([[0, 1], [0, 1], [2, 2]], np.int64), "Gather": I64(2, 0, 2, 2)}[op]
    model, feeds = node_model(op, {"x": [3, 3], "i": idx}, {"axis": 1} if op != "GatherND" else {}, opset=opset)
    expected = check_rule(model, feeds)
    assert expected.sum(0).max() > 1.5  # a position taken twice


def test_hardmax_is_piecewise_constant():
    model, feeds = node_model("Hardmax", {"x": [2, 4]}, opset=13)
    rows, cols = jacobians(model, feeds)
    assert rows.shape == (8, 8) and not rows.any() and not cols.any()


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_compress_along_axes_and_flattened(axis):
    model, feeds = node_model("Compress", {"x": [3, 4], "c": np.array([True, False, True], bool)},
                              {} if axis is None else {"axis": axis}, opset=11)
    check_rule(model, feeds)


@pytest.mark.parametrize("batch_axis, time_axis", [(1, 0), (0, 1)])
def test_reverse_sequence(batch_axis, time_axis):
    shape = [4, 3, 2] if batch_axis == 1 else [3, 4, 2]
    model, feeds = node_model("ReverseSequence", {"x": shape, "l": I64(4, 1, 2)},
                              {"batch_axis": batch_axis, "time_axis": time_axis}, opset=10)
    check_rule(model, feeds)


@pytest.mark.parametrize("largest, sorted_", [(1, 1), (0, 1), (1, 0)])
def test_topk_values(largest, sorted_):
    model, _ = node_model("TopK", {"x": [3, 5], "k": I64(2)}, {"axis": 1, "largest": largest, "sorted": sorted_},
                          opset=11, outputs=("y", "i"))
    model.graph.output[1].type.tensor_type.elem_type = TP.INT64
    x = (RNG.permutation(15).reshape(3, 5) * 0.1).astype(np.float32)
    if sorted_:
        check_rule(model, {"x": x})
    # the order of unsorted values is onnxruntime's: the Jacobian is the one-hot of its Indices
    (indices,) = _session(model).run(["i"], {"x": x})
    expected = np.zeros((6, 15))
    for r in range(3):
        for j in range(2):
            expected[2 * r + j, 5 * r + indices[r, j]] = 1
    rows, cols = jacobians(model, {"x": x})
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(cols, expected)


# --------------------------- end to end: a module of these operators exported by torch.onnx
class _Selections(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):  # (B, 3, 4), positive
        a = torch.einsum("bij,kj->bik", x, self.w @ self.w.T)
        top = torch.topk(x, 2, dim=-1).values.sum(-1, keepdim=True)
        prod = torch.prod(x, dim=2, keepdim=True)
        det = torch.linalg.det(x[:, :, :3]).view(-1, 1, 1)
        y = x.clone()
        y[:, 1] = x[:, 0] * 2.0  # index_put: ScatterND / ScatterElements
        mod = torch.fmod(x, 0.7) + torch.remainder(x, 0.9)
        return a + top + prod + det + y + mod + torch.tan(x * 0.3) + F.mish(x) + F.celu(x, 0.5)


@pytest.mark.parametrize("opset, dynamo", [(17, False), (18, True)])
def test_exported_selection_module_matches_torch_autograd(opset, dynamo):
    torch.manual_seed(0)
    net = _Selections().eval()
    x = RNG.uniform(0.2, 1.5, (2, 3, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            model = torch.onnx.export(net, (torch.from_numpy(x),), dynamo=True, verbose=False, opset_version=opset,
                                      input_names=["x"], output_names=["y"]).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(net, (torch.from_numpy(x),), buffer, dynamo=False, opset_version=opset,
                              input_names=["x"], output_names=["y"])
            model = onnx.load_from_string(buffer.getvalue())
    assert {"Einsum", "TopK", "ReduceProd", "Det", "Mod", "Tan"} <= {n.op_type for n in model.graph.node}
    net64 = _Selections().double()
    net64.load_state_dict(net.state_dict())
    expected = torch.autograd.functional.jacobian(net64, torch.from_numpy(x.astype(np.float64))).reshape(24, 24)
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected.numpy(), 1e-4)
    assert_close(cols, expected.numpy(), 1e-4)
