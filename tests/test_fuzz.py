"""Fuzzing: hostile input files and damaged model files must end in exit 0, or exit 2 with
one ``Error:`` line: never a traceback, an internal error, a hang or a crash.

Most cases run in-process through the CLI's ``main()`` (fast; an alarm turns a hang into a
failure); a smaller number run as real subprocesses, where a segfault or abort in a
native loader shows up as a signal exit. ``JACLI_FUZZ_EXAMPLES=N`` runs N examples per
property (and N/10 subprocess cases) instead of the CI defaults. The number of cases run
is printed at the end of the module.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SCALE = int(os.environ.get("JACLI_FUZZ_EXAMPLES", "0"))
CASES: collections.Counter = collections.Counter()
HANG_SECONDS = 120


def examples(default: int):
    return settings(max_examples=SCALE or default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    line = "fuzz cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())) + f" (total {sum(CASES.values())})"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


class Hang(BaseException):
    """Raised by SIGALRM: not an Exception, so main() does not turn it into an exit code."""


@contextlib.contextmanager
def hang_guard(seconds: int = HANG_SECONDS):
    def ring(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_clean_outcome(code: int, stdout: bytes, stderr: str, case: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, f"{case}: traceback\n{stderr}"
    assert code in (0, 2), f"{case}: exit {code}\n{stderr}"
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("Error:"), f"{case}: stderr is not one Error: line\n{stderr}"
    else:
        assert not any(line.startswith("Error:") for line in lines), f"{case}: exit 0 with an error\n{stderr}"
        json.loads(stdout)  # --json: one JSON document and nothing else


def run_in_process(jacli, args, case: str, stdin: bytes = b"") -> int:
    with hang_guard():
        r = jacli(*args, stdin=stdin)
    assert_clean_outcome(r.code, r.stdout, r.stderr, case)
    return r.code


# --- input files ------------------------------------------------------------------------
MODELS = {"map2d": (SAMPLES / "map2d.onnx", ["xy"]), "multi": (SAMPLES / "multi.onnx", ["a", "b"])}
DTYPES = st.one_of(
    hnp.floating_dtypes(endianness="="), hnp.integer_dtypes(endianness="="), hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(), hnp.datetime64_dtypes(), hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4), st.just(np.dtype([("a", "<f4"), ("b", "<i2")])), st.just(np.dtype(">f8")),
)
ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
NAMES = st.one_of(st.sampled_from(["xy", "a", "b", "x", "arr_0", "a/b"]), st.text(min_size=1, max_size=8))


def _bytes_of(write) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        write(path)
        return path.read_bytes()


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.save(member, a, allow_pickle=False)
            z.writestr(name + ".npy", member.getvalue())
    return buf.getvalue()


def _h5(arrays: dict) -> bytes:
    def write(path):
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                if a.dtype.kind in "MmU":  # h5py has no such types: store bytes instead, another wrong dtype
                    a = np.zeros(a.shape, "S4")
                f.create_dataset(name, data=a)

    return _bytes_of(write)


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@st.composite
def input_files(draw):
    """(description, file bytes): well-formed files of any dtype/shape/keys, damaged copies, or noise."""
    kind = draw(st.sampled_from(["npy", "npz", "h5", "noise", "magic+noise"]))
    if kind == "noise":
        return kind, draw(st.binary(max_size=4096))
    if kind == "magic+noise":
        magic = draw(st.sampled_from([b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"PK\x03\x04", b"\x89HDF\r\n\x1a\n"]))
        return kind, magic + draw(st.binary(max_size=2048))
    arrays = draw(st.dictionaries(NAMES, ARRAYS, min_size=1, max_size=3)) if kind != "npy" else {"": draw(ARRAYS)}
    try:
        data = {"npy": lambda: _npy(arrays[""]), "npz": lambda: _npz(arrays), "h5": lambda: _h5(arrays)}[kind]()
    except Exception:  # a name or dtype the format itself cannot hold (zipfile, h5py refuse it)
        data = _npy(np.zeros((2, 2), np.float32))
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        data = bytearray(data)
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        data = bytes(data)
    return f"{kind}/{damage} {sorted(arrays)} {[str(a.dtype) + str(a.shape) for a in arrays.values()]}", data


@examples(250)
@given(model=st.sampled_from(sorted(MODELS)), case=input_files(), via_stdin=st.booleans())
def test_fuzz_input_files(jacli, scratch, model, case, via_stdin):
    description, data = case
    path = scratch / "input.bin"
    path.write_bytes(data)
    args = ["compute", MODELS[model][0], "-" if via_stdin else path, "--json", "-q"]
    run_in_process(jacli, args, f"{model} {description}", stdin=data if via_stdin else b"")
    CASES["input files (in-process)"] += 1


# --- model files --------------------------------------------------------------------------
SAMPLE_INPUTS = {"mlp": "mlp_input.npy", "map2d": "map2d_input.npy", "multi": "multi_input.npz"}
FAST = ["mlp.onnx", "mlp_b1.onnx", "map2d.onnx", "multi.onnx", "mlp.pt", "map2d.pt", "multi.pt", "mlp.pt2"]
TF = ["mlp.keras", "map2d.keras", "multi.keras", "mlp.h5", "mlp_tfkeras.h5",
      "map2d_savedmodel", "multi_savedmodel", "mlp_tfkeras_savedmodel"]


def _files(model: str) -> list[str]:
    root = SAMPLES / model
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else [""]


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                         min_size=1, max_size=16)),
)


def damaged_copy(model: str, member: str, mutation, into: Path) -> Path:
    """Copy sample model ``model`` into ``into`` with its file ``member`` truncated or bit-flipped."""
    src, dst = SAMPLES / model, into / model
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    target = dst / member if member else dst
    data = bytearray(target.read_bytes())
    how, arg = mutation
    if how == "truncate":
        data = data[: int(arg * len(data))]
    else:
        for where, bit in arg:
            data[int(where * len(data))] ^= 1 << bit
    target.write_bytes(bytes(data))
    return dst


def model_cases(models):
    return st.sampled_from(models).flatmap(lambda m: st.tuples(st.just(m), st.sampled_from(_files(m)), MUTATIONS))


def _run_damaged_model(jacli, scratch, case, label):
    model, member, mutation = case
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        path = damaged_copy(model, member, mutation, Path(d))
        x = SAMPLES / SAMPLE_INPUTS[model.split("_")[0].split(".")[0]]
        run_in_process(jacli, ["compute", path, x, "--json", "-q"], f"{model}:{member} {mutation}")
    CASES[label] += 1


@examples(150)
@given(case=model_cases(FAST))
def test_fuzz_onnx_and_torchscript_models(jacli, scratch, case):
    _run_damaged_model(jacli, scratch, case, "ONNX/TorchScript models (in-process)")


@examples(50)
@given(case=model_cases(TF))
def test_fuzz_keras_and_savedmodel_models(jacli, scratch, case):
    _run_damaged_model(jacli, scratch, case, "Keras/SavedModel models (in-process)")


def test_a_savedmodel_whose_signatures_name_another_object_is_refused(jacli, scratch):
    """One bit of map2d_savedmodel's saved_model.pb flipped (found by the fuzzer above): the
    object graph still loads, but its "signatures" is some other object, which jacli took
    for a mapping (exit 3, "argument of type '_UserObject' is not iterable")."""
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        path = damaged_copy("map2d_savedmodel", "saved_model.pb", ("flip", [(0.9440894377228889, 0)]), Path(d))
        r = jacli("compute", path, SAMPLES / "map2d_input.npy", "--json", "-q")
    assert r.code == 2 and "has no signatures" in r.stderr, r.stderr


def test_fuzz_in_subprocesses(scratch):
    """Damaged copies of every sample model (and damaged inputs) through the real entry
    point: a crash in native code would be a signal exit here, not a dead test run."""
    rng = random.Random()
    every_format = FAST + ["mlp.keras", "mlp_tfkeras.h5", "map2d_savedmodel"]  # TF start-up is the slow part
    n = max(SCALE // 10, len(every_format))
    jobs = []
    for i in range(n):
        model = every_format[i] if i < len(every_format) else rng.choice(FAST + TF)
        member = rng.choice(_files(model))
        mutation = ("truncate", rng.random()) if rng.random() < 0.4 else \
            ("flip", [(rng.random(), rng.randrange(8)) for _ in range(rng.randint(1, 16))])
        d = Path(tempfile.mkdtemp(dir=scratch))
        path = damaged_copy(model, member, mutation, d)
        x = SAMPLES / SAMPLE_INPUTS[model.split("_")[0].split(".")[0]]
        jobs.append((f"{model}:{member} {mutation}", [str(path), str(x)]))

    def run(job):
        case, args = job
        proc = subprocess.run([sys.executable, "-m", "jacli", "compute", *args, "--json", "-q"],
                              capture_output=True, timeout=HANG_SECONDS)
        return case, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        for case, proc in pool.map(run, jobs):
            assert proc.returncode >= 0, f"{case}: killed by signal {-proc.returncode}\n{proc.stderr.decode()}"
            assert_clean_outcome(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"), case)
            CASES["models (subprocess)"] += 1


# --- structure-aware mutations, of clean and of hostile models --------------------------------
@pytest.fixture(scope="module")
def hostile(scratch):
    """Live payloads of every format (each creates ``marker`` when it runs), beside clean models."""
    import _security_models as evil

    d, marker = scratch / "hostile", scratch / "hostile" / "MARKER"
    d.mkdir()
    lambdas = evil.keras_lambdas(d, str(marker))
    evil.torchscript_torch_save(d / "saver.pt", str(marker))
    evil.torchscript_from_file(d / "from_file.pt", str(marker))
    archives = evil.torch_export_archives(d, str(marker))
    np.save(d / "x3.npy", np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32))
    payloads = [*lambdas.values(), d / "saver.pt", d / "from_file.pt", archives["pickle"], archives["guard"],
                evil.savedmodel_two_serving_defaults(d, str(marker)), evil.savedmodel_tf1_save_tensor_trick(d, str(marker))]
    clean = [SAMPLES / m for m in ("mlp.keras", "mlp_tfkeras.h5", "map2d.pt", "mlp.pt2", "map2d_savedmodel")]
    seeds = [(p, d / "x3.npy") for p in payloads] + [(p, SAMPLES / SAMPLE_INPUTS[p.name.split("_")[0].split(".")[0]])
                                                      for p in clean]
    marker.unlink(missing_ok=True)
    return seeds, marker


CLASS_NAMES = st.sampled_from(["Lambda", "TFOpLambda", "TFSMLayer", "__lambda__", "Dense", "Functional", "function"])
MODULES = st.sampled_from(["os", "subprocess", "keras.layers", "keras_evil", "builtins", "tf_keras.layers"])
TF_OPS = st.sampled_from(["WriteFile", "ReadFile", "PyFunc", "EagerPyFunc", "PrintV2", "ImmutableConst", "Identity",
                          "MatMul", "NoOp", "SaveV2"])


def _edit_config(config, data) -> None:
    """Set a class name or module, or add a lambda marker, somewhere in a Keras config."""
    objects, stack = [], [config]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            objects.append(obj)
            stack += list(obj.values())
        elif isinstance(obj, list):
            stack += obj
    target = data.draw(st.sampled_from(objects))
    how = data.draw(st.sampled_from(["class_name", "module", "function_type", "registered_name"]))
    value = {"class_name": CLASS_NAMES, "module": MODULES, "function_type": st.just("lambda"),
             "registered_name": st.sampled_from(["evil>X", "Dense", None])}[how]
    target[how] = data.draw(value | st.text(max_size=6))


def _mutate_zip(path: Path, data) -> None:
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    i, j = data.draw(st.integers(0, len(members) - 1)), data.draw(st.integers(0, len(members) - 1))
    how = data.draw(st.sampled_from(["swap", "rename", "config"]))
    if how == "swap":  # one member's bytes in another's place
        members[i] = (members[i][0], members[j][1])
    elif how == "rename":  # two members of one name
        info = zipfile.ZipInfo(members[j][0].filename)
        members[i] = (info, members[i][1])
    elif members[i][0].filename.endswith(".json"):
        try:
            config = json.loads(members[i][1])
            _edit_config(config, data)
            members[i] = (members[i][0], json.dumps(config).encode())
        except (ValueError, RecursionError):
            pass
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of a rename
        for info, content in members:
            z.writestr(info, content)


def _mutate_h5(path: Path, data) -> None:
    with h5py.File(path, "a") as f:
        config = json.loads(f.attrs["model_config"])
        _edit_config(config, data)
        f.attrs["model_config"] = json.dumps(config)


def _mutate_savedmodel(path: Path, data) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    meta = sm.meta_graphs[0]
    nodes = [n for f in meta.graph_def.library.function for n in f.node_def] + list(meta.graph_def.node)
    how = data.draw(st.sampled_from(["op", "child", "saver"]))
    if how == "op" and nodes:
        data.draw(st.sampled_from(nodes)).op = data.draw(TF_OPS)
    elif how == "child" and meta.HasField("object_graph_def"):
        refs = [r for n in meta.object_graph_def.nodes for r in n.children]
        data.draw(st.sampled_from(refs)).local_name = data.draw(st.sampled_from(
            ["serving_default", "_initialize", "_create_resource", "signatures"]))
    elif nodes:
        meta.saver_def.save_tensor_name = data.draw(st.sampled_from(nodes)).name
    (path / "saved_model.pb").write_bytes(sm.SerializeToString())


@examples(48)
@given(data=st.data())
def test_fuzz_structural_mutations_never_run_a_payload(jacli, scratch, hostile, data):
    """Zip members swapped, renamed or their JSON edited; HDF5 model configs edited; SavedModel
    ops, object names and saver fields changed; of clean models and of live payloads. No
    mutation may run a payload (the marker stays absent) or end in anything but exit 0 or
    one Error: line."""
    seeds, marker = hostile
    seed, x = data.draw(st.sampled_from(seeds))
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        path = Path(d) / seed.name
        shutil.copytree(seed, path) if seed.is_dir() else shutil.copy(seed, path)
        if seed.is_dir():
            _mutate_savedmodel(path, data)
        elif zipfile.is_zipfile(path):
            _mutate_zip(path, data)
        else:
            _mutate_h5(path, data)
        run_in_process(jacli, ["compute", path, x, "--json", "-q"], f"{seed.name} {data}")
        assert not marker.exists(), f"{seed.name}: a mutation ran the payload"
    CASES["structural mutations (in-process)"] += 1
