"""Checks on untrusted Keras files (``.keras`` zips, ``.h5``), run on the bytes Keras loads.

``checked_copy`` reads the file once, decides how Keras will open it (its loaders choose
by the file name's suffix, so jacli decides, and names the copy accordingly), writes a
private copy (a new 0700 directory) that nobody else can change, and, unless trusted,
checks the config in that copy the way that loader reads it. Keras (and the tf_keras
fallback, for HDF5 only) then load the copy. What is refused, and why, is in
docs/security.md.

``hdf5_objects`` mends, in that copy, what Keras 3's own legacy HDF5 loader cannot read back
of what its writer wrote: the config records no modules, so a ``keras.ops`` call on a layer's
output (MobileNetV3's ``x + 3.0``, recorded as class ``Add``) is rebuilt as the merge layer of
that name and fails, and the layers Keras's applications define (ConvNeXt's ``LayerScale``)
are unknown.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from .. import limits
from ..errors import ModelLoadError, UnsafeModelError
from .refusal import cut as _cut, inside, refuse

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
# Keras's own classes that run code or read files named in the config: bytecode (Lambda),
# any TF function by name (TFOpLambda, SlicingOpLambda, tf_keras' ClassMethod,
# InstanceMethod, InstanceProperty), another model from a path (TFSMLayer), a pickled
# torch module (TorchModuleWrapper), a JAX/Flax function (JaxLayer, FlaxLayer).
CODE_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda", "ClassMethod", "InstanceMethod", "InstanceProperty",
               "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"}
# The namespaces whose classes a model config may name: layers and what layers hold.
_NAMESPACES = ("layers", "initializers", "regularizers", "constraints", "losses", "metrics", "optimizers",
               "optimizers.schedules", "dtype_policies", "mixed_precision", "models", "random", "quantizers")
_FUNCTION_NAMESPACES = ("activations", "losses", "metrics")
# Keras 3 functional models record keras.ops calls as Operation classes (``Exp`` from
# ``keras.src.ops.numpy``, ``GetItem``, ...): allowed from these modules, and only under the
# module that defines them, except the ones that take a Python callable.
_OPS_MODULES = ("core", "einops", "image", "linalg", "math", "nn", "numpy")
CALLABLE_OPS = {"Map", "Scan", "AssociativeScan", "Switch", "WhileLoop", "ForiLoop", "Cond", "VectorizedMap"}
# Layers that Keras's own applications define, each read (no code, no files): ConvNeXt's
# LayerScale (x times a learned vector) and StochasticDepth (the identity at inference),
# InceptionResNetV2's CustomScaleLayer (a scaled sum). Allowed under the module that defines
# them, and by name in an HDF5 config, which records no modules (hdf5_objects supplies them).
APPLICATION_LAYERS = {"LayerScale": "keras.src.applications.convnext",
                      "StochasticDepth": "keras.src.applications.convnext",
                      "CustomScaleLayer": "keras.src.applications.inception_resnet_v2"}
# Keras's serialization of values that are not objects (tensors, arrays, slices, ...).
_VALUE_CLASSES = {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__typespec__", "__ellipsis__",
                  "__slice__", "Functional", "Sequential", "Model", "TensorShape"}
_KERAS_MEMBERS = {"config.json", "metadata.json", "model.weights.h5", "model.weights.npz"}


@contextlib.contextmanager
def checked_copy(path: str, trust: bool, screen=None):
    """Yield ``(local path, route)``: a private copy of the Keras file ``path``, named
    ``model.keras`` (route "zip") or ``model.h5`` (route "hdf5"), checked unless ``trust``.
    ``screen(problems)`` may drop what the user vouched for (classes of --custom-objects)."""
    data = limits.read_regular(path, "model", ModelLoadError)
    route = _route(path, data)
    if not trust:
        problems = keras_problems(path, data, route)
        refuse(path, screen(problems) if screen else problems)
    folder = tempfile.mkdtemp(prefix="jacli-keras-")  # mode 0700: only this user can change the copy
    try:
        local = Path(folder) / ("model.keras" if route == "zip" else "model.h5")
        with open(local, "xb") as f:
            f.write(data)
        yield str(local), route
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _route(path: str, data: bytes) -> str:
    """How Keras will open the file: a ``.keras`` zip by Keras 3's archive loader, an
    ``.h5``/``.hdf5`` by the legacy HDF5 loaders. The contents must agree with the name
    (another suffix, e.g. with --format keras: the contents decide), and the archive or
    HDF5 file must start at byte 0: HDF5 also looks for its superblock after a "user
    block" (at 512, 1024, ... bytes), and zip readers accept data before an archive, so a
    file can be both, and each loader would see another model."""
    suffix = Path(path).suffix.lower()
    hdf5, zipped = data.startswith(HDF5_SIGNATURE), data.startswith(ZIP_SIGNATURE)
    if suffix in (".h5", ".hdf5") or (suffix != ".keras" and hdf5):
        if not hdf5:
            raise ModelLoadError(f"{path} is not an HDF5 file: it does not start with the HDF5 signature "
                                 "(Keras .h5 files never have a user block; a zip .keras needs that suffix)")
        return "hdf5"
    if suffix == ".keras" or zipped:
        if not zipped:
            raise ModelLoadError(f"{path} is not a .keras zip archive: it does not start with one "
                                 "(truncated, corrupt, or another file in front of it)")
        return "zip"
    raise ModelLoadError(f"{path} is neither a .keras zip archive nor an HDF5 .h5 file; "
                         "Keras models are one of those two")


def keras_problems(path: str, data: bytes, route: str) -> list[str]:
    """What in the config (``config.json`` of a zip, the ``model_config`` attribute of an
    HDF5 file) could run code or read files: anything but Keras's own classes from Keras's
    own modules, their code-carrying layers (CODE_LAYERS), serialized lambdas, and
    vocabularies named by path. A config that cannot be read is refused too."""
    config = _zip_config(path, data) if route == "zip" else _hdf5_config(path, data)
    problems = []
    allowed = _OwnClasses(hdf5=route == "hdf5")
    for obj in _dicts(config, prune=CODE_LAYERS):  # a code layer's problem is said; its insides need not be
        inner = obj.get("config")
        name = inner.get("name") if isinstance(inner, dict) else None
        cls = obj.get("class_name")
        if "class_name" in obj:
            problem = _class_problem(obj, cls, name, allowed)
            if problem:
                problems.append(problem)
        if obj.get("function_type") == "lambda":
            problems.append("a serialized Python lambda that would run on load")
        for key in ("vocabulary", "vocabulary_file"):
            if isinstance(obj.get(key), str):
                problems.append(f"layer {name!r} reads its vocabulary from the file {obj[key]!r}")
    return list(dict.fromkeys(problems))


def _dicts(config, prune=frozenset()):
    """Every dict in a config, nested ones included, depth first (each before what it holds);
    the insides of one whose ``class_name`` is in ``prune`` are not visited."""
    stack = [config]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack += obj
        elif isinstance(obj, dict):
            yield obj
            cls = obj.get("class_name")
            if not (isinstance(cls, str) and cls in prune):
                stack += list(obj.values())


def _class_problem(obj: dict, cls, name, allowed: "_OwnClasses") -> str | None:
    module, registered = obj.get("module"), obj.get("registered_name")
    if not isinstance(cls, str):
        return f"a class name that is not a string ({_cut(cls)})"
    if cls in CODE_LAYERS:
        return f"{cls} layer {name!r} holds Python code (or calls functions by name) that would run on load"
    if cls == "__lambda__":
        return "a serialized Python lambda that would run on load"
    if module is not None and not (isinstance(module, str) and (module in ("keras", "builtins")
                                                                or module.startswith(("keras.", "tf_keras.")))):
        return f"class {cls!r} from module {_cut(module)}, which Keras would import (running its code)"
    if cls == "function":
        if not (isinstance(obj.get("config"), str) and allowed.function(obj["config"])):
            return f"a function {_cut(obj.get('config'))} that is not one of Keras's activations, losses or metrics"
        return None
    if registered is not None and registered != cls:
        return f"class {cls!r} registered as {_cut(registered)}, a custom object jacli does not load untrusted"
    if cls in CALLABLE_OPS and isinstance(module, str) and module.startswith("keras.src.ops"):
        return f"operation {cls!r} ({name!r}) takes a Python function that would run on load"
    if cls in APPLICATION_LAYERS and module in (None, APPLICATION_LAYERS[cls]):
        return None
    if cls not in _VALUE_CLASSES and not allowed.has(cls) and not allowed.operation(cls, module):
        if module is None:  # an HDF5 config, which records no modules: perhaps the author's own class
            return f"class {cls!r} without a module, which is not one of Keras's own"
        return f"class {cls!r}, which is not one of Keras's own"
    return None


class _OwnClasses:
    """The classes and functions of the installed Keras 3 (and, when a name is not there,
    tf_keras) in the namespaces a model config may use; CODE_LAYERS excluded."""

    def __init__(self, hdf5: bool = False):
        self.hdf5 = hdf5  # an HDF5 config, which names operations without their module
        self.classes: set[str] | None = None
        self.functions: set[str] = set()
        self.tf_keras: set[str] | None = None
        self.ops: dict[str, str] | None = None  # class name -> the keras.src.ops module defining it

    @staticmethod
    def _collect(package) -> tuple[set[str], set[str]]:
        import importlib

        classes, functions = set(), set()
        for ns in _NAMESPACES + _FUNCTION_NAMESPACES:
            try:
                module = importlib.import_module(f"{package}.{ns}")
            except ImportError:
                continue
            for attr, value in vars(module).items():
                own = getattr(value, "__module__", "") or ""
                if not own.startswith((package + ".", package)):
                    continue
                if isinstance(value, type):
                    classes.add(attr)
                elif callable(value) and ns in _FUNCTION_NAMESPACES:
                    functions.add(attr)
        return classes - CODE_LAYERS, functions

    def _load(self):
        if self.classes is None:
            self.classes, self.functions = self._collect("keras")

    def has(self, cls: str) -> bool:
        self._load()
        if cls in self.classes:
            return True
        if self.tf_keras is None:
            try:
                self.tf_keras, functions = self._collect("tf_keras")
                self.functions |= functions
            except Exception:  # tf_keras missing: Keras 3's classes only
                self.tf_keras = set()
        return cls in self.tf_keras

    def function(self, name: str) -> bool:
        self._load()
        return name in self.functions

    def operation(self, cls: str, module) -> bool:
        """A keras.ops Operation class named under the Keras 3 module that defines it (in an
        HDF5 config, by name: hdf5_objects maps it to that class)."""
        defined = self.operations().get(cls)  # None: no such operation (never equal to an absent module)
        return defined is not None and (defined == module or (self.hdf5 and module is None))

    def operations(self) -> dict[str, str]:
        """Class name -> the keras.src.ops module defining it, for every Operation class there
        but those that take a Python callable (CALLABLE_OPS)."""
        if self.ops is None:
            import importlib

            from keras.src.ops.operation import Operation

            self.ops = {}
            for m in _OPS_MODULES:
                mod = importlib.import_module(f"keras.src.ops.{m}")
                self.ops.update({n: mod.__name__ for n, v in vars(mod).items() if isinstance(v, type)
                                 and issubclass(v, Operation) and v.__module__ == mod.__name__ and n not in CALLABLE_OPS})
        return self.ops


def hdf5_objects(local: str) -> dict:
    """The classes Keras 3's legacy loader needs to read the HDF5 model ``local`` (jacli's
    private copy, after the checks), mending its config in place where Keras 3 wrote it:
    an entry of the functional ``layers`` list that is a ``keras.ops`` Operation (its config
    has no ``trainable``, which every layer's has) is renamed ``jacli.ops>NAME`` and mapped to
    that Operation class, so that the merge layer ``Add`` and the operation ``Add`` of
    ``x + 3.0`` each rebuild as what they were; the layers of APPLICATION_LAYERS are mapped
    to Keras's classes. Nothing else is touched (and nothing for a Keras 2 file)."""
    import importlib

    import h5py

    with h5py.File(local, "r") as f:
        raw, version = f.attrs.get("model_config"), f.attrs.get("keras_version", b"")
    version = version.decode() if isinstance(version, bytes) else str(version)
    if not version.startswith("3"):  # Keras 2 (tf_keras) wrote it: nothing to mend
        return {}
    try:
        config = json.loads(raw)
    except (TypeError, ValueError, RecursionError):  # a trusted file, unchecked: Keras says what is wrong
        return {}
    objects, renamed = {}, False
    ops = _OwnClasses(hdf5=True).operations()
    for obj in _dicts(config):
        cls, inner = obj.get("class_name"), obj.get("config")
        if (cls in ops and "inbound_nodes" in obj and "module" not in obj and isinstance(inner, dict)
                and "trainable" not in inner):
            name = f"jacli.ops>{cls}"
            objects[name] = getattr(importlib.import_module(ops[cls]), cls)
            obj["class_name"], renamed = name, True
        elif cls in APPLICATION_LAYERS:
            objects[cls] = getattr(importlib.import_module(APPLICATION_LAYERS[cls]), cls)
    if renamed:
        with h5py.File(local, "r+") as f:
            f.attrs["model_config"] = json.dumps(config)
    return objects


def _zip_config(path: str, data: bytes):
    """config.json, read as Keras 3 reads it (zipfile, by name), after the archive checks:
    only Keras's own members, no two of one name, sizes within the read limit."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = limits.zip_members(z, f"Keras archive {path}", ModelLoadError)
            if not infos or min(i.header_offset for i in infos) != 0:
                raise ModelLoadError(f"{path} is not a .keras zip archive (data before its first member)")
            strays = [i.filename for i in infos if i.filename not in _KERAS_MEMBERS
                      and not (i.filename.startswith("assets/") and inside(i.filename))]
            if strays:
                raise ModelLoadError(f"{path} holds {strays[0]!r}, which is not part of a .keras archive")
            config = next((i for i in infos if i.filename == "config.json"), None)
            if config is None:
                raise ModelLoadError(f"{path} has no config.json; it is not a .keras model")
            raw = limits.read_member(z, config, ModelLoadError, path)
            weights = next((i for i in infos if i.filename == "model.weights.h5"), None)
            if weights is not None:
                _hdf5_links(path, limits.read_member(z, weights, ModelLoadError, path), "model.weights.h5")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelLoadError(f"cannot read Keras archive {path}: {str(e)[:200]} (corrupt or truncated?)") from None
    return _json(path, raw, "config.json")


def _hdf5_config(path: str, data: bytes):
    """The ``model_config`` attribute, read with h5py as the legacy loaders read it."""
    try:
        import h5py
    except ImportError:
        raise ModelLoadError("Keras .h5 files need h5py: pip install h5py") from None
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if f.userblock_size:
                raise ModelLoadError(f"{path} has an HDF5 user block; Keras files have none")
            raw = f.attrs.get("model_config")
        _hdf5_links(path, data, "the file")
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read Keras .h5 file {path}: {str(e)[:200]} (corrupt or truncated?)") from None
    if raw is None:
        raise ModelLoadError(f"{path} holds no model_config (weights only?); jacli needs a whole saved model")
    if not isinstance(raw, (bytes, str)):
        raise ModelLoadError(f"{path}: its model_config is not text (corrupt?)")
    return _json(path, raw if isinstance(raw, bytes) else raw.encode("utf-8", "replace"), "model_config")


def _hdf5_links(path: str, data: bytes, what: str) -> None:
    """Refuse HDF5 weights that read other files: external links, datasets stored outside
    the file, virtual datasets."""
    import h5py

    found = []

    def visit(name, link):
        if isinstance(link, h5py.ExternalLink):
            found.append(f"{name} links to another file")
            return
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
            found.append(f"{name} keeps its data in other files")

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            f.visititems_links(visit)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read {what} of {path}: {str(e)[:200]} (corrupt?)") from None
    if found:
        raise UnsafeModelError(f"refusing to load {path}: in {what}, {found[0]} (which loading would read). "
                               "Pass --trust-model only if you trust its source")


def _json(path: str, raw: bytes, what: str):
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelLoadError(f"cannot load Keras model {path}: its {what} is not valid JSON (corrupt?)") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"cannot load Keras model {path}: its {what} is not a model config")
    return config

