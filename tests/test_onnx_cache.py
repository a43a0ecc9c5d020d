"""The ONNX cache (jacli/backends/onnx/cache.py): a model seen before runs without
``import onnx`` and gives the same bits; a damaged, unwritable or disabled cache only costs
time; models whose meaning depends on more than their bytes are never cached."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import _security_models as evil
from conftest import SAMPLES, imported, mlp_jacobian

X = SAMPLES / "mlp_input.npy"
X3 = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32)


def cold_compute(tmp_path: Path, cache: Path, out: Path, *args) -> bool:
    """``jacli compute mlp.onnx`` in a new process; whether it imported onnx."""
    env = {**os.environ, "JACLI_CACHE_DIR": str(cache)}
    return "onnx" in imported(tmp_path, "compute", SAMPLES / "mlp.onnx", X, "-q", "-o", out, *args, env=env)


def entry(cache: Path, model: Path) -> Path:
    """The one entry folder of ``model`` in ``cache``."""
    (folder,) = (cache / "onnx" / hashlib.sha256(model.read_bytes()).hexdigest()).iterdir()
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.mark.parametrize("method, graph", [("ad", "vjp-"), ("fd", "f64-")])
def test_second_run_imports_no_onnx_and_gives_the_same_bits(tmp_path, method, graph):
    cache = tmp_path / "cache"
    assert cold_compute(tmp_path, cache, tmp_path / "J1.npy", "--method", method)
    stored = files(entry(cache, SAMPLES / "mlp.onnx"))
    assert "meta.json" in stored and [n for n in stored if n.startswith(graph) and n.endswith(".onnx")]
    assert {(entry(cache, SAMPLES / "mlp.onnx") / n).stat().st_mode & 0o777 for n in stored} == {0o600}
    assert not cold_compute(tmp_path, cache, tmp_path / "J2.npy", "--method", method)
    assert (tmp_path / "J1.npy").read_bytes() == (tmp_path / "J2.npy").read_bytes()
    assert files(entry(cache, SAMPLES / "mlp.onnx")) == stored


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "graph truncated": ("vjp-*.onnx", _truncate),
    "graph garbage": ("vjp-*.onnx", lambda f: f.write_bytes(b"\x00garbage" * 100)),
    "graph replaced by a valid model": ("vjp-*.onnx", lambda f: f.write_bytes((SAMPLES / "mlp.onnx").read_bytes())),
    "meta truncated": ("meta.json", _truncate),
    "meta of the wrong shape": ("meta.json", lambda f: f.write_text('{"inputs": [{"name": 1}], "outputs": []}')),
    "meta empty": ("meta.json", lambda f: f.write_bytes(b"")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_gives_the_right_jacobian_and_is_repaired(jacli, tmp_path, monkeypatch, weights, damage):
    monkeypatch.setenv("JACLI_CACHE_DIR", str(tmp_path / "cache"))
    args = ("compute", SAMPLES / "mlp.onnx", X, "-q", "-o")
    assert jacli(*args, tmp_path / "J1.npy").code == 0
    folder = entry(tmp_path / "cache", SAMPLES / "mlp.onnx")
    stored = files(folder)
    pattern, spoil = DAMAGE[damage]
    (target,) = folder.glob(pattern)
    spoil(target)
    r = jacli(*args, tmp_path / "J2.npy")
    assert r.code == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "J1.npy").read_bytes() == (tmp_path / "J2.npy").read_bytes()
    np.testing.assert_allclose(np.load(tmp_path / "J2.npy"), mlp_jacobian(weights, np.load(X)), atol=1e-6)
    assert files(folder) == stored


def test_cached_model_has_the_same_signature_digest_and_graphs(monkeypatch, tmp_path):
    import jacli

    monkeypatch.setenv("JACLI_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("mlp.onnx", "mlp_b1.onnx"):
        first, second = jacli.load(SAMPLES / name), jacli.load(SAMPLES / name)  # checked, then from the cache
        assert second._graph is None
        assert second.describe() == first.describe()
        assert second.sha256 == first.sha256 == hashlib.sha256((SAMPLES / name).read_bytes()).hexdigest()
        vjp = first.derivative_graph("vjp", ["x"], ["probs"]).SerializeToString()
        assert second.derivative_graph("vjp", ["x"], ["probs"]).SerializeToString() == vjp  # parses the model
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2  # different bytes, different entries
    shapes = {jacli.load(SAMPLES / n).inputs[0].shape for n in ("mlp.onnx", "mlp_b1.onnx")}
    assert shapes == {(None, 500), (1, 500)}


def _local_function_model(path: Path) -> None:
    """y = x + x through a model-local function in its own domain: plain ONNX, no plugin."""
    import onnx
    from onnx import TensorProto, helper

    double = helper.make_function("com.example", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Double", ["x"], ["y"], domain="com.example")], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              functions=[double])
    model.ir_version = 8
    onnx.save(model, path)


def test_models_with_external_data_or_custom_operators_are_not_cached(jacli, tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", X3)
    evil.onnx_matmul(tmp_path / "plain.onnx")
    evil.onnx_matmul(tmp_path / "external.onnx", external_location="weights/w.bin")
    evil.onnx_matmul(tmp_path / "custom.onnx", custom_domain="com.attacker")
    _local_function_model(tmp_path / "local.onnx")
    x = tmp_path / "x.npy"
    runs = {  # name: (arguments, exit code, cached)
        "plain": (("compute", tmp_path / "plain.onnx", x, "-q", "-o", tmp_path / "J-plain.npy"), 0, True),
        "local": (("compute", tmp_path / "local.onnx", x, "-q", "-o", tmp_path / "J-local.npy"), 0, True),
        "external": (("compute", tmp_path / "external.onnx", x, "-q", "-o", tmp_path / "J-external.npy",
                      "--trust-model"), 0, False),
        "custom": (("inspect", tmp_path / "custom.onnx"), 2, False),  # refused, and not remembered as checked
    }
    for name, (args, code, cached) in runs.items():
        cache = tmp_path / f"cache-{name}"
        monkeypatch.setenv("JACLI_CACHE_DIR", str(cache))
        for _ in range(2):  # the second run meets whatever the first one left
            r = jacli(*args)
            assert r.code == code, r.stderr
        assert cache.exists() == cached
    for name in ("plain", "external"):
        np.testing.assert_allclose(np.load(tmp_path / f"J-{name}.npy"), np.broadcast_to(evil.W.T, (2, 2, 3)))
    np.testing.assert_allclose(np.load(tmp_path / "J-local.npy"), np.broadcast_to(2 * np.eye(3), (2, 3, 3)))


def test_disabled_cache_writes_nothing_anywhere(jacli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JACLI_CACHE_DIR", "off")
    for _ in range(2):
        assert jacli("compute", SAMPLES / "mlp.onnx", X, "-q", "-o", tmp_path / "J.npy").code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["J.npy"]


def test_default_location_is_xdg_cache_home_then_home(jacli, tmp_path, monkeypatch):
    monkeypatch.delenv("JACLI_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jacli("inspect", SAMPLES / "mlp.onnx").code == 0
    assert (tmp_path / "xdg" / "jacli" / "onnx").is_dir() and not (tmp_path / "home").exists()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert jacli("inspect", SAMPLES / "mlp.onnx").code == 0
    assert (tmp_path / "home" / ".cache" / "jacli" / "onnx").is_dir()


def test_a_cache_that_cannot_be_created_is_skipped_silently(jacli, tmp_path, monkeypatch, weights):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("JACLI_CACHE_DIR", str(tmp_path / "file" / "sub"))
    for method in ("ad", "fd", "ad"):
        r = jacli("compute", SAMPLES / "mlp.onnx", X, "-q", "-o", tmp_path / "J.npy", "--method", method)
        assert r.code == 0 and r.stderr == "", r.stderr
        np.testing.assert_allclose(np.load(tmp_path / "J.npy"), mlp_jacobian(weights, np.load(X)), atol=1e-5)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_other_wire_sizes_start_another_entry(tmp_path, monkeypatch):
    """Which weights are fed (wire's sizes) decides a derived graph's inputs: a graph derived
    with a weight fed, read back where that weight is embedded, would lack an input. The
    entry's tag holds the sizes."""
    from jacli.backends.onnx import cache, wire

    monkeypatch.setenv("JACLI_CACHE_DIR", str(tmp_path / "cache"))
    tags = {cache.entry("0" * 64)}
    monkeypatch.setattr(wire, "MOVED_BYTES", 64)
    tags.add(cache.entry("0" * 64))
    monkeypatch.setattr(wire, "MOVED_TOTAL", 1 << 10)
    tags.add(cache.entry("0" * 64))
    assert len(tags) == 3 and len({t.parent for t in tags}) == 1
