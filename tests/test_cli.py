"""The command line, end to end: outputs and their metadata, stdin/stdout, JSON, and the
bad-input contract (one ``Error:`` line, exit 2, no traceback, no partial file)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from conftest import ROOT, SAMPLES, map2d_jacobian, mlp_jacobian

MAP = str(SAMPLES / "map2d.pt")
MAP_X = str(SAMPLES / "map2d_input.npy")


def _one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.code == 2, (r.code, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_compute_npy_output(jacli, tmp_path):
    out = tmp_path / "J.npy"
    r = jacli("compute", MAP, MAP_X, "-o", out)
    assert r.code == 0, r.stderr
    np.testing.assert_allclose(np.load(out), map2d_jacobian(np.load(MAP_X)), atol=1e-6)
    assert "Wrote" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "J.npy"]  # no temporary files left


def test_compute_h5_output_has_metadata(jacli, tmp_path, weights):
    out = tmp_path / "J.h5"
    r = jacli("compute", SAMPLES / "mlp.pt", SAMPLES / "mlp_input.npy", "-o", out, "--quiet")
    assert r.code == 0 and r.stdout == b"", r.stderr
    with h5py.File(out) as f:
        ds = f["doutput/dx"]
        np.testing.assert_allclose(ds[()], mlp_jacobian(weights, np.load(SAMPLES / "mlp_input.npy")), atol=1e-7)
        assert ds.chunks is not None
        assert ds.attrs["of"] == "output" and ds.attrs["wrt"] == "x"
        a = dict(f.attrs)
    assert a["format"] == "torchscript" and a["backend"] == "torch" and a["method"] == "ad"
    assert a["mode"] == "reverse" and a["dtype"] == "float32" and a["jacli_version"]
    import hashlib

    assert a["model_sha256"] == hashlib.sha256((SAMPLES / "mlp.pt").read_bytes()).hexdigest()
    assert json.loads(a["inputs"])[0]["name"] == "x"


def test_compute_npz_multi_pairs(jacli, tmp_path):
    out = tmp_path / "J.npz"
    r = jacli("compute", SAMPLES / "multi.keras", SAMPLES / "multi_input.npz", "-o", out, "-q")
    assert r.code == 0, r.stderr
    with np.load(out) as z:
        assert set(z.files) == {"ds/da", "ds/db", "dp/da", "dp/db", "jacli_meta"}
        assert z["ds/db"].shape == (3, 5, 4) and z["dp/da"].shape == (3, 3, 3)
        meta = json.loads(str(z["jacli_meta"]))
    assert meta["format"] == "keras" and meta["jacobians"]["dp/db"]["shape"] == [3, 3, 4]


def test_npy_with_several_pairs_asks_for_of_wrt(jacli, tmp_path):
    line = _one_error_line(jacli("compute", SAMPLES / "multi.pt", SAMPLES / "multi_input.npz", "-o", tmp_path / "J.npy"))
    assert "--of/--wrt" in line
    assert list(tmp_path.iterdir()) == []


def test_stdin_and_stdout(jacli):
    buf = io.BytesIO()
    np.save(buf, np.load(MAP_X))
    r = jacli("compute", MAP, "-", "-o", "-", stdin=buf.getvalue())
    assert r.code == 0, r.stderr
    J = np.load(io.BytesIO(r.stdout))
    np.testing.assert_allclose(J, map2d_jacobian(np.load(MAP_X)), atol=1e-6)


def test_json_summary_keys(jacli):
    r = jacli("compute", MAP, MAP_X, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {"model", "format", "backend", "samples"} <= set(doc)
    s0 = doc["samples"][0]
    assert {"shape", "frobenius", "max_abs", "argmax"} <= set(s0)
    assert s0["shape"] == [2, 2]
    assert s0["frobenius"] == pytest.approx(np.sqrt(9 + 1 + 1 + 9))
    assert s0["max_abs"] == pytest.approx(3) and s0["argmax"] == [[0], [0]]
    assert len(doc["samples"]) == 3
    assert doc["samples"][2]["zero_fraction"] == 1.0  # at (0, 0) the Jacobian is zero


def test_terminal_summary(jacli):
    r = jacli("compute", MAP, MAP_X)
    assert r.code == 0
    text = r.out
    assert "‖J‖_F" in text and "4.47214" in text and "█" in text  # heatmap of a 2-D Jacobian
    assert "\x1b[" not in text  # plain text when stdout is not a terminal


def test_random_input_and_no_batch(jacli, tmp_path):
    out = tmp_path / "J.npy"
    r = jacli("compute", SAMPLES / "mlp.onnx", "--random", "2", "--seed", "3", "--no-batch", "--method", "fd", "-o", out, "-q")
    assert r.code == 0, r.stderr
    assert np.load(out).shape == (2, 10, 2, 500)


def test_inspect_json(jacli):
    r = jacli("inspect", SAMPLES / "multi.onnx", "--json")
    doc = json.loads(r.stdout)
    assert doc["format"] == "onnx" and doc["backend"] == "onnxruntime"
    assert [i["name"] for i in doc["inputs"]] == ["a", "b"]
    assert doc["inputs"][1]["shape"] == [None, 4] and doc["outputs"][0]["dtype"] == "float32"


def test_inspect_terminal(jacli):
    r = jacli("inspect", SAMPLES / "mlp_savedmodel")
    assert r.code == 0 and "savedmodel" in r.out and "(?, 500)" in r.out


def test_forced_modes_agree(jacli, tmp_path):
    for mode in ("forward", "reverse"):
        r = jacli("compute", MAP, MAP_X, "--mode", mode, "-o", tmp_path / f"{mode}.npy", "-q")
        assert r.code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "forward.npy"), np.load(tmp_path / "reverse.npy"))


def test_nan_input_warns_and_still_writes(jacli, tmp_path):
    x = np.load(MAP_X)
    x[1, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    r = jacli("compute", MAP, tmp_path / "x.npy", "-o", tmp_path / "J.npy")
    assert r.code == 0
    assert "Warning: input x: 1 NaN/Inf value(s), first in sample 1" in r.stderr
    J = np.load(tmp_path / "J.npy")
    assert np.isnan(J[1]).any() and np.isfinite(J[0]).all()


# --- bad input -------------------------------------------------------------------------------
def _corrupt(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("name,mangle", [
    ("mlp.onnx", lambda b: b[: len(b) // 2]),
    ("mlp.pt", lambda b: b[: len(b) // 2]),
    ("mlp.keras", lambda b: b[: len(b) // 2]),
    ("mlp.h5", lambda b: b[: len(b) // 3]),
    ("mlp.onnx", lambda b: b"\x00garbage" * 10),
    ("mlp.pt", lambda b: b""),
    ("mlp.pt2", lambda b: b[: len(b) // 2]),
    ("mlp.pt2", lambda b: b[:100]),
    ("mlp.pt2", lambda b: b"\x00garbage" * 10),
])
def test_corrupt_models(jacli, tmp_path, name, mangle):
    bad = _corrupt(tmp_path, name, mangle((SAMPLES / name).read_bytes()))
    line = _one_error_line(jacli("compute", bad, SAMPLES / "mlp_input.npy", "-o", tmp_path / "J.npy"))
    assert str(bad.name) in line or "model" in line.lower()
    assert not (tmp_path / "J.npy").exists()


def _pt2_with_program(program: bytes) -> bytes:
    """The sample .pt2 with its program (models/model.json) replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(SAMPLES / "mlp.pt2") as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, program if info.filename.endswith("/models/model.json") else src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("trust", [(), ("--trust-model",)])
@pytest.mark.parametrize("make", [
    lambda: (SAMPLES / "mlp.pt2").read_bytes()[:50_000],  # truncated inside the weights
    lambda: (SAMPLES / "mlp.keras").read_bytes(),  # a zip archive, but not a .pt2
    lambda: b"\x00garbage" * 10,
    lambda: _pt2_with_program(b'{"graph_module": [1, 2'),  # a damaged program
    lambda: _pt2_with_program(b'{"graph_module": {}}'),  # a program without its fields
])
def test_corrupt_pt2_named_as_torch_export(jacli, tmp_path, make, trust):
    """--format torch-export skips detection: the loader itself gives the one error line."""
    bad = _corrupt(tmp_path, "m.pt2", make())
    line = _one_error_line(jacli("compute", "--format", "torch-export", *trust, bad, SAMPLES / "mlp_input.npy", "-q"))
    assert "m.pt2" in line and "--trust-model" not in line


def test_unknown_format_missing_file_and_bad_directory(jacli, tmp_path):
    assert "cannot tell the format" in _one_error_line(jacli("inspect", _corrupt(tmp_path, "m.xyz", b"hello")))
    assert "not found" in _one_error_line(jacli("inspect", tmp_path / "nope.onnx"))
    assert "saved_model.pb" in _one_error_line(jacli("inspect", tmp_path))
    assert "not found" in _one_error_line(jacli("compute", MAP, tmp_path / "nope.npy"))


def test_wrong_shape_and_dtype_inputs(jacli, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((2, 7), np.float32))
    assert "expects (batch, 500)" in _one_error_line(jacli("compute", SAMPLES / "mlp.onnx", tmp_path / "wide.npy"))
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    assert "not numeric" in _one_error_line(jacli("compute", MAP, tmp_path / "str.npy"))
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    assert "batch of at least one sample" in _one_error_line(jacli("compute", MAP, tmp_path / "scalar.npy"))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    assert "corrupt" in _one_error_line(jacli("compute", MAP, tmp_path / "junk.npy"))
    np.savez(tmp_path / "keys.npz", q=np.zeros((1, 3)), r=np.zeros((1, 4)))
    assert "no array for model input" in _one_error_line(jacli("compute", SAMPLES / "multi.onnx", tmp_path / "keys.npz"))
    # TorchScript has no signature: the model itself rejects the shape
    assert "rejected the input" in _one_error_line(jacli("compute", SAMPLES / "mlp.pt", tmp_path / "wide.npy"))


def test_unwritable_output_and_existing_file_survives(jacli, tmp_path):
    assert "does not exist" in _one_error_line(jacli("compute", MAP, MAP_X, "-o", tmp_path / "no" / "J.npy"))
    assert "unknown extension" in _one_error_line(jacli("compute", MAP, MAP_X, "-o", tmp_path / "J.txt"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not bind, use a file as the "directory"
            target = tmp_path / "file" / "J.npy"
            (tmp_path / "file").write_text("x")
        else:
            target = ro / "J.npy"
        _one_error_line(jacli("compute", MAP, MAP_X, "-o", target))
    finally:
        ro.chmod(0o700)
    # a failing run leaves an existing output untouched
    keep = tmp_path / "keep.npy"
    keep.write_bytes(b"precious")
    np.save(tmp_path / "wide.npy", np.zeros((2, 7), np.float32))
    _one_error_line(jacli("compute", SAMPLES / "mlp.onnx", tmp_path / "wide.npy", "-o", keep))
    assert keep.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep.npy", "ro", "wide.npy"]


def test_usage_errors(jacli, tmp_path):
    assert "no input" in _one_error_line(jacli("compute", MAP))
    assert "--wrt 'nope'" in _one_error_line(jacli("compute", MAP, MAP_X, "--wrt", "nope"))
    assert "--json and -o -" in _one_error_line(jacli("compute", MAP, MAP_X, "--json", "-o", "-"))
    _one_error_line(jacli("compute", MAP, MAP_X, "--mode", "sideways"))
    _one_error_line(jacli("compute", MAP, MAP_X, "--bogus"))


def test_real_entry_points_in_subprocesses(tmp_path):
    """``python -m jacli`` and the console script, with real exit codes and streams."""
    exe = shutil.which("jacli", path=os.path.dirname(sys.executable))
    assert exe, "the jacli console script is installed next to the interpreter"
    r = subprocess.run([exe, "compute", MAP, MAP_X, "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["samples"][0]["max_abs"] == pytest.approx(3)
    r = subprocess.run([sys.executable, "-m", "jacli", "compute", str(tmp_path / "x.onnx"), MAP_X],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("Error: model not found") and r.stdout == ""
    r = subprocess.run([sys.executable, "-m", "jacli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compute" in r.stdout


def test_json_documents_are_strict_json(capsys):
    """Non-finite numbers (an infinite relative error, a -inf log-determinant) become the
    documented strings: jq and JSON.parse reject the NaN/Infinity literals."""
    from jacli.cli.common import emit_json

    emit_json({"a": float("inf"), "b": [np.float32("-inf"), np.nan], "c": np.array([1.0, np.inf]), "d": (1, None)})
    text = capsys.readouterr().out
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON literal {c}"))
    assert doc == {"a": "Infinity", "b": ["-Infinity", "NaN"], "c": [1.0, "Infinity"], "d": [1, None]}
