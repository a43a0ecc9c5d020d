"""Per-sample (or whole-input) Jacobians from the model protocol's VJP/JVP, in blocks.

Layout: for a batch of B samples, ``d{out}/d{in}`` has shape
``(B, *out_sample_shape, *in_sample_shape)``; with ``batch=False`` it is
``(*out_shape, *in_shape)`` (the whole arrays as one vector each).

The engine works on a buffer of shape ``(samples, m, n)`` (m = output elements, n =
input elements per sample), fills it row block by row block (reverse mode, one VJP per
block of k rows for every sample at once) or column block by column block (forward mode,
one JVP per block of k columns), and hands complete sample blocks to a sink. Sample
blocks and seed blocks are sized to a memory budget, and the buffer is reused from block
to block, so a Jacobian larger than memory streams to disk in bounded memory. A sample
whose own Jacobian is more than half the budget is not buffered at all: each row (or
column) block goes to the sink as soon as it is computed.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import cached_property
from math import inf, prod
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..errors import InputError, LimitationError, UnsupportedError, UserError
from ..model import Model
from ..system import available_memory
from . import strategies


def default_budget() -> int:
    """min(2 GiB, a quarter of the available memory), at least 64 MiB; 1 GiB if unknown."""
    free = available_memory()
    return 1 << 30 if free is None else max(64 << 20, min(2 << 30, free // 4))


DEFAULT_BUDGET = default_budget()  # bytes of working memory (--max-memory)
# Blocks beyond this size are no faster, only bigger: a sample block's Jacobian buffer, and
# the seeds/results of one backend call. Below glibc's largest mmap threshold (32 MiB), the
# allocator recycles such arrays instead of mapping (and page-faulting) fresh memory.
BLOCK_BYTES = 8 << 20
# One backend call's seeds and results over its k x S rows (or columns): the model's own
# intermediates are a few times that (2x on the Conv1d and transformer nets of the real-model
# tables), and past ~8-16 MiB a tensor glibc hands back to the kernel on free is page-faulted
# in again on every call: 14,000 faults (56 MiB) a call on the Conv1d net at batch 256 in one
# call of 64 x 256 rows, 40-70 ms against 27-37 ms in two calls of 64 x 128 with one thread
# (issue 15). The same with two threads (quiet machine, reverse / forward mode): 36 / 30 ms in
# one call, 24 / 21 ms in two; the transformer block at 256 then took 594 ms against 563.
# The same cap where the allocator keeps freed memory (the jacli command's process): one call
# of 16,384 rows was faster there with two threads (16.6 against 20.3 ms), but jacli compute on
# 20,000 Conv1d / 2,000 transformer samples was slower with 8 MiB calls or none (ONNX 2.3 ->
# 2.4-4.6 s, 6.3 -> 6.8 s) and peaked 50-230 MiB higher.
CALL_BYTES = 4 << 20
# ... where a call has this many rows (k x S) at least: a call of few rows, each much work (an
# image net's 10 rows a sample), costs by its operators' count, which more blocks multiply
# (EfficientNet-B0 at batch 16 in two blocks: k backward passes 829 -> 1533 ms, vmapped 1427 -> 1110)
CALL_ROWS = 1024
_INTERMEDIATES = 8  # working memory per seed, in multiples of one input + output sample
# forward mode holds a tangent for every layer's activation per column (dual tensors, pfor):
# measured 26x (torch) to 120x (TensorFlow) one input sample on MobileNetV3-small
_TANGENT_INTERMEDIATES = 64


@dataclass(frozen=True)
class Pair:
    """One (output, input) block of the Jacobian. ``out_shape``/``in_shape`` are per sample
    (whole arrays with batch=False); ``shape`` is the final layout; ``m``/``n`` the output
    and input elements per sample."""

    of: str
    wrt: str
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    samples: int | None  # None with batch=False
    key: str = field(init=False)  # d{of}/d{wrt}
    m: int = field(init=False)
    n: int = field(init=False)

    def __post_init__(self):  # plain attributes: read in every block's inner loop
        object.__setattr__(self, "key", f"d{self.of}/d{self.wrt}")
        object.__setattr__(self, "m", prod(self.out_shape))
        object.__setattr__(self, "n", prod(self.in_shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return (() if self.samples is None else (self.samples,)) + self.out_shape + self.in_shape


@dataclass(frozen=True)
class Plan:
    """Everything about a Jacobian computation that is known before it starts.
    ``sample_bytes``: one sample's Jacobian (all pairs); ``elements``: (output, input)
    elements per sample over the selected outputs and inputs."""

    xs: dict[str, np.ndarray]
    wrt: list[str]
    of: list[str]
    pairs: list[Pair]
    batch: bool
    samples: int  # B (1 with batch=False)
    mode: str  # "forward" | "reverse"
    dtype: np.dtype
    outputs: Callable[[], dict[str, np.ndarray]] = field(repr=False, compare=False)
    notes: list[str] = field(default_factory=list, repr=False, compare=False)  # e.g. why not the mode asked for
    # the tuner that chose ``mode`` (auto, rows and columns within MODE_SPAN): ``run`` times the work for it
    modes: strategies.Tuner | None = field(default=None, repr=False, compare=False)
    block_bytes: int = field(default=BLOCK_BYTES, repr=False, compare=False)  # the model's (Model.block_bytes)
    sample_bytes: int = field(init=False)
    elements: tuple[int, int] = field(init=False)
    _shapes: tuple[dict, dict] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        shapes = {p.of: p.out_shape for p in self.pairs}, {p.wrt: p.in_shape for p in self.pairs}
        object.__setattr__(self, "_shapes", shapes)
        object.__setattr__(self, "sample_bytes", sum(p.m * p.n for p in self.pairs) * self.dtype.itemsize)
        object.__setattr__(self, "elements", (sum(prod(shapes[0][o]) for o in self.of),
                                              sum(prod(shapes[1][i]) for i in self.wrt)))

    @cached_property
    def ys(self) -> dict[str, np.ndarray]:
        """The outputs at xs: one forward pass, already run by ``plan`` unless the model's
        signature made it unnecessary (then run on first use)."""
        return self.outputs()

    @property
    def nbytes(self) -> int:
        return self.sample_bytes * (self.samples if self.batch else 1)

    def rows(self, output: str) -> tuple[int, ...]:
        """Per-sample (or, with batch=False, whole) shape of an output."""
        return self._shapes[0][output]

    def columns(self, input: str) -> tuple[int, ...]:
        """Per-sample (or whole) shape of an input."""
        return self._shapes[1][input]


class Sink(Protocol):
    """Receives complete sample blocks: ``block`` has shape ``(s1 - s0, *per-sample
    layout)`` (with batch=False: the full layout, s0=0, s1=1). For each sample block every
    pair is written once; the engine reuses its buffers for the next sample block, so a
    sink that keeps data copies it.

    A sink may also offer ``target(key, s0, s1)``: a writable ``(s1 - s0, m, n)`` view the
    engine fills in place (no buffer, no copy) before calling ``write`` with it.

    A sink that offers ``write_part(key, s, rows, cols, block, out_ndim)`` also takes
    samples whose Jacobian is too big to hold: ``block`` is entries ``rows`` x ``cols``
    (slices) of sample ``s``'s Jacobian flattened to (m, n), ``out_ndim`` the number of its
    output axes; every entry of a sample is written exactly once, the sample's parts
    before the next sample's."""

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None: ...


class ArraySink:
    """Collects everything in memory (the Python API's default), filled in place."""

    def __init__(self, plan: Plan):
        self.arrays = {p.key: np.empty(p.shape, plan.dtype) for p in plan.pairs}
        self.columns = {p.key: p.n for p in plan.pairs}
        self.batch = plan.batch

    def target(self, key: str, s0: int, s1: int) -> np.ndarray:
        a = self.arrays[key]
        return (a[s0:s1] if self.batch else a[None]).reshape(s1 - s0, -1, self.columns[key])

    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        dst = self.arrays[key][s0:s1] if self.batch else self.arrays[key][None]
        if not np.may_share_memory(dst, block):  # filled in place already
            dst[...] = block


def plan(
    model: Model,
    xs: Mapping[str, np.ndarray],
    wrt: Sequence[str] | None = None,
    of: Sequence[str] | None = None,
    mode: str = "auto",
    batch: bool = True,
    tune: bool = False,
) -> Plan:
    """Shapes, pairs, mode and dtype of the Jacobian of ``model`` at ``xs``, from one forward
    pass, or from the model's signature once a forward pass has confirmed it. ``mode="auto"``
    takes the mode with fewer products (reverse if rows <= columns); with ``tune``, where
    rows and columns are within ``strategies.MODE_SPAN`` of each other, the mode measured
    faster on this model's earlier Jacobians of the same pairs (``strategies.modes``)."""
    xs = {k: np.asarray(v) for k, v in xs.items()}
    key = None
    if batch and model.signature_confirmed:  # then a plan depends only on these (repeated calls are common)
        key = (tuple((k, v.shape, v.dtype.str) for k, v in xs.items()), tuple(wrt or ()), tuple(of or ()), mode)
        hit = strategies.memo(model).plans.get(key)
        if hit is not None:
            return _tuned(model, Plan(xs, *hit, outputs=lambda: _forward_blocks(model, xs),
                                      block_bytes=model.block_bytes or BLOCK_BYTES), mode, tune)
    known = _signature(model, xs) if batch else None
    if known is None:
        key = None  # shapes from a forward pass: they may depend on more than the input shapes
        ys = _forward_blocks(model, xs) if batch else model.forward(xs)
        known = {k: (v.shape, v.dtype) for k, v in ys.items()}
        if batch:
            _confirm_signature(model, ys)
        outputs = lambda: ys  # noqa: E731
    else:
        outputs = lambda: _forward_blocks(model, xs)  # noqa: E731
    floats = [n for n, (_, dtype) in known.items() if dtype.kind == "f"]
    wrt = _choose(wrt, [n for n in xs if xs[n].dtype.kind == "f"], list(xs), "input", "--wrt")
    of = _choose(of, floats, list(known), "output", "--of")
    if batch:
        sizes = {v.shape[0] if v.ndim else None for v in xs.values()}
        sizes |= {shape[0] if shape else None for shape, _ in known.values()}
        if len(sizes) != 1 or None in sizes:
            raise InputError(
                "inputs and outputs do not share a leading batch axis (sizes "
                f"{sorted(str(s) for s in sizes)}); use --no-batch to treat each array as one vector"
            )
        samples = sizes.pop()
        out_shape = {o: known[o][0][1:] for o in of}
        in_shape = {i: xs[i].shape[1:] for i in wrt}
    else:
        samples = 1
        out_shape = {o: known[o][0] for o in of}
        in_shape = {i: xs[i].shape for i in wrt}
    pairs = [Pair(o, i, out_shape[o], in_shape[i], samples if batch else None) for o in of for i in wrt]
    asked = mode
    if mode == "auto":
        rows = sum(prod(out_shape[o]) for o in of)
        cols = sum(prod(in_shape[i]) for i in wrt)
        mode = "reverse" if rows <= cols else "forward"
    if mode not in ("forward", "reverse"):
        raise InputError(f"--mode must be auto, forward or reverse, not {mode!r}")
    dtype = np.dtype(np.result_type(*[known[o][1] for o in of], np.float32))
    if key is not None:
        plans = strategies.memo(model).plans
        if len(plans) >= 64:
            plans.clear()
        plans[key] = (wrt, of, pairs, batch, samples, mode, dtype)
    plan = Plan(xs, wrt, of, pairs, batch, samples, mode, dtype, outputs, block_bytes=model.block_bytes or BLOCK_BYTES)
    return _tuned(model, plan, asked, tune)


def _tuned(model: Model, plan: Plan, asked: str, tune: bool) -> Plan:
    """``plan`` (in the mode the shape suggests), or, for an auto mode that the shape does
    not decide, in the mode its tuner picks, with the tuner."""
    rows, cols = plan.elements
    if not tune or asked != "auto" or max(rows, cols) > strategies.MODE_SPAN * min(rows, cols):
        return plan
    work = tuple((p.key, p.out_shape, p.in_shape) for p in plan.pairs)
    tuner = strategies.modes(model, (work, plan.batch, plan.dtype.str, plan.samples.bit_length() // 4), plan.mode)
    return plan if tuner is None else dataclasses.replace(plan, mode=tuner.pick(plan.samples), modes=tuner)


def reverse_if_no_forward(model: Model, plan: Plan) -> Plan:
    """``plan``, or, when it is in forward mode and the model has no forward mode (e.g.
    torch's CPU flash-attention kernel has no forward-mode rule) while reverse mode works,
    the same plan in reverse mode, with a note saying why. One JVP (and then one VJP) of
    one sample probes it."""
    if plan.mode != "forward" or not model.supports_ad or (plan.modes and plan.modes.best["forward"] < inf):
        return plan  # (a tuner that has timed forward mode knows it works)
    xs = {k: v[:1] for k, v in plan.xs.items()} if plan.batch else plan.xs
    try:
        model.jvp(xs, {i: np.ones((1, *xs[i].shape), xs[i].dtype) for i in plan.wrt}, plan.of, per_sample=plan.batch)
        return plan
    except UnsupportedError as e:
        reason = str(e).split("; use --mode reverse")[0]
    if plan.modes:
        plan.modes.exclude("forward")
        if plan.modes.strategies[0] == "reverse":  # forward mode was only on trial
            return dataclasses.replace(plan, mode="reverse")
    ys = model.forward(xs)
    try:
        model.vjp(xs, {o: np.ones((1, *ys[o].shape), ys[o].dtype) for o in plan.of}, plan.wrt, per_sample=plan.batch)
    except UnsupportedError:
        return plan  # no reverse mode either: running the plan says why
    notes = [*plan.notes, f"forward mode is unavailable for this model ({reason}): using reverse mode"]
    return dataclasses.replace(plan, mode="reverse", notes=notes)


def _signature(model: Model, xs: dict[str, np.ndarray]) -> dict[str, tuple[tuple, np.dtype]] | None:
    """Batched output shapes and dtypes from the model's signature, when a forward pass has
    confirmed it (names, per-sample shapes and dtypes) and it is fully static; else None."""
    sizes = {v.shape[0] if v.ndim else None for v in xs.values()}
    if not model.signature_confirmed or len(sizes) != 1 or None in sizes:
        return None
    (samples,) = sizes
    known = {}
    for s in model.outputs:
        if not s.shape or s.shape[0] is not None or None in s.shape[1:]:
            return None
        known[s.name] = ((samples, *s.shape[1:]), np.dtype(s.dtype))
    return known or None


def _confirm_signature(model: Model, ys: dict[str, np.ndarray]) -> None:
    specs = {s.name: s for s in model.outputs}
    model.signature_confirmed = list(specs) == list(ys) and all(  # same order too: the same pairs either way
        specs[k].shape and specs[k].shape[0] is None and tuple(specs[k].shape[1:]) == v.shape[1:]
        and specs[k].dtype == str(v.dtype)
        for k, v in ys.items()
    )


def _forward_blocks(model: Model, xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The forward pass over the batch in sample blocks of about BLOCK_BYTES of working
    memory, so that a large batch never passes through the model at once."""
    sizes = {v.shape[0] if v.ndim else None for v in xs.values()}
    total = sizes.pop() if len(sizes) == 1 else None
    if not total:
        return model.forward(xs)
    step = max(1, BLOCK_BYTES // (sum(v[:1].nbytes for v in xs.values()) * _INTERMEDIATES or 1))
    if step >= total:
        return model.forward(xs)
    parts = []
    for s0 in range(0, total, step):
        ys = model.forward({k: v[s0 : s0 + step] for k, v in xs.items()})
        if any(np.ndim(v) == 0 or v.shape[0] != min(step, total - s0) for v in ys.values()):
            return model.forward(xs)  # outputs without a batch axis: the plan reports it
        parts.append(ys)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _choose(asked, default, available, what, flag) -> list[str]:
    if not asked:
        if not default:
            raise InputError(f"the model has no floating-point {what} to differentiate")
        return list(default)
    for name in asked:
        if name not in available:
            raise InputError(f"{flag} {name!r}: the model has no {what} of that name (it has: {', '.join(available)})")
    return list(asked)


def sample_block(plan: Plan, budget: int | None = None, chunk: int | None = None) -> int:
    """How many samples to hold at once: their Jacobian buffers fit in half the budget and
    in the plan's block bytes (BLOCK_BYTES unless the backend has its own: larger blocks
    only cost memory and page faults). Where one backend call
    then takes every row (reverse mode; columns in forward mode) of the block, fewer samples,
    in blocks of even size, so that its seeds and results fit in CALL_BYTES: the same
    number of calls (each still takes every row), on smaller tensors (not for calls of
    fewer than CALL_ROWS rows)."""
    per_sample = plan.sample_bytes
    cap = min(plan.block_bytes, (budget or DEFAULT_BUDGET) // 2)
    step = int(max(1, min(plan.samples, cap // max(per_sample, 1))))
    outs, ins = plan.elements
    rows = outs if plan.mode == "reverse" else ins
    if rows * step < CALL_ROWS or seed_block(plan, step, budget, chunk) < rows:
        return step
    fits = max(1, CALL_BYTES // max(rows * (ins + outs) * plan.dtype.itemsize, 1))
    return step if fits >= step else -(-plan.samples // -(-plan.samples // fits))


def seed_block(plan: Plan, samples: int, budget: int | None = None, chunk: int | None = None) -> int:
    """Rows (reverse) or columns (forward) per backend call: seeds and results for every
    sample of the block, times a factor for the model's own intermediates, in the half of
    the budget the Jacobian buffer leaves (a larger factor in forward mode, where every
    layer's tangent is held per column); the seeds and the results themselves each within
    the plan's block bytes (a forced --mode forward on an image model has wide seeds and narrow
    results: its per-column intermediates grow with the seeds)."""
    if chunk:
        return int(chunk)
    outs, ins = plan.elements
    per_seed = samples * (ins + outs) * plan.dtype.itemsize
    per_seed *= _TANGENT_INTERMEDIATES if plan.mode == "forward" else _INTERMEDIATES
    widest = samples * max(ins, outs) * plan.dtype.itemsize  # the seeds or the results
    k = min(((budget or DEFAULT_BUDGET) // 2) // (per_seed or 1), plan.block_bytes // (widest or 1))
    return int(max(1, k))


def run(
    model: Model,
    plan: Plan,
    sink: Sink,
    method: str = "ad",
    chunk: int | None = None,
    budget: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Plan:
    """Compute every pair of the plan and write it to ``sink`` sample block by sample block,
    or, when one sample's Jacobian is more than half the budget, part by part (row blocks in
    reverse mode, column blocks otherwise) through ``sink.write_part``.
    ``progress(n)`` is called with the number of samples just finished. Returns the plan
    that produced the numbers: ``plan``, or, where the mode on trial failed (``Plan.modes``),
    the same plan in the shape's mode, run again from the start."""
    budget = budget or DEFAULT_BUDGET
    if method not in ("ad", "fd"):
        raise InputError(f"--method must be ad or fd, not {method!r}")
    if method == "ad" and not model.supports_ad:
        raise model._no_ad()
    parts = _parts_fd if method == "fd" else _parts_reverse if plan.mode == "reverse" else _parts_forward
    in_place = getattr(sink, "target", None)
    if not in_place and in_parts(plan, budget):
        if hasattr(sink, "write_part"):
            _run_parts(model, plan, sink, parts, seed_block(plan, 1, budget, chunk), budget, progress)
            return plan
        if plan.sample_bytes > budget:
            what = "sample" if plan.batch else "input"
            raise InputError(
                f"one {what}'s Jacobian takes {size_text(plan.sample_bytes)}, more than the memory budget "
                f"({size_text(budget)}); raise --max-memory"
            )
    step = sample_block(plan, budget, chunk) if plan.batch else 1
    buffers = {} if in_place else {p.key: np.empty((step, p.m, p.n), plan.dtype) for p in plan.pairs}
    tuner = plan.modes if method == "ad" else None
    engine, start = strategies.memo(model), time.perf_counter()
    trials = engine.trials
    for s0 in range(0, plan.samples, step):
        s1 = min(plan.samples, s0 + step)
        xs = {k: v[s0:s1] for k, v in plan.xs.items()} if plan.batch else plan.xs
        bufs = {p.key: in_place(p.key, s0, s1) if in_place else buffers[p.key][: s1 - s0] for p in plan.pairs}
        try:
            for key, rows, cols, block in parts(model, plan, xs, seed_block(plan, s1 - s0, budget, chunk)):
                bufs[key][:, rows, cols] = block
        except (UserError, LimitationError, MemoryError):
            if not (tuner and s0 == 0 and plan.mode != tuner.strategies[0]):
                raise
            # the other mode was only on trial (a model without forward mode may fold its JVPs
            # past a size it accepts, say): the shape's mode, from the start, which says so if it fails too
            tuner.exclude(plan.mode)
            other = dataclasses.replace(plan, mode=tuner.strategies[0], modes=None)
            return run(model, other, sink, method, chunk, budget, progress)
        for p in plan.pairs:
            sink.write(p.key, s0, s1, bufs[p.key].reshape((s1 - s0,) + p.out_shape + p.in_shape))
        if progress:
            progress(s1 - s0)
    # timed in its strategies' usual choice, it is a fair time for the mode; else a warm-up at most
    # (the best of a mode's runs counts, and a second one follows)
    if tuner and (engine.trials == trials or not tuner.runs[plan.mode]):
        tuner.record(plan.mode, time.perf_counter() - start, plan.samples)
    return plan


def in_parts(plan: Plan, budget: int | None = None) -> bool:
    """Whether ``run`` streams each sample in parts (when its sink can take them): one
    sample's Jacobian is more than half the budget."""
    return plan.sample_bytes > (budget or DEFAULT_BUDGET) // 2


def parts_direction(plan: Plan, method: str) -> str:
    """What the parts of a sample are: "rows" (reverse-mode AD) or "columns"."""
    return "rows" if method == "ad" and plan.mode == "reverse" else "columns"


def _run_parts(model: Model, plan: Plan, sink, parts, k: int, budget: int, progress) -> None:
    """One sample at a time, each row block straight to the sink: memory holds one backend
    call's seeds and results, never a whole sample's Jacobian. Column blocks (forward mode,
    finite differences) are first joined side by side up to a quarter of the budget, so that
    a file whose rows are contiguous is written in few, wide pieces."""
    out_ndim = {p.key: len(p.out_shape) for p in plan.pairs}
    entries = sum(p.m * p.n for p in plan.pairs)
    for s in range(plan.samples):
        reported = 0.0  # of this sample, in samples: the progress bar moves part by part
        xs = {name: v[s : s + 1] for name, v in plan.xs.items()} if plan.batch else plan.xs
        pending: dict[str, list] = {}  # key -> [rows, c0, c1, blocks]: adjacent column blocks

        def flush(key):
            rows, c0, c1, blocks = pending.pop(key)
            sink.write_part(key, s, rows, slice(c0, c1), np.concatenate(blocks, axis=1), out_ndim[key])

        for key, rows, cols, block in parts(model, plan, xs, k):
            block = np.array(block[0], plan.dtype)  # a copy: a backend may reuse its result buffers
            last = pending.get(key)
            if last and last[0] == rows and last[2] == cols.start:
                last[2] = cols.stop
                last[3].append(block)
            else:
                if last:
                    flush(key)
                pending[key] = [rows, cols.start, cols.stop, [block]]
            if sum(b.nbytes for p in pending.values() for b in p[3]) > budget // 4:
                for other in list(pending):
                    flush(other)
            if progress and reported + block.size / entries < 1:
                reported += block.size / entries
                progress(block.size / entries)
        for key in list(pending):
            flush(key)
        if progress:
            progress(1 - reported)


def size_text(n: float) -> str:
    """A byte count for people: 512 bytes, 1.5 GiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


# Each ``_parts_*`` yields ``(key, rows, cols, block)``: rows/cols are slices of the flattened
# (m, n) per-sample Jacobian of pair ``key`` and block has shape (samples, rows, cols).

def _parts_reverse(model: Model, plan: Plan, xs, k: int) -> Iterator[tuple[str, slice, slice, np.ndarray]]:
    """Row blocks: a one-hot cotangent on rows r0:r1 of one output, for every sample."""
    lead = _lead(xs, plan.batch)
    for o in plan.of:
        shape = plan.rows(o)
        m = prod(shape)
        for r0 in range(0, m, k):
            r1 = min(m, r0 + k)
            ct = _one_hot(r1 - r0, lead, r0, plan.dtype, shape)
            grads = strategies.vjp(model, xs, {o: ct}, plan.wrt, per_sample=plan.batch)
            for i in plan.wrt:
                g = grads[i].reshape(r1 - r0, _samples(lead), -1)  # (k, S, n)
                yield f"d{o}/d{i}", slice(r0, r1), slice(0, g.shape[2]), g.transpose(1, 0, 2)


def _parts_forward(model: Model, plan: Plan, xs, k: int) -> Iterator[tuple[str, slice, slice, np.ndarray]]:
    """Column blocks: a one-hot tangent on columns c0:c1 of one input, for every sample."""
    lead = _lead(xs, plan.batch)
    for i in plan.wrt:
        shape = xs[i].shape[1:] if plan.batch else xs[i].shape
        n = prod(shape)
        for c0 in range(0, n, k):
            c1 = min(n, c0 + k)
            t = _one_hot(c1 - c0, lead, c0, xs[i].dtype, shape)
            outs = strategies.jvp(model, xs, {i: t}, plan.of, per_sample=plan.batch)
            for o in plan.of:
                v = outs[o].reshape(c1 - c0, _samples(lead), -1)  # (k, S, m)
                yield f"d{o}/d{i}", slice(0, v.shape[2]), slice(c0, c1), v.transpose(1, 2, 0)


def _parts_fd(model: Model, plan: Plan, xs, k: int) -> Iterator[tuple[str, slice, slice, np.ndarray]]:
    """Column blocks by central differences."""
    from .fd import fd_columns

    for i in plan.wrt:
        for o, (c0, block) in fd_columns(model, xs, i, plan.of, batch=plan.batch, k=k, notes=plan.notes):
            yield f"d{o}/d{i}", slice(0, block.shape[1]), slice(c0, c0 + block.shape[2]), block


def _lead(xs, batch: bool) -> tuple[int, ...]:
    return (next(iter(xs.values())).shape[0],) if batch else ()


def _samples(lead: tuple[int, ...]) -> int:
    return lead[0] if lead else 1


_SEEDS: dict[tuple, np.ndarray] = {}  # small seed blocks, reused from call to call (read-only)


def _one_hot(k: int, lead: tuple[int, ...], start: int, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Seeds e_{start..start+k} (flat indices into ``shape``) for every sample, shaped
    (k, *lead, *shape). Blocks up to 1 MiB are kept (at most 16) and returned again,
    read-only, for the same arguments: the same object each time, so a backend may keep
    its own copy of it."""
    key = (k, lead, start, np.dtype(dtype).str, shape)
    seeds = _SEEDS.get(key)
    if seeds is None:
        seeds = np.zeros((k, _samples(lead), prod(shape)), dtype)
        idx = np.arange(k)
        seeds[idx, :, start + idx] = 1
        seeds = seeds.reshape((k,) + lead + shape)
        if seeds.nbytes <= 1 << 20:
            seeds.flags.writeable = False
            if len(_SEEDS) >= 16:
                del _SEEDS[next(iter(_SEEDS))]
            _SEEDS[key] = seeds
    return seeds
