"""The model protocol: the only thing the engine sees.

Everything crosses this boundary as numpy arrays keyed by tensor name, with the batch
axis first.

* ``forward(xs) -> ys``
* ``vjp(xs, cotangents, wrt) -> grads``: each cotangent has a leading block axis k in
  front of its output's batched shape; each gradient has the same k in front of its
  input's batched shape. One call gives k Jacobian rows, for every sample at once.
* ``jvp(xs, tangents, of) -> out_tangents``: the same with tangents on the inputs.

``per_sample=True`` (the default) promises that samples along the batch axis are
independent, so the k axis can be folded into the batch axis: one batched call of k*B
samples. ``per_sample=False`` (``--no-batch``) asks for the exact product with no such
assumption; backends vectorise with their own map or fall back to a loop over k. A
backend with a map of its own (``_map_strategies``) serves both with it: one forward pass
for all k seeds instead of k. When it has several ways to map (``strategies``), the caller
may choose one (``strategy=``); which is fastest is the engine's business
(``jacli.engine.strategies``), not the model's.

Backends implement ``_forward``/``_vjp``/``_jvp`` on a plain batch (no k axis); this
class does folding, and chunking for models whose batch axis is fixed (e.g. to 1).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InputError

Arrays = Mapping[str, np.ndarray]
FOLDED = "folded"  # ``strategy=`` of vjp/jvp per sample: the k seeds folded into the batch, whatever the backend maps
# The working-memory budget (bytes, ``--max-memory``) of the API call in progress; None outside
# one. A backend that can buy speed with memory it keeps for the model's life spends at most
# a share of it (ONNX: derivative sessions holding large fed weights as constants).
_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("jacli_budget", default=None)


def budget() -> int | None:
    """The budget of the API call in progress (``budgeted``), None outside one."""
    return _BUDGET.get()


@contextlib.contextmanager
def budgeted(nbytes: int):
    token = _BUDGET.set(nbytes)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def spends_budget(default: int):
    """Decorate an API function: its ``max_memory`` argument (or ``default``) is the budget
    of each call (``budgeted``)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with budgeted(bound.arguments["max_memory"] or default):
                return fn(*args, **kwargs)

        return run

    return decorate


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape`` is the full shape including the batch axis;
    ``None`` entries are dynamic; ``shape=None`` means unknown rank (TorchScript)."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str

    @property
    def fixed_batch(self) -> int | None:
        """Size of the leading axis when the model fixes it, else None."""
        return self.shape[0] if self.shape else None

    @property
    def is_float(self) -> bool:
        return np.dtype(self.dtype).kind == "f"

    def describe(self) -> dict:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}


@dataclass
class Model(abc.ABC):
    """A loaded model. Subclasses fill in specs and the three private primitives."""

    path: str
    format: str
    backend: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    supports_ad: bool = True  # False: only finite differences (the reason is in ad_unavailable)
    ad_unavailable: str = ""
    supports_float64: bool = False  # forward64 is available
    # a forward pass returned exactly ``outputs`` (names, per-sample shapes, dtypes): plans
    # may then take output shapes from the signature instead of running one
    signature_confirmed: bool = field(default=False, repr=False, compare=False)
    # each map strategy (``strategies``) is a graph of its own, traced on first use (TensorFlow:
    # seconds, and 50-200 MB resident for a Keras application): for a few calls, folding is cheaper
    traced_maps = False
    # the sample blocks' bytes (a block's Jacobian buffer, one call's seeds and results) the
    # backend runs fastest at; None: the engine's ``BLOCK_BYTES``
    block_bytes = None  # type: int | None

    # --- what backends implement (on one plain batch) -----------------------------------
    @abc.abstractmethod
    def _forward(self, xs: Arrays) -> dict[str, np.ndarray]:
        """Outputs for one batch."""

    def _vjp(self, xs: Arrays, cts: Arrays, wrt: Sequence[str]) -> dict[str, np.ndarray]:
        """Input gradients for one batch and one cotangent per output (no k axis)."""
        raise self._no_ad()

    def _jvp(self, xs: Arrays, ts: Arrays, of: Sequence[str]) -> dict[str, np.ndarray]:
        """Output tangents for one batch and one tangent per input (no k axis)."""
        raise self._no_ad()

    def _forward64(self, xs: Arrays) -> dict[str, np.ndarray]:
        """The forward pass evaluated in float64 (only when supports_float64)."""
        raise self._no_ad()

    def _no_ad(self):
        from .errors import UnsupportedError

        return UnsupportedError(self.ad_unavailable or f"{self.backend} cannot differentiate this model; use --method fd")

    def bind(self, xs: Arrays) -> None:
        """Learn what the signature does not say (shapes, output names) from a real input.
        Formats with a full signature need nothing."""

    # --- the protocol -----------------------------------------------------------------
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def spec(self, name: str) -> TensorSpec:
        for s in [*self.inputs, *self.outputs]:
            if s.name == name:
                return s
        raise KeyError(name)

    def forward(self, xs: Arrays) -> dict[str, np.ndarray]:
        return self._chunked(self._forward, xs)

    def forward64(self, xs: Arrays) -> dict[str, np.ndarray]:
        return self._chunked(self._forward64, xs)

    def vjp(self, xs: Arrays, cotangents: Arrays, wrt: Sequence[str], per_sample: bool = True,
            strategy: str | None = None) -> dict[str, np.ndarray]:
        return self._blocked(self._vjp, xs, cotangents, list(wrt), per_sample, strategy)

    def jvp(self, xs: Arrays, tangents: Arrays, of: Sequence[str], per_sample: bool = True,
            strategy: str | None = None) -> dict[str, np.ndarray]:
        return self._blocked(self._jvp, xs, tangents, list(of), per_sample, strategy)

    def strategies(self, kind: str, xs: Arrays, seeds: Arrays) -> tuple[str, ...]:
        """The ways ``vjp``/``jvp`` (``kind``) can map these seeds' k axis with one forward
        pass, each exact (they differ in speed and float rounding); ``strategy=`` picks one,
        the first is the default. Empty where the k seeds are folded into the batch or
        looped over."""
        if _leading(seeds) == 1 or not self._fits(xs):
            return ()
        return self._map_strategies(self._vjp if kind == "vjp" else self._jvp)

    def compiles(self, strategy: str, xs: Arrays, seeds: Arrays) -> bool:
        """Whether mapping these seeds by ``strategy`` would first compile for their shapes: a
        one-time cost of many calls, which the engine pays only once the work has earned it."""
        return False

    def describe(self) -> dict:
        return {
            "model": self.path,
            "format": self.format,
            "backend": self.backend,
            "inputs": [s.describe() for s in self.inputs],
            "outputs": [s.describe() for s in self.outputs],
        }

    # --- folding and chunking -----------------------------------------------------------
    def _fixed_batch(self) -> int | None:
        sizes = {s.fixed_batch for s in self.inputs if s.fixed_batch is not None}
        return min(sizes) if sizes else None

    def _chunked(self, fn: Callable[..., dict], *groups: Arrays) -> dict[str, np.ndarray]:
        """Call ``fn(*groups)`` on the whole batch, or in pieces of the model's fixed
        batch size (the last piece padded with copies of its last sample, then trimmed)."""
        fixed = self._fixed_batch()
        n = _shared_leading(groups[0])
        if fixed is None or n is None or n == fixed:  # no shared batch axis (--no-batch): whole arrays
            return fn(*[dict(g) for g in groups])
        parts = []
        for s in range(0, n, fixed):
            short = fixed - min(fixed, n - s)
            pieces = [{k: _pad(v[s : s + fixed], short) for k, v in g.items()} for g in groups]
            out = fn(*pieces)
            parts.append({k: v[: fixed - short] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _fits(self, xs: Arrays) -> bool:
        fixed = self._fixed_batch()
        return fixed is None or _shared_leading(xs) in (None, fixed)

    def _blocked(self, prim, xs: Arrays, seeds: Arrays, names: list[str], per_sample: bool,
                 strategy: str | None) -> dict[str, np.ndarray]:
        k = _leading(seeds)
        fits = self._fits(xs)
        if not fits and not per_sample:
            raise InputError(
                f"this model's batch axis is fixed at {self._fixed_batch()}, so --no-batch needs exactly "
                f"{self._fixed_batch()} sample(s), got {_leading(xs)}"
            )
        while True:  # until a strategy takes it (a backend drops one that raises MapUnavailable)
            strategies = self._map_strategies(prim) if fits else ()
            if per_sample and (not strategies or strategy == FOLDED):
                return self._folded(prim, xs, seeds, names)
            if k == 1:
                return {n: v[None] for n, v in prim(xs, {n: v[0] for n, v in seeds.items()}, names).items()}
            chosen = strategy if strategy in strategies else strategies[0] if strategies else ""
            try:
                return self._vjp_jvp_map(prim, xs, seeds, names, chosen)
            except MapUnavailable:
                if chosen in self._map_strategies(prim):
                    raise  # the backend must drop what it cannot do, or this would never end

    def _folded(self, prim, xs: Arrays, seeds: Arrays, names: list[str]) -> dict[str, np.ndarray]:
        """Samples are independent: fold k into the batch axis, k*B samples in one call."""
        k = _leading(seeds)
        if k == 1:
            big_x, big_s = dict(xs), {n: v[0] for n, v in seeds.items()}
        else:
            big_x = {n: _copies(v, k) for n, v in xs.items()}
            big_s = {n: v.reshape(-1, *v.shape[2:]) for n, v in seeds.items()}
        out = self._chunked(lambda bx, bs: prim(bx, bs, names), big_x, big_s)
        return {n: v.reshape(k, -1, *v.shape[1:]) for n, v in out.items()}

    def _map_strategies(self, prim) -> tuple[str, ...]:
        """How this backend's ``_vjp_jvp_map`` takes ``prim`` over the k axis with one forward
        pass for all k seeds: "vectorised" (vmap, pfor) and/or "sequential" (k backward passes
        through one recorded forward pass). Then the per-sample product uses it too: with
        independent samples it equals the folded one, without repeating the forward pass k
        times. None: fold k into the batch (per sample) or loop over k (exact). A strategy
        that turns out not to work for this model raises MapUnavailable after dropping
        itself from this list."""
        return ()

    def _vjp_jvp_map(self, prim, xs: Arrays, seeds: Arrays, names: list[str], strategy: str = "") -> dict:
        """Exact (no folding) product over the k axis; backends with a map of their own
        override this (and ``_map_strategies``), the default loops over k."""
        k = _leading(seeds)
        outs = [prim(xs, {n: v[i] for n, v in seeds.items()}, names) for i in range(k)]
        return {n: np.stack([o[n] for o in outs]) for n in outs[0]}


class MapUnavailable(Exception):
    """Raised by ``_vjp_jvp_map`` when a strategy cannot take this model (an operator its
    map cannot batch); the call goes on with the next strategy, or folds or loops."""


def _leading(arrays: Arrays) -> int:
    return next(iter(arrays.values())).shape[0]


def _shared_leading(arrays: Arrays) -> int | None:
    """The leading size all arrays share; None when they do not (a data tensor beside an
    ``axes`` input, a scalar), so that they cannot be split along a batch axis."""
    sizes = {v.shape[0] if v.ndim else None for v in arrays.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _copies(v: np.ndarray, k: int) -> np.ndarray:
    """k copies of a batch, one after another along its leading axis."""
    out = np.empty((k, *v.shape), v.dtype)
    out[...] = v
    return out.reshape(-1, *v.shape[1:])


def _pad(v: np.ndarray, short: int) -> np.ndarray:
    return np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) if short else v
