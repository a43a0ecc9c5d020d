"""GELU and SiLU derivatives taken once per forward pass (jacli/backends/torch_once.py): the
rewrites keep each activation's value and give torch's own derivative in every mode; a
TorchScript file and a torch.export program differentiate through them and only through them
(no GeluBackward/SiluBackward node left), their plain forward passes run the model as saved,
and their Jacobians match float64 torch.func on the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import jacli
from jacli.backends import torch_once
from jacli.backends.torch_locate import probe

OPS = {
    "gelu": (torch_once.gelu_erf, F.gelu),
    "gelu_tanh": (torch_once.gelu_tanh, lambda x: F.gelu(x, approximate="tanh")),
    "silu": (torch_once.silu, F.silu),
}


def _points(dtype):
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0, 40.0, -40.0], dtype=dtype)
    return torch.cat([special, torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=dtype) * 4])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_rewrite_keeps_the_value_and_gives_the_operators_derivative(name, dtype):
    rewrite, op = OPS[name]
    x = _points(dtype)
    assert torch.equal(rewrite(x), op(x))  # the value itself, not only close to it
    tol = 1e-14 if dtype == torch.float64 else 3e-7
    seeds = torch.randn(5, x.numel(), generator=torch.Generator().manual_seed(1), dtype=dtype)
    # torch's own derivative of the operator, one seed at a time
    want = torch.stack([torch.autograd.functional.vjp(op, x, s)[1] for s in seeds])
    xx = x.clone().requires_grad_(True)
    y = rewrite(xx)
    got = {
        "vmap of one backward pass": torch.func.vmap(lambda c: torch.autograd.grad(y, xx, c, retain_graph=True)[0])(seeds),
        "torch.func.vjp": torch.func.vmap(torch.func.vjp(rewrite, x)[1])(seeds)[0],
        "torch.func.jvp": torch.func.vmap(lambda t: torch.func.jvp(rewrite, (x,), (t,))[1])(seeds),
    }
    with fwAD.dual_level():
        got["dual tensors"] = torch.stack([fwAD.unpack_dual(rewrite(fwAD.make_dual(x, s))).tangent for s in seeds])
    u = torch.zeros_like(x, requires_grad=True)  # the double-VJP trick: d/du <J^T u, t>
    g, = torch.autograd.grad(rewrite(xx), xx, u, create_graph=True)
    got["double VJP"] = torch.stack([torch.autograd.grad(g, u, s, retain_graph=True)[0] for s in seeds])
    for how, value in got.items():
        torch.testing.assert_close(value, want, rtol=tol, atol=tol, msg=how)


class Net(torch.nn.Module):
    """The three activations (exact and tanh GELU in a submodule, SiLU), and one in a branch."""

    def __init__(self, branch: bool = True, detach: bool = False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)
        self.tanh_gelu = torch.nn.GELU(approximate="tanh")
        self.branch, self.detach = branch, detach

    def forward(self, x):
        h = F.gelu(self.a(x))
        if self.branch:
            if h.dim() == 2:  # always taken; scripted, a prim::If that freezing keeps
                h = F.silu(h) * 2.0
        h = self.tanh_gelu(h) + (h.detach() if self.detach else h)
        return torch.tanh(self.b(h))


def _reference(module, x):
    m64 = module.double()
    out = torch.func.vmap(torch.func.jacrev(lambda v: m64(v[None])[0]))(torch.from_numpy(x).double())
    module.float()
    return out.detach().numpy()


def _backward_nodes(out) -> set[str]:
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return {type(f).__name__ for f in seen}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("once")
    script, traced = Net().eval(), Net(branch=False).eval()
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    paths = {"script": root / "s.pt", "pt2": root / "e.pt2", "unfrozen": root / "d.pt"}
    torch.jit.script(script).save(str(paths["script"]))
    torch.export.save(torch.export.export(traced, (torch.from_numpy(x),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(paths["pt2"]))
    unfrozen = Net(detach=True).eval()  # freezing would drop its detach: jacli runs it as loaded
    torch.jit.script(unfrozen).save(str(paths["unfrozen"]))
    modules = {"script": script, "pt2": traced, "unfrozen": unfrozen}
    return {k: (paths[k], modules[k], _reference(modules[k], x)) for k in paths}, x


@pytest.mark.parametrize("kind", ["script", "pt2", "unfrozen"])
def test_saved_models_differentiate_through_the_rewrites_only(saved, kind):
    files, x = saved
    path, module, ref = files[kind]
    model = jacli.load(str(path))
    for mode in ("reverse", "forward"):
        J = jacli.jacobian(model, x, mode=mode)
        np.testing.assert_allclose(J, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    ts = model._tensors({model.inputs[0].name: x}, requires_grad=[model.inputs[0].name])
    with torch.enable_grad():
        plain = _backward_nodes(model._call(ts)[1][0])
        rewritten = _backward_nodes(model._call(ts, differentiated=True)[1][0])
    assert ({"GeluBackward0"} if kind == "pt2" else {"GeluBackward0", "SiluBackward0"}) <= plain
    assert not {n for n in rewritten if n.startswith(("Gelu", "Silu"))}, rewritten
    assert "TanhBackward0" in rewritten  # the rest of the graph is differentiated as it was
    # the plain forward pass is the model's own, bit for bit
    with torch.no_grad():
        own = module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(model.forward({model.inputs[0].name: x})[model.outputs[0].name], own)
    if kind == "unfrozen":
        assert list(model.module.parameters()), "expected the module as loaded, not frozen"


def test_strategies_agree_through_the_rewrites(saved, monkeypatch):
    files, x = saved
    results = []
    for strategy in ("vectorised", "sequential"):
        monkeypatch.setenv("JACLI_STRATEGY", strategy)
        results.append(jacli.jacobian(jacli.load(str(files["script"][0])), x))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6 * np.abs(results[0]).max())


def test_locate_names_the_rewritten_operators_as_recorded(saved):
    files, x = saved
    model = jacli.load(str(files["pt2"][0]))
    jacli.jacobian(model, x)  # differentiated: the program's graph is rewritten by now
    assert any(node.meta.get(torch_once.ORIGINAL) for node in model.module.graph.nodes)
    name = model.inputs[0].name
    order, values, _ = probe(model, {name: x}, {name: np.ones_like(x)})
    assert {"aten.gelu", "aten.silu"} & {o["op_type"] for o in order} == {"aten.gelu"}
    assert not [o for o in order if "function" in o["op_type"]]
