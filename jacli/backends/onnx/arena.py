"""One onnxruntime memory arena for every session jacli makes in the process, kept while an
ONNX model that may use it lives, and shrunk when the last one is gone.

Without an arena, each run of a derivative graph takes its intermediates from the C
allocator, which hands blocks over 32 MiB straight back to the kernel: every call then
page-faults its whole working set in again (Keras' ResNet50 as ONNX at 16 samples: about
200,000 faults and a fifth of the time of a Jacobian). onnxruntime's own default, an
arena per session, keeps each session's peak for the session's life: the sum over a
model's forward, VJP, JVP and float64 sessions. One arena shared by all sessions
(``session.use_env_allocators``) holds the largest of them instead, which the engine's
budget bounds, and nothing once the models are gone (``release``; the command line keeps
it until its process ends: ``keep``). ``JACLI_ARENA=off`` turns it off: every run
allocates and frees as before."""
from __future__ import annotations

import os
import threading
import weakref

ARENA = "JACLI_ARENA"  # environment variable: "off" gives every run its own allocations
_LOCK = threading.Lock()
# registered: None (not tried), True or False; models: those alive; kept: never released (keep)
_STATE = {"registered": None, "models": 0, "kept": False}


def configure(opts) -> None:
    """Point the session options ``opts`` at the shared arena (registered on first use),
    unless ``JACLI_ARENA=off`` or this onnxruntime cannot register one."""
    if _registered():
        opts.add_session_config_entry("session.use_env_allocators", "1")


def _registered() -> bool:
    with _LOCK:
        if _STATE["registered"] is None:
            _STATE["registered"] = os.environ.get(ARENA, "").strip().lower() not in ("off", "0", "no") and _register()
        return _STATE["registered"]


def _register() -> bool:
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:  # no size limit, onnxruntime's default growth (next power of two), default chunks
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
    except Exception:  # an onnxruntime without environment allocators: each run allocates
        return False
    return True


def hold(model) -> None:
    """Count ``model`` among the arena's users until it is garbage; the last one to go
    releases the arena's free memory."""
    with _LOCK:
        _STATE["models"] += 1
    weakref.finalize(model, _drop).atexit = False  # the process's end frees everything anyway


def _drop() -> None:
    with _LOCK:
        _STATE["models"] -= 1
        last = _STATE["models"] == 0 and _STATE["registered"]
    if last:
        try:
            release()
        except Exception:  # a finalizer has no caller to tell: the memory stays for reuse
            pass


# b = Identity(a), one float each, opset 13, IR 7: serialized here, as onnx's helpers make it
# (tests/test_onnx_memory.py checks), so that releasing imports no onnx (a cached model needs none)
SHRINK_GRAPH = (b'\x08\x07:<\n\x10\n\x01a\x12\x01b"\x08Identity\x12\x06shrinkZ\x0f\n\x01a\x12\n\n\x08\x08\x01'
                b'\x12\x04\n\x02\x08\x01b\x0f\n\x01b\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')
_SHRINKER: list = []  # a session of SHRINK_GRAPH and the run options that make its runs shrink the arena


def keep() -> None:
    """The process is jacli's own (the command line) and ends when the command does: the
    arena's memory stays until then, with no release as models go."""
    with _LOCK:
        _STATE["kept"] = True


def release() -> None:
    """Hand the arena's free chunks back to the system (onnxruntime shrinks an arena only at
    the end of a run that asks for it: a run of a one-node graph)."""
    if not _STATE["registered"] or _STATE["kept"]:
        return
    import numpy as np
    import onnxruntime as ort

    if not _SHRINKER:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        configure(opts)
        run = ort.RunOptions()
        run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        _SHRINKER[:] = [ort.InferenceSession(SHRINK_GRAPH, opts, providers=["CPUExecutionProvider"]), run]
    session, run = _SHRINKER
    session.run(None, {"a": np.zeros(1, np.float32)}, run)
