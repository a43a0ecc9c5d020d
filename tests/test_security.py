"""Trust and safety: untrusted model files are refused before any of their code runs,
hostile input is refused before it is allocated, and an interrupted run never loses or
truncates an output file.

Each malicious model's payload creates a marker file. Refused: the marker must not exist.
With --trust-model: it must exist (the payload is live, so the refusal is what stopped it).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import _security_models as evil
from jacli import limits
from jacli.backends import savedmodel_checks, torch_checks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
X3 = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_refused(result, *words: str) -> str:
    """Exit 2, one ``Error:`` line naming every word and --trust-model, no traceback."""
    lines = error_lines(result.stderr)
    assert result.code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    for word in (*words, "--trust-model"):
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("security")
    marker = str(d / "MARKER")
    np.save(d / "x3.npy", X3)
    return d, marker


@pytest.fixture
def marker(built):
    path = Path(built[1])
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


# --- torch.save pickles ------------------------------------------------------------------
@pytest.fixture(scope="session")
def pickles(built):
    d, m = built
    return evil.torch_pickles(d, m)


@pytest.mark.parametrize("kind", ["zip", "legacy", "legacy_pkl"])
def test_torch_pickle_refused_and_nothing_runs(jacli, pickles, marker, kind):
    assert_refused(jacli("inspect", pickles[kind]), "torch.save pickle", "arbitrary code")
    assert not marker.exists()
    # naming the format does not get around the check
    assert_refused(jacli("inspect", "--format", "torchscript", pickles[kind]), "torch.save pickle")
    assert not marker.exists()
    # trusted: torch.load (weights_only=False) unpickles it, so the payload runs
    r = jacli("inspect", "--trust-model", pickles[kind])
    assert marker.exists()
    assert r.code == 2 and "not a torch.nn.Module" in r.stderr


def test_trusted_torch_pickle_gives_the_closed_form_jacobian(jacli, built, tmp_path):
    d, _ = built
    weight, bias = evil.torch_sequential(tmp_path / "seq.pt")
    assert_refused(jacli("compute", tmp_path / "seq.pt", d / "x3.npy"), "torch.save pickle")
    r = jacli("compute", "--trust-model", tmp_path / "seq.pt", d / "x3.npy", "-o", tmp_path / "j.npy", "-q")
    assert r.code == 0, r.stderr
    y = np.tanh(X3 @ weight.T + bias)
    expected = (1 - y**2)[:, :, None] * weight[None]  # d tanh(Wx+b)/dx = diag(1 - y^2) W
    np.testing.assert_allclose(np.load(tmp_path / "j.npy"), expected, rtol=1e-5, atol=1e-6)


# --- TorchScript --------------------------------------------------------------------------
def test_torchscript_calling_from_file_refused(jacli, built, marker):
    d, m = built
    path = d / "from_file.pt"
    evil.torchscript_from_file(path, m)
    assert_refused(jacli("inspect", path), "torch.from_file")
    assert not marker.exists()
    assert jacli("inspect", "--trust-model", path).code == 0
    assert marker.exists()  # torch.jit.load ran __setstate__, which created the file
    clean = path.with_name("clean_from_file.pt")
    assert jacli("compute", clean, d / "x3.npy", "--json").code == 0  # the same model without the call loads


# --- torch.export (.pt2) ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def archives(built):
    d, m = built
    return evil.torch_export_archives(d, m)


def _dense_jacobian(x):
    """d tanh(x W + B)/dx = diag(1 - y^2) W^T per sample."""
    y = np.tanh(x @ evil.W + evil.B)
    return (1 - y**2)[:, :, None] * evil.W.T[None]


@pytest.mark.parametrize("kind, words", [
    ("pickle", ["a pickle that needs arbitrary code (data/sample_inputs/model.pt)"]),
    ("expression", ["shape expression", "Max(0, __import__", "evaluate as Python"]),
    ("guard", ["shape guard", "run as Python code"]),
    ("path", ["module path with quotes", "generated Python code"]),
])
def test_torch_export_payload_refused_and_nothing_runs(jacli, built, archives, marker, tmp_path, kind, words):
    d, _ = built
    assert_refused(jacli("compute", archives[kind], d / "x3.npy", "-o", tmp_path / "J.npy"), *words)
    assert not marker.exists() and not (tmp_path / "J.npy").exists()
    # trusted: the payload runs, and the program still gives its Jacobian (only the refusal stopped it)
    r = jacli("compute", "--trust-model", archives[kind], d / "x3.npy", "-o", tmp_path / "J.npy", "-q")
    assert r.code == 0, r.stderr
    assert marker.exists()
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), _dense_jacobian(X3), rtol=1e-5, atol=1e-6)


def test_clean_torch_export_program_loads_without_trust(jacli, built, archives, marker, tmp_path):
    d, _ = built
    r = jacli("compute", archives["clean"], d / "x3.npy", "-o", tmp_path / "J.npy", "-q")
    assert r.code == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), _dense_jacobian(X3), rtol=1e-5, atol=1e-6)
    assert torch_checks.torch_export_problems("clean.pt2", archives["clean"].read_bytes()) == []
    assert not marker.exists()


def _set_target(target):
    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target
    return evil.program_edit(edit)


def _weights_config(edit):
    def apply(members):
        config = json.loads(members["data/weights/model_weights_config.json"])
        edit(config["config"])
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    return apply


def _opaque_constant(members):
    members["data/constants/opaque_obj_0"] = b"\x80\x04N."
    entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    members["data/constants/model_constants_config.json"] = json.dumps({"config": {"c": entry}}).encode()


def _module_call_signature(edit):
    def apply(program):
        edit(program["graph_module"]["module_call_graph"][0]["signature"])
    return evil.program_edit(apply)


def _kwargs_key(signature):
    """A keyword argument named k' (its name would be written into generated code in quotes)."""
    spec = json.loads(signature["in_spec"])
    kwargs = spec[1]["children_spec"][1]
    assert kwargs["type"] == "builtins.dict"
    kwargs["context"] = json.dumps(["k'"])
    kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
    signature["in_spec"] = json.dumps(spec)


@pytest.mark.parametrize("edit, words", [
    (_set_target("torch.ops.aten.from_file.default"), ["torch.ops.aten.from_file.default", "(shared) writes files"]),
    (_set_target("torch.ops.aten.save.default"), ["torch.ops.aten.save.default", "writes files"]),
    (_set_target("torch.serialization.os.system"), ["torch.serialization.os.system", "does not allow"]),
    (_set_target("torch.ops.higher_order.print"), ["torch.ops.higher_order.print", "does not allow"]),
    (_weights_config(lambda c: c["lin.weight"].update(use_pickle=True)), ["pickled tensor", "data/weights/weight_0"]),
    (_opaque_constant, ["pickled Python or TorchBind object (data/constants/opaque_obj_0)"]),
    (lambda m: m.update({"data/aotinductor/model/model.so": b"\x7fELF"}), ["AOTInductor", "native library"]),
    (_module_call_signature(lambda s: s.update(forward_arg_names=["x=exec(chr(49))"])),
     ["argument name", "'x=exec(chr(49))'"]),
    (_module_call_signature(_kwargs_key), ["argument key with quotes", "\"k'\""]),
    (evil.program_edit(lambda p: p["graph_module"]["graph"]["inputs"][-1]["as_tensor"].update(name="x=1")),
     ["name that is not an identifier ('x=1')"]),
    (evil.program_edit(lambda p: p["graph_module"]["signature"]["input_specs"][-1]["user_input"].update(
        arg={"as_string": "x"})), ["user input that is not a tensor"]),
])
def test_torch_export_archives_that_could_run_code_are_refused(jacli, archives, tmp_path, edit, words):
    """Refused before torch sees them: what would run code or touch files, and what torch
    would write into Python code it generates."""
    path = tmp_path / "edited.pt2"
    evil.pt2_edited(archives["clean"], path, edit)
    assert_refused(jacli("inspect", path), *words)


def test_torch_export_old_layout_refused(jacli, archives, tmp_path):
    """torch.export.load falls back to the old layout (with its own pickles) when loading
    the current one fails: an archive with a top-level 'version' is not loaded untrusted."""
    path = tmp_path / "old.pt2"
    evil.pt2_edited(archives["clean"], path, lambda members: None)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("version", "1")
        z.writestr("serialized_exported_program.json", "{}")
    assert_refused(jacli("inspect", path), "old torch.export layout")


def test_torch_export_reads_the_bytes_it_checked(archives, marker, tmp_path, monkeypatch):
    """The archive is read once: swapping the file after the check does not get a payload in."""
    import jacli.backends.torch_export as te

    path = tmp_path / "swapped.pt2"
    shutil.copy(archives["clean"], path)
    real = torch_checks.torch_export_problems

    def check_then_swap(p, data):
        problems = real(p, data)
        shutil.copy(archives["guard"], path)  # the file changes after it was checked
        return problems

    monkeypatch.setattr(torch_checks, "torch_export_problems", check_then_swap)
    model = te.load(str(path))
    assert [s.name for s in model.inputs] == ["x"]
    (y,) = model.forward({"x": X3}).values()
    np.testing.assert_allclose(y, np.tanh(X3 @ evil.W + evil.B), rtol=1e-6)
    assert path.read_bytes() == archives["guard"].read_bytes() and not marker.exists()


# --- Keras --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lambdas(built):
    d, m = built
    return evil.keras_lambdas(d, m)


@pytest.mark.parametrize("kind", ["keras", "keras3_h5", "tf_keras_h5"])
def test_keras_lambda_refused_and_nothing_runs(jacli, lambdas, marker, kind):
    assert_refused(jacli("inspect", lambdas[kind]), "Lambda layer", "Python code")
    assert not marker.exists()
    assert jacli("inspect", "--trust-model", lambdas[kind]).code == 0
    assert marker.exists()


def test_keras_config_naming_outside_modules_or_files_is_refused(jacli, tmp_path):
    def foreign_module(config):
        config["config"]["layers"][1]["module"] = "subprocess"

    def vocabulary_file(config):
        config["config"]["layers"][1]["config"]["vocabulary"] = "/etc/passwd"

    for edit, words in ((foreign_module, ("module 'subprocess'",)), (vocabulary_file, ("vocabulary", "/etc/passwd"))):
        path = tmp_path / f"{edit.__name__}.keras"
        evil.keras_with_config(SAMPLES / "mlp.keras", path, edit)
        assert_refused(jacli("inspect", path), *words)


# --- SavedModel ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def savedmodels(built):
    d, m = built
    return evil.savedmodels(d, m)


@pytest.mark.parametrize("name, words, live", [
    ("WritesInServe", ["WriteFile", "serving_default"], "jacli"),
    ("PyFuncInServe", ["EagerPyFunc", "runs Python code"], None),
    ("WritesInGradient", ["WriteFile", "custom gradient"], "gradient"),
    ("WritesOnLoad", ["WriteFile", "_initialize", "during loading"], "jacli"),
    ("TF1WritesOnLoad", ["WriteFile", "TF1"], "jacli"),
])
def test_savedmodel_with_dangerous_ops_refused(jacli, built, savedmodels, marker, name, words, live):
    x = built[0] / "x3.npy"
    assert_refused(jacli("compute", savedmodels[name], x, "--json"), *words)
    assert not marker.exists()
    # the payload is live: trusted (or loaded by TF itself and differentiated), the op runs
    if live == "jacli":
        jacli("compute", "--trust-model", savedmodels[name], x, "--json")
        assert marker.exists()
    elif live == "gradient":
        _tf_gradient(savedmodels[name])
        assert marker.exists()


def _tf_gradient(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keeps the signature's variables alive
    x = tf.constant(X3)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = loaded.signatures["serving_default"](x=x)["y"]
    return tape.gradient(y, x)


@pytest.mark.parametrize("name", ["Clean", "UnreachableWriter", "TF1Clean"])
def test_savedmodel_checkpoint_machinery_and_unreachable_functions_are_not_refused(jacli, built, savedmodels, marker,
                                                                                   tmp_path, name):
    """Every SavedModel carries SaveV2/RestoreV2 functions (and TF1 ones a restore graph);
    a function nothing calls is never run either. None of these is a reason to refuse."""
    r = jacli("compute", savedmodels[name], built[0] / "x3.npy", "-o", tmp_path / "j.npy", "-q")
    assert r.code == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "j.npy"), np.broadcast_to(evil.W.T, (2, 2, 3)), rtol=1e-6)
    assert not marker.exists()


def test_savedmodel_scan_finds_the_saver_ops_it_deliberately_skips(savedmodels):
    """The skipped checkpoint functions do hold file ops: the scan is precise, not blind."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((savedmodels["Clean"] / "saved_model.pb").read_bytes())
    ops = {n.op for f in sm.meta_graphs[0].graph_def.library.function for n in f.node_def}
    assert {"SaveV2", "RestoreV2", "MergeV2Checkpoints"} <= ops
    assert savedmodel_checks.savedmodel_problems(str(savedmodels["Clean"]), sm) == []
    everything = [(f.signature.name, "all") for f in sm.meta_graphs[0].graph_def.library.function]
    found = savedmodel_checks._Library(sm.meta_graphs[0].graph_def.library).scan(everything)
    assert any(p.startswith("SaveV2") for p in found) and any(p.startswith("RestoreV2") for p in found)


def test_savedmodel_asset_outside_the_model_directory_refused(jacli, savedmodels, tmp_path):
    evil.savedmodel_with_asset(savedmodels["Clean"], tmp_path / "m", "../../../etc/passwd")
    assert_refused(jacli("inspect", tmp_path / "m"), "asset file", "../../../etc/passwd")


def test_corrupt_saved_model_pb_is_a_load_error(jacli, tmp_path):
    import shutil

    shutil.copytree(SAMPLES / "map2d_savedmodel", tmp_path / "m")
    (tmp_path / "m" / "saved_model.pb").write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    r = jacli("inspect", tmp_path / "m")
    assert r.code == 2 and error_lines(r.stderr)[0].startswith("Error: cannot load SavedModel"), r.stderr


# --- ONNX ---------------------------------------------------------------------------------
def test_onnx_custom_domain_operator_refused_with_its_name(jacli, tmp_path):
    evil.onnx_matmul(tmp_path / "custom.onnx", custom_domain="com.attacker")
    assert_refused(jacli("inspect", tmp_path / "custom.onnx"), "com.attacker::Evil", "custom-domain")


def test_onnx_external_data_outside_the_model_directory_refused(jacli, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.bin").write_bytes(evil.W.tobytes())
    evil.onnx_matmul(models / "dotdot.onnx", external_location="../secret.bin")
    evil.onnx_matmul(models / "absolute.onnx", external_location=str(tmp_path / "secret.bin"))
    (models / "link.bin").symlink_to(tmp_path / "secret.bin")
    evil.onnx_matmul(models / "symlink.onnx", external_location="link.bin")
    for name, location in (("dotdot", "../secret.bin"), ("absolute", "secret.bin"), ("symlink", "link.bin")):
        assert_refused(jacli("inspect", models / f"{name}.onnx"), "outside the model's directory", location)
    # external data inside the model's directory is fine, and gives y = x W: J = W^T
    evil.onnx_matmul(models / "inside.onnx", external_location="weights/w.bin")
    np.save(tmp_path / "x.npy", X3)
    r = jacli("compute", models / "inside.onnx", tmp_path / "x.npy", "-o", tmp_path / "j.npy", "-q")
    assert r.code == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "j.npy"), np.broadcast_to(evil.W.T, (2, 2, 3)))


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir()
                                         if p.suffix in (".pt", ".pt2", ".onnx", ".keras", ".h5") or (p / "saved_model.pb").exists()))
def test_every_sample_model_loads_without_trust(jacli, name):
    r = jacli("inspect", SAMPLES / name, "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["model"].endswith(name)


# --- hostile input ------------------------------------------------------------------------
def npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


MAP2D = SAMPLES / "map2d.onnx"


@pytest.mark.parametrize("make, words", [
    (lambda: npy_header((10**12, 2)), ["shape (1000000000000, 2)", "GiB", "available"]),
    (lambda: npy_header((-3, 2)), ["negative dimension"]),
    (lambda: npy_header((2**62, 2**62)), ["would need"]),
    (lambda: _npy(np.float32(1.5)), ["scalar"]),
    (lambda: _npy(np.zeros((0, 2), np.float32)), ["holds no values"]),
    (lambda: _npy(np.zeros((2, 2), np.complex64)), ["complex64", "real numbers"]),
    (lambda: npy_header((2, 2), descr="|O") + b"\0" * 64, ["object"]),
    (lambda: npy_header((2, 2), descr=[("a", "<f4"), ("b", "<i4")]) + b"\0" * 32, ["not numeric"]),
])
def test_bad_input_headers_get_one_clear_error(jacli, tmp_path, make, words):
    (tmp_path / "x.npy").write_bytes(make())
    r = jacli("compute", MAP2D, tmp_path / "x.npy")
    lines = error_lines(r.stderr)
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_input_limit_follows_available_memory_and_nothing_is_allocated(jacli, tmp_path, monkeypatch):
    from jacli.io import readers

    x = np.ones((1 << 20, 2), np.float32)  # 8 MiB
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", xy=x)
    assert jacli("inspect", MAP2D).code == 0  # imports done before memory is measured
    monkeypatch.setattr(limits, "available_memory", lambda: 12 << 20)  # the input is over half of 12 MiB
    for path in (tmp_path / "x.npy", tmp_path / "x.npz"):
        tracemalloc.start()
        r = jacli("compute", MAP2D, path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert r.code == 2 and "8.0 MiB" in r.stderr and "12.0 MiB available" in r.stderr, r.stderr
        assert peak < x.nbytes // 2, f"{peak} bytes allocated while refusing a {x.nbytes}-byte input"
    assert "more than 50%" in jacli("compute", MAP2D, "--random", "1000000").stderr
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    for path in (tmp_path / "x.npy", tmp_path / "x.npz"):
        assert next(iter(readers._read_arrays(str(path)).values())).shape == x.shape


def test_compressed_npz_bomb_refused_without_inflating(jacli, tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xy.npy", npy_header((64 << 20, 2)) + bytes(64 << 20))  # 512 MiB announced, 64 MiB of zeros
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    monkeypatch.setattr(limits, "available_memory", lambda: 256 << 20)
    tracemalloc.start()
    r = jacli("compute", MAP2D, tmp_path / "bomb.npz")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.code == 2 and "512.0 MiB" in r.stderr, r.stderr
    assert peak < 8 << 20


def test_h5_input_with_external_storage_refused(jacli, tmp_path):
    import h5py

    (tmp_path / "outside.bin").write_bytes(np.ones((2, 2), np.float32).tobytes())
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("xy", shape=(2, 2), dtype="<f4", external=[(str(tmp_path / "outside.bin"), 0, 16)])
    r = jacli("compute", MAP2D, tmp_path / "x.h5")
    assert r.code == 2 and "other files" in r.stderr, r.stderr


# --- nothing lost -------------------------------------------------------------------------
OLD = b"the previous result, which must survive\n" * 100


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_signal_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, sig, code):
    out = tmp_path / "j.h5"
    out.write_bytes(OLD)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.onnx"), "--random", "20000", "-o", str(out), "-q",
         "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job inherits SIGINT ignored
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [p for p in tmp_path.iterdir() if p.name.endswith(".part") and p.stat().st_size > 0]
        if parts:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted; give it more samples"
    assert parts, "no temporary file appeared"
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == code, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in stderr, stderr
    assert out.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_sigkill_mid_write_cannot_truncate_the_requested_file(tmp_path):
    out = tmp_path / "j.npy"
    out.write_bytes(OLD)
    proc = subprocess.Popen([sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.onnx"), "--random", "20000",
                             "-o", str(out), "-q", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not _leftovers(tmp_path):
        time.sleep(0.02)
    assert proc.poll() is None and _leftovers(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert out.read_bytes() == OLD  # a killed process cannot clean up its temporary file, but never touches OUT


def test_a_signal_during_an_import_is_sent_again_not_lost(monkeypatch):
    """An exception raised while importlib compiles a module can vanish (the run then goes
    on to the end); the handler re-sends the signal instead of raising there."""
    import types

    from jacli.cli import main as cli_main

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))
    importing = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"))
    cli_main._on_signal(signal.SIGTERM, importing)  # no exception here
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(cli_main.Terminated) as raised:
        cli_main._on_signal(signal.SIGTERM, sys._getframe())
    assert raised.value.code == 128 + signal.SIGTERM


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5"])
def test_crash_in_the_middle_of_a_streamed_write(jacli, tmp_path, monkeypatch, suffix):
    from jacli.io import writers

    out = tmp_path / f"j{suffix}"
    out.write_bytes(OLD)
    calls = []
    cls = {".npy": writers.NpyWriter, ".npz": writers.NpzWriter, ".h5": writers.H5Writer}[suffix]
    original = cls.write

    def crash_on_second_block(self, key, s0, s1, block):
        calls.append(s0)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, key, s0, s1, block)

    monkeypatch.setattr(cls, "write", crash_on_second_block)
    r = jacli("compute", SAMPLES / "mlp.onnx", "--random", "200", "-o", out, "--max-memory", "1M", "-q")
    assert r.code == 3 and "simulated crash" in r.stderr, r.stderr
    assert len(calls) == 2
    assert out.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_interrupt_while_finishing_an_npz_removes_every_temporary(jacli, tmp_path, monkeypatch):
    out = tmp_path / "j.npz"
    out.write_bytes(OLD)

    original = zipfile.ZipFile.open

    def interrupted_when_writing(self, name, mode="r", *args, **kwargs):
        if mode == "w":
            raise KeyboardInterrupt  # Ctrl-C while the finished arrays are copied into the zip
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", interrupted_when_writing)
    r = jacli("compute", SAMPLES / "multi.onnx", SAMPLES / "multi_input.npz", "-o", out, "-q")
    assert r.code == 130 and error_lines(r.stderr) == ["Error: interrupted"], r.stderr
    assert out.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_names_from_hostile_files_cannot_break_the_error_line(jacli, tmp_path):
    """A member name with a newline and a terminal escape (clear screen) is shown escaped."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2), np.complex64))
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("xy\n\x1b[2JError: all good.npy", buf.getvalue())
    r = jacli("compute", MAP2D, tmp_path / "x.npz")
    assert r.code == 2 and r.stderr.count("\n") == 1 and "\x1b" not in r.stderr, repr(r.stderr)
    assert "xy\\n\\x1b[2JError: all good" in r.stderr
