"""Gradient checks: a model's automatic derivatives (AD) against finite differences (FD).

Two kinds of check, both per sample of a batch:

* columns (the default, ``columns.py``): every entry of every sample's Jacobian, the AD
  Jacobian from ``jacobian.run`` against FD column by column;
* ``directions=K`` (``directions.py``): K random directional derivatives J·v per sample (the protocol's
  ``jvp``) against (f(x+hv) − f(x−hv)) / 2h — four forward passes per direction, whatever
  the input size — plus the dot-product identity <J t, c> = <t, Jᵀc>, which checks the
  VJP against the JVP; in reverse mode (a model without forward mode), <Jᵀc, v> from the
  VJP against the FD of <c, f(x + hv)>.

FD uses central differences at steps h = eps·max(|x|, 1) and h/2 combined by Richardson
extrapolation, with an error estimate (``fd.Estimate``), evaluated in float64 when the
backend can. An entry passes when

    |AD − FD| ≤ atol + rtol·|FD| + err_FD

where atol, unless given, is rtol × the largest |FD| entry of the same output row plus
what the AD dtype resolves, 16·(ε·(the sample's largest |FD| entry + |y|) + the dtype's
smallest normal number). A failing entry is diagnosed: a **kink** (f is not smooth within
the step, e.g. a ReLU/max switch point: the one-sided differences disagree and AD equals
one of them, or, extrapolated to second order, they disagree beyond their error
estimates; or a switch point the model's precision and float64 resolve differently at x:
the mismatch vanishes or jumps when judged again at nearby points, ``rejudge``), **fd-noise**
(the FD error estimate alone exceeds the tolerance and the mismatch is of its size),
**non-finite**, or a **wrong gradient**. Kinks and fd-noise are
places FD cannot judge: reported, but only wrong gradients and non-finite values fail.

Before comparing anything the batch is tested for cross-sample leakage: perturbing some
samples must not move the outputs of the others, or per-sample Jacobians are undefined.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from math import ceil, log2

import numpy as np

from ..errors import InputError, UnsupportedError
from ..model import Model
from . import jacobian as jac
from .fd import default_eps, forward_cost, forward_fn, in_pieces, left, resident

RTOL = {2: 5e-2, 4: 2e-3, 8: 1e-6}  # by the itemsize of the AD dtype
RTOL_FD = {2: 1e-1, 4: 1e-2, 8: 0.0}  # floor when FD has to run in a dtype of this itemsize
RESOLUTION = 16  # AD resolves entries to RESOLUTION * (eps * (sample's largest entry + |y|) + tiny)
LISTED = 20  # failing (and unresolved) entries kept in the report, worst first
SAMPLED = 4096  # compared entries kept for pictures: every one up to this many, else a uniform sample
LEAK_STEP = 0.1  # relative size of the perturbations of the leakage test

OK, KINK, NOISE, WRONG, NONFINITE = range(5)
DIAGNOSES = ("ok", "kink", "fd-noise", "wrong-gradient", "non-finite")


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float | None  # None: per row (see the module docstring)
    eps: float  # relative FD step
    ad_dtype: str
    fd_dtype: str

    def to_json(self) -> dict:
        return {"rtol": self.rtol, "atol": self.atol, "eps": self.eps, "ad_dtype": self.ad_dtype, "fd_dtype": self.fd_dtype}


def tolerance(ad_dtype, fd_dtype, rtol: float | None = None, atol: float | None = None, eps: float | None = None) -> Tolerance:
    """Defaults by dtype: rtol from the AD dtype, widened when FD cannot run in float64."""
    validate(rtol, atol, eps)
    ad, fd = np.dtype(ad_dtype), np.dtype(fd_dtype)
    if rtol is None:
        rtol = max(RTOL.get(ad.itemsize, RTOL[2]), RTOL_FD.get(fd.itemsize, RTOL_FD[2]))
    eps = default_eps(fd) if eps is None else eps
    return Tolerance(float(rtol), None if atol is None else float(atol), float(eps), str(ad), str(fd))


def validate(rtol=None, atol=None, eps=None, directions=None) -> None:
    if (rtol is not None and not rtol >= 0) or (atol is not None and not atol >= 0):
        raise InputError("--rtol and --atol must be non-negative")
    if eps is not None and not 0 < eps < 1:
        raise InputError(f"--eps must be between 0 and 1 (a step relative to max(|x|, 1)), not {eps:g}")
    if directions is not None and directions < 1:
        raise InputError(f"--directions must be at least 1, not {directions}")


@dataclass
class Entry:
    """One compared entry: J[sample][output_index, input_index] (columns) or the
    output_index element of J·v for random direction ``direction``."""

    sample: int
    of: str
    wrt: str | None
    output_index: list[int]
    input_index: list[int] | None
    direction: int | None
    ad: float
    fd: float
    fd_error: float
    forward_difference: float
    backward_difference: float
    abs_error: float
    rel_error: float
    allowed: float
    diagnosis: str

    @property
    def ratio(self) -> float:
        """abs_error / allowed: above 1 fails (unless a kink or fd-noise)."""
        return _ratio(self.abs_error, self.allowed)

    def to_json(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio}


@dataclass
class Adjoint:
    """A failed dot-product test <J t, c> = <t, Jᵀ c> for one sample and direction."""

    sample: int
    direction: int
    jvp: float  # <J t, c> from the JVP
    vjp: float  # <t, Jᵀ c> from the VJP
    abs_error: float
    allowed: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Leakage:
    """Output ``of``[output_index] of ``sample`` moved although only other samples moved."""

    sample: int
    of: str
    output_index: list[int]
    change: float
    threshold: float
    perturbed: list[int] | None  # the moved samples; None: perturbed copies appended to the batch

    def describe(self) -> str:
        moved = ("perturbed copies of the batch were appended to it" if self.perturbed is None
                 else f"only sample(s) {_few(self.perturbed)} moved")
        how = (f"changed by {self.change:.3g} (noise threshold {self.threshold:.3g})" if np.isfinite(self.change)
               else "changed between a finite and a non-finite value")
        return (f"cross-sample leakage: output {self.of!r}{list(self.output_index)} of sample {self.sample} {how} "
                f"when {moved}; the model mixes samples "
                "along the batch axis (batch statistics, e.g. batch norm in training mode), so per-sample Jacobians "
                "are not defined — use the model in inference mode, or `jacli compute --no-batch` for the "
                "whole-batch Jacobian")

    def to_json(self) -> dict:
        return {**self.__dict__, "message": self.describe()}


@dataclass
class SampleReport:
    index: int
    checked: int = 0
    failures: int = 0
    kinks: int = 0
    fd_noise: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    worst: Entry | None = None

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def to_json(self) -> dict:
        return {"index": self.index, "passed": self.passed, "checked": self.checked, "failures": self.failures,
                "kinks": self.kinks, "fd_noise": self.fd_noise, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "worst": None if self.worst is None else self.worst.to_json()}


@dataclass
class CheckResult:
    kind: str  # "columns" | "directions"
    tolerance: Tolerance
    directions: int | None = None
    samples: list[SampleReport] = field(default_factory=list)
    mismatches: list[Entry] = field(default_factory=list)  # failing entries, worst first, at most LISTED
    entries: list[Entry] = field(default_factory=list, repr=False)  # every compared entry, or SAMPLED drawn uniformly
    unresolved: list[Entry] = field(default_factory=list)  # kinks and fd-noise, the same way
    adjoint: list[Adjoint] = field(default_factory=list)  # failed dot-product tests
    leakage: Leakage | None = None
    notes: list[str] = field(default_factory=list)
    mode: str | None = None  # the AD exercised: "forward" (directions: JVP, and VJP by <Jt, c> = <t, Jᵀc>) or "reverse"

    @property
    def passed(self) -> bool:
        return self.leakage is None and all(s.passed for s in self.samples)

    @property
    def max_abs_error(self) -> float:
        return max((s.max_abs_error for s in self.samples), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((s.max_rel_error for s in self.samples), default=0.0)

    @property
    def worst(self) -> Entry | None:
        entries = [s.worst for s in self.samples if s.worst is not None]
        return max(entries, key=lambda e: e.ratio, default=None)

    def to_json(self) -> dict:
        worst = self.worst
        return {
            "passed": self.passed,
            "check": "fd",
            "kind": self.kind,
            "directions": self.directions,
            "mode": self.mode,
            **self.tolerance.to_json(),
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "worst": None if worst is None else worst.to_json(),
            "checked": sum(s.checked for s in self.samples),
            "failures": sum(s.failures for s in self.samples),
            "kinks": sum(s.kinks for s in self.samples),
            "fd_noise": sum(s.fd_noise for s in self.samples),
            "leakage": None if self.leakage is None else self.leakage.to_json(),
            "mismatches": [e.to_json() for e in self.mismatches],
            "unresolved": [e.to_json() for e in self.unresolved],
            "adjoint_failures": [a.to_json() for a in self.adjoint],
            "notes": list(self.notes),
            "samples": [s.to_json() for s in self.samples],
        }


def check(
    model: Model,
    plan: jac.Plan,
    rtol: float | None = None,
    atol: float | None = None,
    eps: float | None = None,
    directions: int | None = None,
    seed: int = 0,
    budget: int = jac.DEFAULT_BUDGET,
    progress=None,
    mode: str = "auto",
    notice=None,
) -> CheckResult:
    """Check ``model``'s AD against FD at ``plan.xs`` (a per-sample plan from ``jacobian.plan``).
    ``mode``: the AD exercised — "forward" (JVPs), "reverse" (VJPs: every entry from VJP
    rows, directions as <Jᵀc, t> against FD of <c, f(x + ht)>) or "auto" (every entry in
    ``plan.mode``, directions by JVP and VJP; reverse alone where the model has no forward
    mode, with a note). ``budget``: bytes of working memory, the FD forward calls included,
    and what the set-up leaves resident (a float64 copy of the model, traced graphs:
    ``fd.left``). ``progress(n)`` is called with the number of samples just finished;
    ``notice(text)``, before the work, where the finite differences of every entry are
    expected to take more than ``columns.LONG`` seconds (``--directions`` is the quicker check)."""
    if not plan.batch:
        raise InputError("the gradient check works per sample; it needs inputs and outputs with a batch axis")
    validate(rtol, atol, eps, directions)
    if mode not in ("auto", "forward", "reverse"):
        raise InputError(f"--mode must be auto, forward or reverse, not {mode!r}")
    if not model.supports_ad:
        raise _no_ad(model._no_ad())
    start = resident()
    fwd, fd_dtype, notes = fd_forward(model, plan)
    tol = tolerance(plan.dtype, fd_dtype, rtol, atol, eps)
    result = CheckResult("directions" if directions else "columns", tol, directions, notes=notes)
    result.leakage = leakage(model, plan, seed)
    if result.leakage is not None:
        return result
    if mode == "auto" and (directions or plan.mode == "forward"):
        probed = jac.reverse_if_no_forward(model, dataclasses.replace(plan, mode="forward", notes=[]))
        notes += probed.notes
        if probed.mode == "reverse":
            mode = "reverse"
    if not directions and mode in ("forward", "reverse"):
        plan = dataclasses.replace(plan, mode=mode)
    result.mode = (mode if mode != "auto" else "forward") if directions else plan.mode
    room = lambda: left(budget, start)  # noqa: E731 — the budget less what is resident since the start
    one = {k: v[:1] for k, v in plan.xs.items()}
    per_sample = forward_cost(fwd, one)  # the FD forward calls are cut to fit half the budget
    from . import columns as every_entry, directions as by_directions  # (they import this module)

    if notice is not None and not directions:  # timed on as many copies as the FD calls may hold, up to 8
        every_entry.warn_if_long(plan, fwd, one, max(1, min(8, (room() // 2) // per_sample)), notice)
    tally = _Tally(plan.samples, tol)
    try:
        if directions:
            by_directions.run(model, plan, fwd, tol, directions, seed, tally, room, progress, result.mode, per_sample)
        else:
            working = room()
            every_entry.run(model, plan, in_pieces(fwd, max(1, (working // 2) // per_sample)), tol, tally, working,
                            progress, seed)
    except UnsupportedError as e:  # FD has run once already (fd_forward, leakage): this is the VJP/JVP
        raise _no_ad(e) from None
    result.samples, result.mismatches, result.unresolved = tally.samples, tally.mismatches, tally.unresolved
    result.entries = tally.entries
    result.adjoint = tally.adjoint
    return result


# --- set-up -------------------------------------------------------------------------------
def _no_ad(e: UnsupportedError) -> UnsupportedError:
    """The backend's "no derivatives" error, said about the check (not about --method fd)."""
    option = getattr(e, "option", None)
    if "--mode reverse" in str(option) or "--mode reverse" in e.message:  # check has --mode: the advice stands
        reason = e.message.split("; use --mode reverse")[0]
        return UnsupportedError(f"cannot check gradients in forward mode: {reason}", option="--mode reverse",
                                hint="mode='reverse'")
    reason = e.message.split("; use --method fd")[0]  # FD is what check compares with, not an alternative
    return UnsupportedError(f"cannot check gradients: automatic differentiation is unavailable for this model ({reason})")


def fd_forward(model: Model, plan: jac.Plan):
    """The forward pass FD uses — float64 when the backend offers it and it agrees with the
    model — its dtype, and notes on why not float64."""
    native, dtype = forward_fn(model, plan.xs, prefer64=False)
    if not model.supports_float64:
        return native, dtype, [f"{model.backend} cannot evaluate this model in float64: finite differences run in {dtype} "
                               "with wider tolerances"]
    try:
        y64 = model.forward64(plan.xs)
    except Exception as e:  # noqa: BLE001 — any failure of the float64 path falls back to the model's dtype
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return native, dtype, [f"float64 evaluation failed ({type(e).__name__}: {why}): finite differences run in "
                               f"{dtype} with wider tolerances"]
    for o in plan.of:
        if o not in y64 or y64[o].shape != plan.ys[o].shape:
            return native, dtype, [f"the float64 evaluation has no output {o!r} of the model's shape: finite "
                                   f"differences run in {dtype} with wider tolerances"]
        y = plan.ys[o].astype(np.float64)
        gap = float(np.max(np.abs(y64[o] - y), initial=0.0))
        if not gap <= np.sqrt(np.finfo(plan.ys[o].dtype).eps) * max(float(np.max(np.abs(y), initial=0.0)), 1e-30):
            return native, dtype, [f"the float64 evaluation of output {o!r} differs from the model's by {gap:.3g}: "
                                   f"finite differences run in {dtype} with wider tolerances"]
    return model.forward64, np.dtype(np.float64), []


def leakage(model: Model, plan: jac.Plan, seed: int = 0) -> Leakage | None:
    """Does any sample's output depend on another sample's input? Perturbs (1) copies of the
    batch appended to it — what stacking perturbed copies for AD and FD does — and (2) for
    every bit of the sample index, the samples with the bit set, then those with it clear,
    so every pair (i, j) is separated once. Raises when the model is not deterministic."""
    xs, of = plan.xs, plan.of
    y0, again = plan.ys, model.forward(xs)
    noise = {}
    for o in of:
        noise[o] = float(np.max(_moved(y0[o], again[o]), initial=0.0))
        if noise[o] > 64 * np.finfo(y0[o].dtype).eps * _scale(y0[o]).max():
            raise UnsupportedError(
                f"the model is not deterministic: two forward passes at the same input differ by {noise[o]:.3g} in "
                f"output {o!r} (dropout or other randomness active?); finite differences cannot check it")
    rng = np.random.default_rng([seed, 1])
    bump = {n: (LEAK_STEP * np.maximum(np.abs(v), 1) * rng.standard_normal(v.shape)).astype(v.dtype)
            for n, v in xs.items() if v.dtype.kind == "f"}
    samples = plan.samples

    def find(ys, rows, slack, perturbed):
        worst = None
        for o in of:
            eps = np.finfo(y0[o].dtype).eps
            change = _moved(ys[o][rows], y0[o][rows]).reshape(len(rows), -1)
            limit = 2 * noise[o] + slack * eps * _scale(y0[o])[rows][:, None]
            ratio = change / limit
            if ratio.size and np.max(ratio) > 1 and (worst is None or np.max(ratio) > worst[0]):
                s, r = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
                index = [int(i) for i in np.unravel_index(r, y0[o].shape[1:])]
                worst = (float(np.max(ratio)), Leakage(int(rows[s]), o, index, float(change[s, r]), float(limit[s, 0]),
                                                      perturbed))
        return None if worst is None else worst[1]

    stacked = {n: np.concatenate([v, v + bump[n] if n in bump else v]) for n, v in xs.items()}
    found = find({o: y[:samples] for o, y in model.forward(stacked).items()}, np.arange(samples), 1 / np.sqrt(np.finfo(
        plan.dtype).eps), None)
    index = np.arange(samples)
    for bit in range(ceil(log2(samples)) if samples > 1 else 0):
        for side in (1, 0):
            if found is not None:
                return found
            moved = ((index >> bit) & 1) == side
            xp = {n: np.where(moved.reshape((-1,) + (1,) * (v.ndim - 1)), v + bump[n], v) if n in bump else v
                  for n, v in xs.items()}
            found = find(model.forward(xp), index[~moved], 64, index[moved].tolist())
    return found


def _moved(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| in float64, 0 where both hold the same non-finite value, inf where only one is finite."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return np.where(same, 0.0, np.where(np.isfinite(a) & np.isfinite(b), np.abs(a - b), np.inf))


def _scale(y: np.ndarray) -> np.ndarray:
    """Per sample: the largest finite |output| (the batch's if a sample's is 0)."""
    a = np.where(np.isfinite(y), np.abs(y.astype(np.float64)), 0).reshape(len(y), -1)
    per = a.max(axis=1, initial=0.0)
    return np.where(per > 0, per, max(float(per.max(initial=0.0)), 1e-30))


# --- comparing ----------------------------------------------------------------------------
class _Tally:
    """Judges blocks of entries and keeps per-sample statistics and the worst entries."""

    def __init__(self, samples: int, tol: Tolerance):
        self.tol = tol
        self.samples = [SampleReport(i) for i in range(samples)]
        self.mismatches: list[Entry] = []
        self.unresolved: list[Entry] = []
        self.adjoint: list[Adjoint] = []
        self._sample: list[tuple[float, Entry]] = []  # (key, entry): the SAMPLED smallest of uniform keys
        self._keys = np.random.default_rng(0)

    @property
    def entries(self) -> list[Entry]:
        """Every compared entry, or a uniform sample of SAMPLED of them (bottom-k of random keys)."""
        return [e for _, e in self._sample]

    def judge(self, ad: np.ndarray, est, tol_abs, full: bool = False):
        """The diagnosis code of every entry (and, with ``full``, |AD − FD|, the allowed
        error and which are finite)."""
        a = ad.astype(np.float64)
        d = est.value
        err = np.abs(a - d)
        band = tol_abs + self.tol.rtol * np.abs(d)
        allowed = band + est.error
        finite = np.isfinite(a) & np.isfinite(d) & np.isfinite(est.error)
        bad = ~(err <= allowed)
        gap = np.abs(est.forward - est.backward)
        one_sided = (gap > allowed) & (np.minimum(np.abs(a - est.forward), np.abs(a - est.backward)) <= 0.25 * gap)
        kink = bad & finite & ((est.excess > band) | one_sided)
        noise = bad & finite & ~kink & (est.error > band) & (err <= 4 * allowed)
        code = np.select([~bad, ~finite, kink, noise], [OK, NONFINITE, KINK, NOISE], WRONG)
        return (code, err, allowed, finite) if full else code

    def wrong(self, ad: np.ndarray, est, tol_abs) -> np.ndarray:
        """Which entries are judged wrong gradients."""
        return self.judge(ad, est, tol_abs) == WRONG

    def add(self, s0: int, of: str, wrt: str | None, ad: np.ndarray, est, tol_abs, out_shape, in_shape, k0: int = 0,
            switched=None):
        """``ad`` and the estimate's arrays (S, m, k); ``tol_abs`` broadcastable to them;
        ``in_shape`` None for directions (k is then the direction, numbered from ``k0``);
        ``switched``: wrong entries whose mismatch vanished or jumped at a nearby point
        (``rejudge``), diagnosed as kinks.
        The relative error is |AD − FD| / (|FD| + atol/rtol): at most rtol where
        |AD − FD| ≤ atol + rtol·|FD|."""
        a, d = ad.astype(np.float64), est.value
        code, err, allowed, finite = self.judge(ad, est, tol_abs, full=True)
        if switched is not None:
            code = np.where(switched & (code == WRONG), KINK, code)
        err = np.where(finite, err, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = err / (np.abs(d) + (tol_abs / self.tol.rtol if self.tol.rtol > 0 else 0.0))
        ratio = _ratio(err, allowed)
        counted = (code != KINK) & (code != NOISE)

        def entry(j, r, c):
            return Entry(
                int(s0 + j), of, wrt, _index(r, out_shape), None if in_shape is None else _index(c, in_shape),
                int(k0 + c) if in_shape is None else None, float(a[j, r, c]), float(d[j, r, c]), float(est.error[j, r, c]),
                float(est.forward[j, r, c]), float(est.backward[j, r, c]), float(err[j, r, c]),
                float(np.nan_to_num(rel[j, r, c], nan=np.inf)), float(allowed[j, r, c]), DIAGNOSES[code[j, r, c]])

        for j in range(a.shape[0]):
            rep = self.samples[s0 + j]
            rep.checked += int(code[j].size)
            rep.failures += int(np.count_nonzero(code[j] >= WRONG))
            rep.kinks += int(np.count_nonzero(code[j] == KINK))
            rep.fd_noise += int(np.count_nonzero(code[j] == NOISE))
            if counted[j].any():
                rep.max_abs_error = max(rep.max_abs_error, float(err[j][counted[j]].max()))
                rep.max_rel_error = max(rep.max_rel_error, float(np.nan_to_num(rel[j][counted[j]], nan=np.inf).max()))
                r, c = np.unravel_index(int(np.argmax(np.where(counted[j], ratio[j], -1))), ratio[j].shape)
                if rep.worst is None or ratio[j, r, c] > rep.worst.ratio:
                    rep.worst = entry(j, r, c)
        self.mismatches = _keep(self.mismatches, code >= WRONG, ratio, entry)
        self.unresolved = _keep(self.unresolved, ~counted, ratio, entry)
        keys = self._keys.random(a.shape).ravel()
        take = np.flatnonzero(keys < self._sample[-1][0]) if len(self._sample) >= SAMPLED else np.arange(keys.size)
        if take.size > SAMPLED:
            take = take[np.argpartition(keys[take], SAMPLED)[:SAMPLED]]
        self._sample += [(float(keys[f]), entry(*np.unravel_index(f, a.shape))) for f in take]
        self._sample = sorted(self._sample, key=lambda t: t[0])[:SAMPLED]  # ascending: the last key is the bar

    def add_adjoint(self, s0: int, jvp_side: np.ndarray, vjp_side: np.ndarray, scale: np.ndarray, floor: np.ndarray,
                    k0: int = 0):
        """Dot products (k, S) from both sides; ``scale``: the sums of |terms| bounding their
        rounding; ``floor``: what the AD dtype resolves of them."""
        err = np.abs(jvp_side - vjp_side)
        allowed = self.tol.rtol * scale + (floor if self.tol.atol is None else self.tol.atol)
        for k, j in zip(*np.nonzero(~(err <= allowed))):
            self.samples[s0 + j].failures += 1
            self.adjoint.append(Adjoint(int(s0 + j), int(k0 + k), float(jvp_side[k, j]), float(vjp_side[k, j]),
                                        float(err[k, j]), float(allowed[k, j])))
        self.adjoint = sorted(self.adjoint, key=lambda x: -_ratio(x.abs_error, x.allowed))[:LISTED]


def _ratio(err, allowed):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(err == 0, 0.0, np.divide(err, allowed))
    return float(r) if np.ndim(r) == 0 else r


def _keep(kept: list[Entry], mask: np.ndarray, ratio: np.ndarray, entry) -> list[Entry]:
    """The LISTED entries with the largest ratio among ``kept`` and the masked new ones."""
    where = np.nonzero(mask)
    if where[0].size > LISTED:
        top = np.argpartition(-ratio[where], LISTED)[:LISTED]
        where = tuple(w[top] for w in where)
    new = [entry(j, r, c) for j, r, c in zip(*where)]
    return sorted(kept + new, key=lambda e: -e.ratio)[:LISTED]


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(int(flat), shape)] if shape else []


def _few(items: list[int], n: int = 8) -> str:
    return ", ".join(map(str, items[:n])) + (f", … ({len(items)} in all)" if len(items) > n else "")


def _resolution(tol: Tolerance, y: np.ndarray, largest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the AD dtype resolves, per (sample, output element): derivatives are computed
    from intermediates known to eps relative to the Jacobian's largest entries (``largest``,
    per sample: the first array, with the smallest normal number) and to the output (the
    second, per unit of relative input change)."""
    info = np.finfo(tol.ad_dtype)
    return RESOLUTION * (info.eps * largest[:, None] + info.tiny), RESOLUTION * info.eps * np.abs(
        y.reshape(len(y), -1).astype(np.float64))


def _width(plan: jac.Plan) -> int:
    """Input plus output elements per sample."""
    return sum(plan.xs[i][:1].size for i in plan.xs) + sum(plan.ys[o][:1].size for o in plan.of)
