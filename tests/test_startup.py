"""Fast start: each command imports only what the model's format needs, and TensorFlow's
start-up chatter never reaches the terminal."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLES, imported

FRAMEWORKS = {"torch", "tensorflow", "keras", "tf_keras", "jax"}
ON_DEMAND = {"h5py", "scipy", "rich"}  # output formats, spectral work, terminal rendering


def test_help_imports_no_framework(tmp_path):
    mods = imported(tmp_path, "--help")
    assert not mods & (FRAMEWORKS | ON_DEMAND | {"onnx", "onnxruntime"})


def test_inspect_onnx_imports_no_torch_or_tensorflow(tmp_path):
    mods = imported(tmp_path, "inspect", SAMPLES / "mlp.onnx")
    assert "onnxruntime" in mods and not mods & (FRAMEWORKS | {"h5py", "scipy"})


@pytest.mark.parametrize("method", ["fd", "ad"])
def test_onnx_compute_imports_only_what_it_needs(tmp_path, method):
    mods = imported(tmp_path, "compute", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "--method", method,
                    "-q", "-o", tmp_path / "J.npy")
    assert "onnxruntime" in mods and not mods & (FRAMEWORKS | ON_DEMAND)


def test_json_output_needs_no_rich(tmp_path):
    mods = imported(tmp_path, "compute", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "--json")
    assert not mods & (FRAMEWORKS | ON_DEMAND)


def test_probe_sees_lazy_imports(tmp_path):
    """The check above could pass by not seeing lazily imported modules; here they show."""
    mods = imported(tmp_path, "compute", SAMPLES / "mlp.pt", SAMPLES / "mlp_input.npy", "-q", "-o", tmp_path / "J.h5")
    assert {"torch", "h5py"} <= mods and not mods & {"tensorflow", "keras", "onnxruntime"}


def test_torch_export_run_imports_torch_and_no_other_framework(tmp_path):
    mods = imported(tmp_path, "compute", SAMPLES / "mlp.pt2", SAMPLES / "mlp_input.npy", "-q", "-o", tmp_path / "J.npy")
    assert "torch" in mods and not mods & {"tensorflow", "keras", "tf_keras", "onnx", "onnxruntime"}


@pytest.mark.parametrize("extra", [[], ["--custom-objects", str(ROOT / "tests" / "keras_custom_layers.py")]])
def test_tensorflow_start_up_is_silent(tmp_path, extra):
    """Also where the user's --custom-objects module is what imports Keras (and TensorFlow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "KERAS"))}
    r = subprocess.run([sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.keras"),
                        str(SAMPLES / "mlp_input.npy"), "-q", "-o", str(tmp_path / "J.npy"), *extra],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    assert (tmp_path / "J.npy").stat().st_size > 4 * 10 * 500 * 4


_KEPT = """
import os, sys
import numpy as np
from jacli.system import tune_allocator

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

print(sorted(tune_allocator()))
a = np.ones(4 << 20, np.float32)  # 16 MiB, touched
before = rss()
del a
print((before - rss()) >> 20)  # MiB handed back to the kernel on free
"""


@pytest.mark.parametrize("setting", ["", "off"])
def test_the_command_lines_allocator_keeps_freed_blocks_for_reuse(setting):
    """jacli's own process keeps a freed 16 MiB block in the heap (no munmap, no page faults
    when the next call allocates it again); JACLI_MALLOC=off leaves glibc's defaults, which
    hand it back."""
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", _KEPT], capture_output=True, text=True, cwd=ROOT,
                       env={**env, "JACLI_MALLOC": setting}, check=True)
    settings, returned = r.stdout.split("\n")[:2]
    tuned = glibc and setting != "off"
    assert settings == ("['mmap_threshold', 'trim_threshold']" if tuned else "[]")
    if glibc:
        assert (int(returned) < 2) if tuned else (int(returned) >= 15)


def test_only_jaclis_own_process_tunes_the_allocator(monkeypatch):
    """``run`` (the jacli command, python -m jacli) tunes the allocator; ``main``, which the
    Python API's callers and the tests call in their own processes, does not."""
    from jacli import system
    from jacli.cli import main as cli_main

    calls = []
    monkeypatch.setattr(system, "tune_allocator", lambda: calls.append("tuned") or {})
    for entry in (lambda: cli_main.main(["--help"]), cli_main.run):
        monkeypatch.setattr(sys, "argv", ["jacli", "--help"])
        with pytest.raises(SystemExit) as e:
            entry()
        assert e.value.code == 0
        calls.append("ran")
    assert calls == ["ran", "tuned", "ran"]
