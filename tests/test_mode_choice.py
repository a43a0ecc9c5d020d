"""--mode auto where the shape does not decide (jacli/engine/strategies.py ``modes``): with
rows and columns within MODE_SPAN, each mode is timed on the model's Jacobians and the faster
kept; an explicit mode, JACLI_STRATEGY and lopsided shapes keep the shape's rule. Timings are
injected (a fake clock the model advances), never measured."""
from __future__ import annotations

import numpy as np
import pytest

import jacli
import jacli.api
from jacli.engine import jacobian as jac
from jacli.engine import strategies
from jacli.errors import InputError, UnsupportedError
from jacli.model import Model, TensorSpec

A = np.arange(1.0, 17.0, dtype=np.float32).reshape(4, 4) / 10  # y = x A^T: J = A for every sample


class Clock:
    """Stands in for time.perf_counter in the engine: only the model moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costly(Model):
    """y = x A^T (m == n == 4, m = ``rows``, or m = 3 n with ``wide``) whose VJPs and JVPs cost what
    ``cost`` says (seconds per call, on the fake clock); records the mode of each call."""

    def __init__(self, clock: Clock, cost: dict, wide: bool = False, no_forward: str = "", rows: int = 4):
        rows = 12 if wide else rows
        super().__init__(path="-", format="test", backend="numpy",
                         inputs=[TensorSpec("x", (None, 4), "float32")],
                         outputs=[TensorSpec("y", (None, rows), "float32")])
        self.A = np.tile(A, (3, 1))[:rows]
        self.clock, self.cost, self.no_forward, self.used = clock, cost, no_forward, []

    def _forward(self, xs):
        return {"y": xs["x"] @ self.A.T}

    def _vjp(self, xs, cts, wrt):
        self.used.append("reverse")
        self.clock.now += self.cost["reverse"]
        return {"x": cts["y"] @ self.A}

    def _jvp(self, xs, ts, of):
        if self.no_forward == "always" or (self.no_forward == "batched" and len(xs["x"]) > 1):
            raise UnsupportedError("operator Foo has no forward-mode rule; use --mode reverse")
        if self.no_forward == "folded" and len(xs["x"]) > 5:  # k x B rows: a .pt2 file's batch bound
            raise InputError("the model rejected the input: Guard failed: x.size()[0] <= 5")
        self.used.append("forward")
        self.clock.now += self.cost["forward"]
        return {"y": ts["x"] @ self.A.T}


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.delenv(strategies.PIN, raising=False)
    c = Clock()
    monkeypatch.setattr(jac.time, "perf_counter", c)
    return c


X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


def modes_used(model: Costly, calls: int, **kw) -> list[str]:
    """The mode of each of ``calls`` Jacobians (each one backend call: 4 rows or columns),
    every one checked against A."""
    used = []
    for _ in range(calls):
        model.used.clear()
        J = jacli.jacobian(model, X, **kw)
        np.testing.assert_allclose(J, np.broadcast_to(model.A, (5, *model.A.shape)), rtol=1e-6)
        used.append(set(model.used).pop())
    return used


def test_the_measured_faster_mode_is_kept_where_rows_equal_columns(clock):
    # forward mode faster: the shape's mode (reverse, rows <= columns) warms up and is timed, then forward
    used = modes_used(Costly(clock, {"reverse": 0.040, "forward": 0.030}), 20)
    assert used[:4] == ["reverse", "reverse", "forward", "forward"] and used[4:] == ["forward"] * 16
    # reverse mode faster: forward is tried (twice) and not taken again within the re-timing share
    model = Costly(clock, {"reverse": 0.030, "forward": 0.060})
    used = modes_used(model, 40)
    assert used[:4] == ["reverse", "reverse", "forward", "forward"] and used[4:] == ["reverse"] * 36
    (tuner,) = strategies.memo(model).modes.values()
    assert tuner.winner() == "reverse" and tuner.best == {"reverse": pytest.approx(0.030 / 5),
                                                          "forward": pytest.approx(0.060 / 5)}


def test_a_slow_warm_up_run_does_not_rule_a_mode_out():
    """A mode's first run may build a derivative graph (ONNX) or trace: 100x slower once
    (a strategy tuner would give it no second trial: HOPELESS)."""
    tuner = strategies.Tuner(("reverse", "forward"), warmup=True)
    used = []
    for _ in range(10):
        s = tuner.pick()
        first = s not in used
        tuner.record(s, (3.0 if first else 0.03) if s == "forward" else 0.04)
        used.append(s)
    assert used[:4] == ["reverse", "reverse", "forward", "forward"] and tuner.best["forward"] == 0.03
    assert tuner.winner() == "forward" and used[4:].count("forward") >= 4  # reverse re-timed in 1/32 of 3.1 s at most


def test_an_explicit_mode_is_never_overridden(clock):
    model = Costly(clock, {"reverse": 0.040, "forward": 0.001})
    assert modes_used(model, 6, mode="reverse") == ["reverse"] * 6
    model = Costly(clock, {"reverse": 0.001, "forward": 0.040})
    assert modes_used(model, 6, mode="forward") == ["forward"] * 6
    assert not strategies.memo(model).modes


def test_jacli_strategy_pins_the_shapes_choice(clock, monkeypatch):
    monkeypatch.setenv(strategies.PIN, "vectorised")  # this model has no map strategies: any name pins
    runs = [modes_used(Costly(clock, {"reverse": 0.040, "forward": 0.001}), 6) for _ in range(2)]
    assert runs == [["reverse"] * 6] * 2


def test_shapes_beyond_the_span_decide_alone(clock):
    model = Costly(clock, {"reverse": 0.040, "forward": 0.001}, wide=True)  # 12 rows x 4 columns: 3 > MODE_SPAN
    assert modes_used(model, 6) == ["forward"] * 6 and not strategies.memo(model).modes
    model = Costly(clock, {"reverse": 0.001, "forward": 0.040}, wide=True)
    assert modes_used(model, 6, mode="reverse") == ["reverse"] * 6


def test_a_mode_the_model_lacks_is_dropped_without_a_note(clock):
    # the one-sample probe of api.plan finds it
    model = Costly(clock, {"reverse": 0.040, "forward": 0.001}, no_forward="always")
    assert modes_used(model, 8) == ["reverse"] * 8
    assert not jacli.api.plan(model, X).notes
    (tuner,) = strategies.memo(model).modes.values()
    assert tuner.winner() == "reverse" and tuner.pick() == "reverse"
    # forward mode is the shape's (6 rows, 4 columns): the first plan says it is unavailable, once
    model = Costly(clock, {"reverse": 0.040, "forward": 0.001}, no_forward="always", rows=6)
    notes = [jacli.api.plan(model, X).notes for _ in range(3)]
    assert len(notes[0]) == 1 and "forward mode is unavailable" in notes[0][0] and notes[1:] == [[], []]
    assert modes_used(model, 4) == ["reverse"] * 4
    # the probe passes, the whole batch fails (no forward rule, or the folded batch too big for
    # the model): the run starts again in the shape's mode
    for lacks in ("batched", "folded"):
        model = Costly(clock, {"reverse": 0.040, "forward": 0.001}, no_forward=lacks)
        for _ in range(5):
            plan = jac.plan(model, {"x": X}, tune=True)
            sink = jac.ArraySink(plan)
            jac.run(model, plan, sink)
            np.testing.assert_allclose(sink.arrays["dy/dx"], np.broadcast_to(A, (5, 4, 4)), rtol=1e-6)
        (tuner,) = strategies.memo(model).modes.values()
        assert plan.mode == "reverse" and tuner.runs["forward"] == strategies.WARM_TRIALS and tuner.pick() == "reverse"
    # an explicit forward mode still fails as it did
    with pytest.raises(InputError, match="Guard failed"):
        jacli.jacobian(model, X, mode="forward")


class Mapped(Costly):
    """Costly with two map strategies for its VJP ("slow" 5x the other): the mode tuner must
    not time reverse mode by the strategy tuner's trials of "slow"."""

    def _map_strategies(self, prim):
        return ("slow", "fast") if prim == self._vjp else ()

    def _vjp_jvp_map(self, prim, xs, seeds, names, strategy=""):
        self.used.append("reverse")
        self.clock.now += self.cost["reverse"] * (5 if strategy == "slow" else 1)
        return {"x": seeds["y"] @ self.A}


def test_the_strategy_tuners_trials_do_not_time_a_mode(clock):
    model = Mapped(clock, {"reverse": 0.020, "forward": 0.030})
    used = modes_used(model, 12)
    # 4 strategy trials (the first a warm-up of reverse mode), two timed reverse runs (the first
    # 5x faster than the warm-up: still warming up, strategies.WARMING), forward twice
    assert used[:8] == ["reverse"] * 6 + ["forward"] * 2 and used[8:] == ["reverse"] * 4
    (tuner,) = strategies.memo(model).modes.values()
    assert tuner.best["reverse"] == pytest.approx(0.020 / 5)  # not the "slow" strategy's 0.1 s


@pytest.mark.parametrize("what", ["compute", "svd", "det"])
@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_a_file_records_the_mode_that_ran_when_the_trial_mode_failed(clock, tmp_path, what, suffix):
    """Forward mode on trial passes the one-sample probe, then fails on the batch: the
    numbers come from reverse mode, run again from the start, and the file says so (its
    metadata was written before the run, in the trial's mode)."""
    import json

    import h5py

    model = Costly(clock, {"reverse": 0.040, "forward": 0.001}, no_forward="batched")
    model.sha256 = "0" * 64  # (no file behind it)
    model.A = A + np.eye(4, dtype=np.float32)  # invertible, for det
    J = model.A.astype(np.float64)
    for _ in range(2):  # the shape's mode, reverse, warms up and is timed: forward comes next, on trial
        jacli.jacobian(model, X)
    plan = jacli.api.plan(model, X)
    assert plan.mode == "forward" and plan.modes is not None
    out = tmp_path / f"out{suffix}"
    run = {"compute": jacli.api.compute, "svd": jacli.api.svd, "det": jacli.api.det}[what]
    result = run(model, plan, output=str(out))
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            meta = dict(f.attrs)
            numbers = f["dy/dx"][()] if what == "compute" else f["singular_values" if what == "svd" else "det"][()]
    else:
        with np.load(out) as f:
            meta = json.loads(f["jacli_meta"].item())
            numbers = f["dy/dx" if what == "compute" else "singular_values" if what == "svd" else "det"]
    assert meta["mode"] == "reverse" and model.used[-1] == "reverse"
    assert (result.plan.mode if what == "compute" else result.mode) == "reverse"
    expected = {"compute": np.broadcast_to(J, (5, 4, 4)), "svd": np.broadcast_to(np.linalg.svd(J, compute_uv=False), (5, 4)),
                "det": np.full(5, np.linalg.det(J))}[what]
    np.testing.assert_allclose(numbers, expected, rtol=1e-5)
