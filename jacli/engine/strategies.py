"""What the engine learns about a model while it works with it, kept here rather than on the
model: the plans it has made (``jacobian.plan``) and, per primitive and amount of work, how
fast each of the model's map strategies ran (``Tuner``).

A backend may map a block of k seeds in several exact ways (``Model.strategies``: e.g.
torch.func's vmap over one VJP, or k backward passes through one recorded forward pass);
they differ in speed, by up to 20x either way depending on the model's operators, and in
float rounding. ``vjp``/``jvp`` here time every call and use the fastest seen.
``JACLI_STRATEGY=NAME`` pins one instead, for reproducible runs.

The same kind of tuner also chooses a Jacobian's mode (``modes``) where ``--mode auto`` and
the shape do not decide: with the rows m and columns n within ``MODE_SPAN`` of each other,
reverse mode (m/k VJPs) and forward mode (n/k JVPs) are both plausible, and which is faster
depends on the model, the backend and the block sizes (a 256 x 256 transformer block at
batch 16: reverse 52 ms, forward 83 ms as TorchScript; as ONNX, forward 53 ms, reverse 59 ms
in one call, 70 and 58 ms in two). ``JACLI_STRATEGY`` set to anything turns that off too:
the shape decides.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..model import FOLDED, Model

PIN = "JACLI_STRATEGY"  # environment variable: a strategy name, or unset/empty to tune
TRIALS = 2  # runs of each strategy before choosing (a first run may include tracing) ...
# ... and more, up to WARM_TRIALS, while each run is WARMING times faster than all before it:
# a first few runs can be slow for more than tracing (the allocator page-faulting in new blocks
# until glibc's mmap threshold has grown: the traced Conv1d net's vmapped VJP of 8,192 rows took
# 29 ms at best in its two trials and 9 ms once warm; k backward passes, 24 ms, won until re-timed)
WARM_TRIALS = 4
WARMING = 0.8
HOPELESS = 4  # a strategy whose first run was this many times slower than another's first gets no second trial
RETRY_SHARE = 1 / 32  # at most this share of the time goes to re-timing strategies that lost
# a strategy that must first compile for a shape (Model.compiles: XLA) waits until the calls of
# that shape have taken this many times the tuner's first call (which traced the graph; jacli's
# first call of a Keras MobileNetV3Small took 7.5 s, XLA's first 10.4 s), or once one compile is
# known, as long as it took: a loop pays at most about twice what it would have without the
# compile, a one-shot run never pays it
COMPILE_PRICE = 1.5
# sizes of work within a factor of 16 share a tuner (_mapped), but per unit of work a map gains
# more from a bigger batch than another: each strategy is re-timed (TRIALS runs) at a work at
# least this many times the largest it ran at, once another has run there (Keras'
# MobileNetV3Small, 2 threads: XLA 14.4 ms at one sample, as fast as the plain map, then 33
# against 49 ms at four, where it had never run: 1.4-1.7x slower than the XLA idiom). Two runs,
# not one, and more (up to WARM_TRIALS) while each is WARMING times faster than the one before:
# XLA's first run at four samples after compiling for them took 46-50 ms, its later ones 25,
# and one run against the plain map's best of 400 (45 ms) kept the plain map for good
RESIZED = 2
# --mode auto times both modes when rows and columns are within this factor of each other: one
# VJP costs 1.5-4 forward passes, one JVP 1.5-3, so beyond 2x the mode with fewer products wins
MODE_SPAN = 2


class Tuner:
    """The choice among one primitive's strategies for one size of work. Each is tried
    ``TRIALS`` times, more (up to ``WARM_TRIALS``) while each run is ``WARMING`` times
    faster than all before it, still warming up (once only if that run was ``HOPELESS``ly slower than another's first
    run: k backward passes are typically 5-10x slower than one vmapped one, and 280x with 2
    threads on a busy machine; a second trial of them costs more than a short run's whole
    work), then the one with the fastest run so far is used (load on a shared
    machine only ever slows a run down, so the minimum is the honest figure). First runs
    are compared only with first runs, and the tuner's very first call never rules its
    strategy out: it carries the one-time costs (torch's first backward pass in a process
    imports sympy, torch.func's first may import torch._dynamo: 1-3 s, where a warm call
    takes 3 ms). A loser is
    re-timed now and then, so that a burst of load during its trials does not decide for
    good, but only while re-timing has cost at most ``RETRY_SHARE`` of the time spent so
    far, priced at its own best time: a strategy 2x slower than the winner is re-run about
    once in 64 calls, one 20x slower once in 640. Each strategy's first run is left out of
    the time spent: its one-time costs (a Keras MobileNetV3Small's two map graphs traced
    for 8 s) bought the loser five re-timings in a row right after its trials, each 25-50%
    slower than the winner's 40 ms call. Per unit of work a bigger call is cheaper, and not
    by the same factor for every strategy, so the winner is the fastest at this call's work
    where it has run at it, and each strategy is re-timed ``TRIALS`` times at a work
    ``RESIZED`` times the largest it ran at, once another has run there (``due``).

    A strategy that must compile for this call's shapes (``compiling``: XLA, a first call 1.4x
    longer than tracing alone, then 2-3x faster) is a rent-or-buy choice, per
    shape: it is barred until the calls of these shapes have cost as much as a compile is
    expected to (``price``), so a short run never compiles (nor does the last, smaller block
    of a long one) and a loop compiles after paying about as much again.
    The compiling run itself is neither its strategy's speed nor time spent working."""

    def __init__(self, strategies: Sequence[str], warmup: bool = False):
        self.strategies = tuple(strategies)
        # warmup: a first run may be only a warm-up (building a derivative graph, tracing), so
        # no first run rules a strategy out (HOPELESS); they are tried in order, each twice
        self.warmup = warmup
        self.runs = {s: 0 for s in self.strategies}
        self.best = {s: math.inf for s in self.strategies}  # seconds per unit of work
        self.first = dict(self.best)  # each one's first run, per unit of work
        self.opener: str | None = None  # the strategy of the tuner's first call
        self.spent = 0.0  # seconds, every call but each strategy's first
        self.retried = 0.0  # seconds, re-timing calls only
        self.rent: dict[tuple, float] = {}  # seconds per shape of the calls' arrays, since its last compile
        self.paid: float | None = None  # seconds, the first call, then the last compiling call
        self.compiled_first: set[str] = set()  # strategies whose first run compiled
        self.at: dict[tuple[str, float], float] = {}  # (strategy, work) -> best seconds per unit of work there
        self.largest = {s: 0.0 for s in self.strategies}  # the largest work each has run at
        self.due: dict[tuple[str, float], int] = {}  # (strategy, work) -> re-timing runs still owed there
        self.redone: dict[tuple[str, float], int] = {}  # (strategy, work) -> re-timing runs there so far
        self.warming: set[str] = set()  # strategies whose last run was WARMING x faster than any before
        self.tried = False  # whether the last pick was a trial or re-timed a loser
        self.waiting = False  # whether it was not the strategy owed a trial, or the fastest, only
        # because that one must compile first and these shapes have not yet paid for it

    def price(self) -> float:
        """What the next compile is expected to cost: ``COMPILE_PRICE`` x the first call, or
        what the last one cost."""
        if self.paid is None:
            return math.inf
        return self.paid if self.compiled_first else COMPILE_PRICE * self.paid

    def pick(self, work: float = 1.0, compiling: frozenset[str] | set[str] = frozenset(), shape: tuple = ()) -> str:
        barred = set(compiling) if self.rent.get(shape, 0.0) < self.price() else set()
        owed = self.trial() or self.resized(work)
        self.waiting = bool(barred) and (owed in barred or self.winner(work=work) in barred)
        trial = self.trial(barred) or self.resized(work, barred)
        self.tried = trial is not None
        if trial:
            return trial
        winner = self.winner(barred, work)
        for s in sorted(self.strategies, key=self.runs.__getitem__):
            if s != winner and s not in barred and self.retried + self.best[s] * work <= RETRY_SHARE * self.spent:
                self.tried = True
                return s
        return winner

    def trial(self, barred=frozenset()) -> str | None:
        """The strategy still owed a trial run, if any (the fewest runs first; with warmup,
        in order), but none of the ``barred``."""
        order = self.strategies if self.warmup else sorted(self.strategies, key=self.runs.__getitem__)
        for s in order:
            if self.owed(s) and s not in barred and not (self.runs[s] and self.hopeless(s)):
                return s
        return None

    def resized(self, work: float, barred=frozenset()) -> str | None:
        """A strategy to re-time at this ``work`` (``RESIZED``; ``TRIALS`` runs there, the
        first one owed as it first qualifies), but none of the ``barred``, nor one ruled out
        (hopeless, excluded); never in a mode tuner (``warmup``: each re-timing there would be
        a whole Jacobian)."""
        if self.warmup or not any((s, work) in self.at for s in self.strategies):
            return None
        for s in self.strategies:
            if not self.runs[s] or self.best[s] == math.inf or self.hopeless(s):
                continue
            if (s, work) not in self.at and (s, work) not in self.due and work >= RESIZED * self.largest[s]:
                self.due[s, work] = TRIALS
            if s not in barred and self.due.get((s, work), 0) > 0:
                return s
        return None

    def owed(self, strategy: str) -> bool:
        """Whether its next run is a trial: fewer than ``TRIALS`` runs, or fewer than
        ``WARM_TRIALS`` and still warming up."""
        runs = self.runs[strategy]
        return runs < TRIALS or (runs < WARM_TRIALS and strategy in self.warming)

    def hopeless(self, strategy: str) -> bool:
        """Its first run was ``HOPELESS`` times slower than another's first run, and it was
        not the tuner's first call nor a compile (never with warmup: first runs are not compared)."""
        others = [t for o, t in self.first.items() if o != strategy]
        return (not self.warmup and strategy != self.opener and strategy not in self.compiled_first
                and self.first[strategy] > HOPELESS * min(others, default=math.inf))

    def exclude(self, strategy: str) -> None:
        """``strategy`` turned out not to work: never pick it again."""
        self.runs[strategy] = WARM_TRIALS
        self.best[strategy] = math.inf
        self.at = {key: t for key, t in self.at.items() if key[0] != strategy}

    def winner(self, barred=frozenset(), work: float | None = None) -> str:
        """The fastest per unit of work: at this ``work`` where a strategy has run at it, else
        over all its runs."""
        return min((s for s in self.strategies if s not in barred),
                   key=lambda s: self.at.get((s, work), self.best[s]))

    def record(self, strategy: str, seconds: float, work: float = 1.0, compiled: bool = False,
               shape: tuple = ()) -> None:
        if self.paid is None or compiled:
            self.paid, self.rent[shape] = seconds, 0.0
        else:
            self.rent[shape] = self.rent.get(shape, 0.0) + seconds
        if compiled and self.runs[strategy]:  # a known strategy compiling for a new shape
            return
        if compiled:
            self.compiled_first.add(strategy)
        if not self.owed(strategy) and strategy != self.winner(work=work):  # a loser re-timed
            self.retried += seconds
        if seconds / work < WARMING * self.best[strategy]:  # faster than every run before (a first run too)
            self.warming.add(strategy)
        else:
            self.warming.discard(strategy)
        key = (strategy, work)
        if self.due.get(key, 0) > 0:  # re-timed at this work: once more while still warming up there
            self.due[key] -= 1
            self.redone[key] = self.redone.get(key, 0) + 1
            if not self.due[key] and self.redone[key] < WARM_TRIALS and seconds / work < WARMING * self.at.get(key, math.inf):
                self.due[key] = 1
        if not self.runs[strategy]:
            self.first[strategy] = seconds / work
            self.opener = self.opener or strategy
        else:
            self.spent += seconds
        self.runs[strategy] += 1
        self.best[strategy] = min(self.best[strategy], seconds / work)
        self.at[strategy, work] = min(self.at.get((strategy, work), math.inf), seconds / work)
        self.largest[strategy] = max(self.largest[strategy], work)


class Memo:
    """One model's plans (``jacobian.plan``'s cache), tuners and mode tuners. ``trials``
    counts the calls that ran a strategy on trial (or re-timed a loser): a Jacobian during
    which this grew was not timed in its mode's usual strategies."""

    def __init__(self):
        self.plans: dict = {}
        self.tuners: dict[tuple, Tuner] = {}
        self.modes: dict[tuple, Tuner] = {}
        self.trials = 0


_MEMOS: dict[int, tuple[weakref.ref, Memo]] = {}


def memo(model: Model) -> Memo:
    """The engine's memory of ``model``, dropped when the model is."""
    key = id(model)
    entry = _MEMOS.get(key)
    if entry is None or entry[0]() is not model:
        entry = _MEMOS[key] = (weakref.ref(model, lambda _, key=key: _MEMOS.pop(key, None)), Memo())
    return entry[1]


def pinned(kind: str, options: Sequence[str]) -> str | None:
    """The strategy ``JACLI_STRATEGY`` names, if set; an InputError if this model's ``kind``
    has no strategy of that name."""
    name = os.environ.get(PIN, "").strip()
    if not name:
        return None
    if name not in options:
        raise InputError(f"{PIN}={name!r}: this model's {kind} can map seeds as {', '.join(options)}; "
                         f"set one of those, or unset {PIN} to let jacli choose")
    return name


def modes(model: Model, key: tuple, by_shape: str) -> Tuner | None:
    """The tuner that chooses the mode of ``model``'s Jacobians of this ``key`` (pairs and
    size of work), trying the mode the shape suggests (``by_shape``) first; None when
    ``JACLI_STRATEGY`` pins the engine's choices (then the shape decides)."""
    if os.environ.get(PIN, "").strip():
        return None
    other = "forward" if by_shape == "reverse" else "reverse"
    return memo(model).modes.setdefault(key, Tuner((by_shape, other), warmup=True))


def vjp(model: Model, xs: Mapping[str, np.ndarray], cotangents: Mapping[str, np.ndarray], wrt: Sequence[str],
        per_sample: bool = True, few: bool = False) -> dict[str, np.ndarray]:
    """``model.vjp`` by its fastest strategy (or the pinned one). ``few``: one of a few
    calls (a gradient check's groups of directions): where each strategy is a graph to
    trace (``Model.traced_maps``), the seeds are folded into the batch instead, untimed
    (unless ``JACLI_STRATEGY`` pins one); its plain graph is traced once for every k."""
    return _mapped(model, "vjp", xs, cotangents, wrt, per_sample, few)


def jvp(model: Model, xs: Mapping[str, np.ndarray], tangents: Mapping[str, np.ndarray], of: Sequence[str],
        per_sample: bool = True, few: bool = False) -> dict[str, np.ndarray]:
    """``model.jvp`` by its fastest strategy (or the pinned one); ``few`` as for ``vjp``."""
    return _mapped(model, "jvp", xs, tangents, of, per_sample, few)


def _mapped(model: Model, kind: str, xs, seeds, names, per_sample: bool, few: bool = False) -> dict[str, np.ndarray]:
    call = model.vjp if kind == "vjp" else model.jvp
    if few and per_sample and model.traced_maps and not os.environ.get(PIN, "").strip():
        # (a Keras EfficientNetB0's mapped JVP and VJP, and the trial of the sequential VJP, traced for 35 s and
        # held 300 MB; the plain graphs 15 s and 190 MB)
        return call(xs, seeds, names, per_sample=True, strategy=FOLDED)
    options = model.strategies(kind, xs, seeds)
    if len(options) < 2:
        return call(xs, seeds, names, per_sample=per_sample)
    chosen = pinned(kind, options)
    if chosen:
        return call(xs, seeds, names, per_sample=per_sample, strategy=chosen)
    work = _leading(seeds) * _leading(xs)
    key = (kind, work.bit_length() // 4, options)  # sizes within a factor of 16 share a tuner
    engine = memo(model)
    tuner = engine.tuners.setdefault(key, Tuner(options))
    compiling = {s for s in options if model.compiles(s, xs, seeds)}
    shape = tuple(v.shape for v in (*xs.values(), *seeds.values())) if compiling else ()
    chosen = tuner.pick(work, compiling, shape)
    if tuner.tried:
        engine.trials += 1
    start = time.perf_counter()
    out = call(xs, seeds, names, per_sample=per_sample, strategy=chosen)
    tuner.record(chosen, time.perf_counter() - start, work, chosen in compiling, shape)
    return out


def _leading(arrays: Mapping[str, np.ndarray]) -> int:
    return next(iter(arrays.values())).shape[0]
