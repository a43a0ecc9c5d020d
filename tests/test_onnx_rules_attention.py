"""Attention and RotaryEmbedding (opset 23), decomposed into ONNX's own function bodies,
on every node-test case onnxruntime runs at opset 23, in both modes against float64
finite differences and the adjoint identity; and attention blocks as exporters emit them."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_cases import case_model, check_decomposition, check_model, node_cases, session  # noqa: E402

CASES = {**node_cases("attention", "Attention"), **node_cases("rotaryembedding", "RotaryEmbedding")}


def _runnable():
    names = []
    for name, (node, inputs, opsets, _) in sorted(CASES.items()):
        if any(np.asarray(v).dtype not in (np.float32, np.int64, np.bool_) for v in inputs if v is not None):
            continue  # float16/bfloat16 cases
        try:
            model, feeds = case_model(node, inputs, 23, opsets)
            ys = session(model).run(None, feeds)
        except Exception:  # needs a later opset, or onnxruntime lacks the variant
            continue
        if not all(np.isfinite(y).all() for y in ys[:3]):
            continue  # fully masked rows: NaN outputs, no derivative to check
        names.append(name)
    return names


# Rows whose every key is masked: the output there is a constant (0), but the softmax's
# derivative multiplies by its NaN probabilities (as torch's does): a documented limitation.
FULLY_MASKED = {"test_attention_local_window_gqa_rank4_mask", "test_attention_causal_boolmask_nan_robustness",
                "test_attention_24_fullymasked_qk_matmul_output_mode3_zero",
                "test_attention_23_fullymasked_qk_matmul_output_mode3_zero",
                "test_attention_23_boolmask_fullymasked_row_nan_robustness"}
RUNNABLE = [name for name in _runnable() if name not in FULLY_MASKED]


def test_most_node_cases_run():
    assert len(RUNNABLE) >= 40, RUNNABLE


@pytest.mark.parametrize("name", RUNNABLE)
def test_onnx_node_cases(name):
    node, inputs, opsets, _ = CASES[name]
    model, feeds = case_model(node, inputs, 23, opsets)
    # qk_matmul_output (a debugging output) is left out: onnxruntime's kernel and ONNX's
    # function body disagree on which stage of the scores it shows
    of = [o for o in node.output[:3] if o]
    check_decomposition(model, feeds, atol=1e-4, of=of)
    check_model(model, feeds, of=of, tol=5e-4)


def _attention_block():
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)
            self.out = torch.nn.Linear(8, 8)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, t, 8)) + x

    torch.manual_seed(0)
    return Block().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_exported_attention_block_matches_torch_autograd(tmp_path, dynamo):
    """torch.onnx's decompositions of scaled_dot_product_attention (MatMul, Softmax, masks)."""
    import torch
    import onnx

    from jacli import api

    block = _attention_block()
    path = tmp_path / "attn.onnx"
    torch.onnx.export(block, (torch.randn(1, 5, 8),), str(path), dynamo=dynamo, input_names=["x"],
                      output_names=["y"], opset_version=None if dynamo else 17)
    assert "Softmax" in {n.op_type for n in onnx.load(path).graph.node}
    model = api.load(str(path))
    xs = np.random.default_rng(3).standard_normal((1, 5, 8)).astype(np.float32)
    ref = torch.autograd.functional.jacobian(block.double(), torch.tensor(xs, dtype=torch.float64)).numpy()
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(api.jacobian(model, xs, mode=mode), ref[:, :, :, 0], rtol=1e-4, atol=1e-5)


def test_opset23_attention_block_matches_torch_autograd(tmp_path):
    """The same block with its core as one opset-23 Attention node (heads as 4-D inputs)."""
    import torch
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from jacli import api

    block = _attention_block()
    w_qkv, b_qkv = (p.detach().numpy() for p in block.qkv.parameters())
    w_out, b_out = (p.detach().numpy() for p in block.out.parameters())
    inits = [nh.from_array(w_qkv.T.copy(), "wqkv"), nh.from_array(b_qkv, "bqkv"), nh.from_array(w_out.T.copy(), "wo"),
             nh.from_array(b_out, "bo"), nh.from_array(np.array([1, 5, 3, 2, 4], np.int64), "split_heads"),
             nh.from_array(np.array([1, 5, 8], np.int64), "merge_heads")]
    nodes = [oh.make_node("MatMul", ["x", "wqkv"], ["h0"]), oh.make_node("Add", ["h0", "bqkv"], ["h"]),
             oh.make_node("Reshape", ["h", "split_heads"], ["h5"]),
             oh.make_node("Transpose", ["h5"], ["qkv"], perm=[2, 0, 3, 1, 4]),
             oh.make_node("Split", ["qkv"], ["q3", "k3", "v3"], axis=0, num_outputs=3)]
    nodes += [oh.make_node("Squeeze", [f"{t}3", "zero"], [t]) for t in "qkv"]
    nodes += [oh.make_node("Attention", ["q", "k", "v"], ["a"], is_causal=1),
              oh.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]),
              oh.make_node("Reshape", ["at", "merge_heads"], ["m"]), oh.make_node("MatMul", ["m", "wo"], ["o0"]),
              oh.make_node("Add", ["o0", "bo"], ["o"]), oh.make_node("Add", ["o", "x"], ["y"])]
    inits.append(nh.from_array(np.array([0], np.int64), "zero"))
    graph = oh.make_graph(nodes, "attn23", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 5, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 5, 8])], inits)
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)]), tmp_path / "attn23.onnx")
    model = api.load(str(tmp_path / "attn23.onnx"))
    xs = np.random.default_rng(4).standard_normal((1, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(model.forward({"x": xs})["y"], block(torch.tensor(xs)).detach().numpy(), atol=1e-5)
    ref = torch.autograd.functional.jacobian(block.double(), torch.tensor(xs, dtype=torch.float64)).numpy()
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(api.jacobian(model, xs, mode=mode), ref[:, :, :, 0], rtol=1e-4, atol=1e-5)
