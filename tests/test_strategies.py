"""The strategy tuner and the engine's per-model memory (jacli/engine/strategies.py): every
map strategy gives the same Jacobian, the fastest is found, a much slower one is re-timed
rarely, JACLI_STRATEGY pins one; both modes (which --mode auto times where the shape does
not decide: tests/test_mode_choice.py) give the same Jacobian; and the thread policy
(jacli/system.py)."""
from __future__ import annotations

import gc
import time
import warnings

import numpy as np
import pytest
from conftest import SAMPLES, mlp_jacobian, run_jacli

import jacli
from jacli import system
from jacli.engine import jacobian as jac
from jacli.engine import strategies
from jacli.errors import InputError

# Strategies differ only in float rounding: float32 Jacobians agree to this, relative to
# their largest entry (and each is within 2e-5 of a float64 reference).
STRATEGY_RTOL = 1e-5


# --- the tuner, on simulated timings ------------------------------------------------------
def simulate(tuner: strategies.Tuner, cost, calls: int) -> list[str]:
    """``calls`` picks, each recorded with ``cost(strategy, how many times it has run)`` seconds."""
    used = []
    for _ in range(calls):
        s = tuner.pick()
        tuner.record(s, cost(s, used.count(s)))
        used.append(s)
    return used


def test_each_strategy_is_tried_twice_then_the_fastest_is_kept():
    used = simulate(strategies.Tuner(["slow", "fast"]), lambda s, n: 3.0 if s == "slow" else 1.0, 40)
    assert used[:4] == ["slow", "fast", "slow", "fast"]
    assert used[4:] == ["fast"] * 36  # re-timing "slow" would cost more than 1/32 of the time spent so far


def test_a_strategy_still_warming_up_is_tried_until_it_stops_getting_faster():
    # the vmapped VJP whose second run still page-faulted (29 ms), fast from its third (9 ms),
    # against k backward passes at 24 ms: two trials each would keep the slower for good
    warm = {0: 0.5, 1: 0.029}
    used = simulate(strategies.Tuner(["vectorised", "sequential"]),
                    lambda s, n: 0.024 if s == "sequential" else warm.get(n, 0.009), 40)
    assert used[:5] == ["vectorised", "sequential", "vectorised", "sequential", "vectorised"]
    assert used[5:] == ["vectorised"] * 35
    # a strategy that gets faster on every run is still tried at most WARM_TRIALS times
    used = simulate(strategies.Tuner(["a", "b"]), lambda s, n: 1.0 if s == "b" else 2.0 + 100.0 * 0.5 ** n, 12)
    assert used.count("a") == strategies.WARM_TRIALS and used[-6:] == ["b"] * 6
    # its re-timings after the trials, while it still gets faster, count against the re-timing budget
    tuner = strategies.Tuner(["a", "b"])
    used = simulate(tuner, lambda s, n: 1.0 if s == "b" else 2.0 + 100.0 * 0.5 ** n, 3000)
    retimed = sum(2.0 + 100.0 * 0.5 ** n for n in range(strategies.WARM_TRIALS, used.count("a")))
    assert tuner.retried == pytest.approx(retimed) and tuner.retried <= strategies.RETRY_SHARE * tuner.spent


def test_a_hopeless_strategy_gets_no_second_trial():
    used = simulate(strategies.Tuner(["vectorised", "sequential"]),
                    lambda s, n: 280.0 if s == "sequential" else 1.0, 100)
    assert used[:3] == ["vectorised", "sequential", "vectorised"] and used.count("sequential") == 1


def test_one_time_costs_in_the_first_call_do_not_rule_its_strategy_out():
    """The first call of a fresh process pays torch.func's imports (~2 s, then 4 ms a call);
    the 5 ms strategy tried next must not win by that."""
    tuner = strategies.Tuner(["vectorised", "sequential"])
    used = simulate(tuner, lambda s, n: (2000.0 if n == 0 else 4.0) if s == "vectorised" else 5.0, 60)
    assert used[:4] == ["vectorised", "sequential", "vectorised", "sequential"]
    assert tuner.winner() == "vectorised" and used[-30:].count("sequential") <= 1
    # the 2 s bought no re-timing: it is not time the tuner spent working (first runs are left out)
    assert used[4:40] == ["vectorised"] * 36
    assert tuner.retried <= strategies.RETRY_SHARE * tuner.spent
    # a strategy tried after the first call is judged by its first run against the others' first runs
    tuner = strategies.Tuner(["vectorised", "sequential"])
    used = simulate(tuner, lambda s, n: (2000.0 if n == 0 else 4.0) if s == "vectorised" else 200_000.0, 40)
    assert used.count("sequential") == 1 and used[2:] == ["vectorised"] * 38


def test_a_much_slower_strategy_is_re_timed_rarely_and_costs_little():
    tuner = strategies.Tuner(["vectorised", "sequential"])
    used = simulate(tuner, lambda s, n: 20.0 if s == "sequential" else 1.0, 3000)
    retrials = used[4:].count("sequential")
    assert 1 <= retrials <= 3000 * strategies.RETRY_SHARE / 20 + 1  # ~once in 640 calls
    assert used[:3] == ["vectorised", "sequential", "vectorised"] and used[3] == "vectorised"  # one trial: HOPELESS
    wasted = tuner.spent - 3000 * 1.0 - 19.0  # beyond always-fastest and the trial
    assert wasted <= strategies.RETRY_SHARE * tuner.spent
    # one only slightly slower is re-timed more often, within the same share of the time
    used = simulate(strategies.Tuner(["a", "b"]), lambda s, n: 1.2 if s == "b" else 1.0, 3000)
    assert 30 <= used[4:].count("b") <= 3000 * strategies.RETRY_SHARE / 1.2 + 1


def test_a_strategy_unlucky_in_its_trials_is_re_timed_and_then_chosen():
    """"quick" is 10x faster than "other", but load slowed its two trials down 3x past it."""
    cost = lambda s, n: (30.0 if n < 2 else 1.0) if s == "quick" else 10.0  # noqa: E731
    tuner = strategies.Tuner(["quick", "other"])
    used = simulate(tuner, cost, 300)
    assert used[4] == "other"
    first = used.index("quick", 4)
    assert first < 150 and tuner.winner() == "quick"
    assert used[first:].count("other") <= 1 + (300 - first) * strategies.RETRY_SHARE


def test_a_strategy_that_must_compile_waits_until_the_work_has_paid_for_it():
    """XLA: its first run compiles (7 s here, where the first call traced for 5 s), then it
    runs in 20 ms against 40. It is barred until the calls after the first have taken
    COMPILE_PRICE x the first call; a run shorter than that never compiles."""
    waiting = []  # whether the tuner said it was waiting to buy a compile (a benchmark waits too)

    def run(tuner, calls, new_shape_at=()):
        used, costs, compiled = [], [], False
        waiting.clear()
        for i in range(calls):
            if i in new_shape_at:
                compiled = False
            compiling = set() if compiled else {"xla"}
            shape = (2,) if new_shape_at and i >= new_shape_at[0] else (1,)
            s = tuner.pick(1.0, compiling, shape)
            first = s not in used
            cost = {"vectorised": 5.0 if first else 0.04, "sequential": 2.0 if first else 0.4}.get(s)
            if s == "xla":
                cost, compiled = (7.0 if "xla" in compiling else 0.02), True
            tuner.record(s, cost, 1.0, s in compiling, shape)
            used.append(s)
            costs.append(cost)
            waiting.append(tuner.waiting)
        return used, costs

    price = strategies.COMPILE_PRICE * 5.0
    used, _ = run(strategies.Tuner(["vectorised", "sequential", "xla"]), 100)
    assert "xla" not in used  # the 99 calls after the first took 4.4 s, less than the price
    tuner = strategies.Tuner(["vectorised", "sequential", "xla"])
    used, costs = run(tuner, 1200, new_shape_at=(600,))
    first = used.index("xla")
    assert price <= sum(costs[1:first]) < price + 0.4  # it compiled once the calls had paid its price
    assert used[first + 1] == "xla" and used[first + 2:600].count("xla") >= 0.95 * (598 - first)  # it wins
    # a new shape: the winner must compile again, so the best of the others runs until the calls
    # of that shape have cost as much as the last compile did (7 s)
    again = used.index("xla", 600)
    assert 7.0 <= sum(costs[600:again]) < 7.4
    assert used[600:again].count("vectorised") >= 0.95 * (again - 600) and used[-50:].count("xla") >= 48
    assert all(waiting[3:first]) and all(waiting[600:again]) and not any(waiting[first + 1:600] + waiting[again:])
    # a compile is never a strategy's speed, nor time that buys re-timing
    assert tuner.best["xla"] == 0.02 and tuner.spent < 0.05 * 1200


def test_a_bigger_work_re_times_each_strategy_once_there():
    """Per unit of work a bigger call is cheaper, by more for one strategy than another: at
    one sample "a" is faster, at four "b" (a batched map). Sizes within 16x share a tuner, so
    "b" is re-timed at the bigger work on its second call there and kept, not after some 40
    calls of "a"; a smaller work than either ran at re-times nothing."""
    per_unit = {("a", 1): 1.0, ("b", 1): 1.1, ("a", 4): 0.9, ("b", 4): 0.5, ("a", 2): 0.95, ("b", 2): 0.8}
    tuner, used = strategies.Tuner(["a", "b"]), []
    for work in [1] * 50 + [4] * 200:
        s = tuner.pick(work)
        tuner.record(s, per_unit[s, work] * work, work)
        used.append(s)
    assert used[10:50].count("a") >= 38  # "a" won at one sample
    assert used[50:52] == ["a", "b"] and used[52:].count("b") >= 0.97 * 198
    assert tuner.at["b", 4] == 0.5 and tuner.largest == {"a": 4, "b": 4}
    before = dict(tuner.runs)
    assert tuner.resized(2) is None and tuner.pick(2) == "b"  # 2 < RESIZED x 4: nothing re-timed
    assert tuner.runs == before

    # XLA, which must compile for the new shape: the tuner says it waits (a benchmark waits
    # too) until the calls at four samples have paid for the compile, then it wins there
    tuner, used, waiting, compiled = strategies.Tuner(["plain", "xla"]), [], [], set()
    cost = {("plain", 1): 0.0144, ("xla", 1): 0.0142, ("plain", 4): 0.049, ("xla", 4): 0.033}
    for i, work in enumerate([1] * 1500 + [4] * 400):
        compiling = set() if work in compiled else {"xla"}
        s = tuner.pick(work, compiling, (work,))
        seconds = 5.0 if i == 0 else 7.0 if s in compiling else cost[s, work]
        tuner.record(s, seconds, work, s in compiling, (work,))
        compiled |= {work} if s == "xla" else set()
        used.append(s)
        waiting.append(tuner.waiting)
    assert 4 in compiled and used[-100:].count("xla") >= 97
    at_four = used.index("xla", 1500)
    assert all(waiting[1500:at_four]) and not any(waiting[at_four + 2:])


def test_a_strategy_re_timed_at_a_bigger_work_gets_two_runs_there(monkeypatch):
    """Keras' MobileNetV3Small, 2 threads: XLA's first run at four samples after compiling for
    them took 46 ms, its later ones 25, against the plain map's best of 400 runs, 45 ms. One
    run there lost for good (the share for re-timing losers had been spent at one sample:
    none left here); with TRIALS runs the second decides, and XLA wins."""
    monkeypatch.setattr(strategies, "RETRY_SHARE", 0.0)
    tuner, used, compiled = strategies.Tuner(["plain", "xla"]), [], set()
    runs_at_four = 0
    for i, work in enumerate([1] * 1500 + [4] * 800):
        compiling = set() if work in compiled else {"xla"}
        s = tuner.pick(work, compiling, (work,))
        if s == "xla" and work == 4 and s not in compiling:
            runs_at_four += 1
        seconds = (5.0 if i == 0 else 7.0 if s in compiling else
                   {("plain", 1): 0.0144, ("xla", 1): 0.0142, ("plain", 4): 0.045}.get((s, work))
                   or (0.046 if runs_at_four == 1 else 0.025))
        tuner.record(s, seconds, work, s in compiling, (work,))
        compiled |= {work} if s == "xla" else set()
        used.append(s)
    after = used.index("xla", 1500) + 1  # the compile for four samples, then its two runs there
    assert used[after:after + 2] == ["xla", "xla"] and used[-100:].count("xla") >= 97
    assert tuner.at["xla", 4] == 0.025 / 4 and not any(tuner.due.values())


def test_re_timing_at_a_bigger_work_goes_on_while_it_gets_faster_there(monkeypatch):
    """Two runs at the new work, and one more after each that was WARMING times faster than
    the best before it there (up to WARM_TRIALS): 50, 30, 25 ms, then none."""
    monkeypatch.setattr(strategies, "RETRY_SHARE", 0.0)
    tuner = strategies.Tuner(["a", "b"])
    for _ in range(40):
        s = tuner.pick(1.0)
        tuner.record(s, 0.010 if s == "a" else 0.012, 1.0)
    slow = iter([0.050, 0.030, 0.025] + [0.024] * 40)
    used = []
    for _ in range(40):
        s = tuner.pick(4.0)
        tuner.record(s, 4 * 0.0095 if s == "a" else next(slow), 4.0)
        used.append(s)
    assert used[:4] == ["a", "b", "b", "b"] and "a" not in used[4:]  # then the winner there
    assert tuner.redone["b", 4.0] == 3  # (0.025 > 0.8 x 0.030: no fourth re-timing)
    assert tuner.at["b", 4.0] == 0.024 / 4 and tuner.winner(work=4.0) == "b"


# --- through the engine: choice, pinning, memory --------------------------------------------
class TwoWays(jacli.model.Model):
    """y = 2x on (B, 3), with two exact map strategies for its VJP, one slow."""

    def __init__(self):
        super().__init__(path="-", format="test", backend="numpy",
                         inputs=[jacli.model.TensorSpec("x", (None, 3), "float32")],
                         outputs=[jacli.model.TensorSpec("y", (None, 3), "float32")])
        self.used = []

    def _forward(self, xs):
        return {"y": 2 * xs["x"]}

    def _vjp(self, xs, cts, wrt):
        return {"x": 2 * cts["y"]}

    def _jvp(self, xs, ts, of):
        return {"y": 2 * ts["x"]}

    def _map_strategies(self, prim):
        return ("slow", "fast") if prim == self._vjp else ()

    def _vjp_jvp_map(self, prim, xs, seeds, names, strategy=""):
        self.used.append(strategy)
        time.sleep(0.006 if strategy == "slow" else 0.001)  # slower; the first call's, so tried twice all the same
        return {"x": 2 * seeds["y"]}


def test_the_engine_finds_the_faster_strategy_and_keeps_its_memory_beside_the_model(monkeypatch):
    monkeypatch.delenv(strategies.PIN, raising=False)
    model, x = TwoWays(), np.ones((4, 3), np.float32)
    for _ in range(10):  # reverse mode throughout (3 x 3: auto would also time forward mode, test_mode_choice)
        np.testing.assert_array_equal(jacli.jacobian(model, x, mode="reverse"), np.broadcast_to(2 * np.eye(3), (4, 3, 3)))
    assert model.used == ["slow", "fast", "slow", "fast"] + ["fast"] * 6
    assert not {"_plans", "_strategy_times"} & set(vars(model))  # nothing of the engine's on the model
    memo = strategies.memo(model)
    assert memo.plans and [t.winner() for t in memo.tuners.values()] == ["fast"] and not memo.modes
    key = id(model)
    del model, memo
    gc.collect()
    assert key not in strategies._MEMOS


def test_jacli_strategy_pins_the_choice(monkeypatch):
    model, x = TwoWays(), np.ones((4, 3), np.float32)
    monkeypatch.setenv(strategies.PIN, "slow")
    for _ in range(3):
        jacli.jacobian(model, x)
    assert model.used == ["slow"] * 3
    monkeypatch.setenv(strategies.PIN, "fastest")
    with pytest.raises(InputError, match="JACLI_STRATEGY='fastest'.*slow, fast"):
        jacli.jacobian(model, x)
    r = run_jacli("compute", SAMPLES / "mlp.pt", SAMPLES / "mlp_input.npy", "-q")
    assert r.code == 2 and r.stderr.startswith("Error: JACLI_STRATEGY='fastest'") and "vectorised, sequential" in r.stderr


def test_svd_and_check_directions_take_the_engines_choice(monkeypatch):
    """Matrix-free svd (LinearMap) and check --directions map their VJPs through the tuner
    too: pinned, only that strategy runs (not the model's first); unpinned, both are tried."""
    from jacli.engine import spectral

    model = TwoWays()
    plan = jac.plan(model, {"x": np.ones((4, 3), np.float32)})
    monkeypatch.setenv(strategies.PIN, "fast")
    np.testing.assert_allclose(spectral.svd(model, plan, k=2, solver="matrix-free").singular_values, 2, rtol=1e-5)
    assert jacli.check(model, plan.xs["x"], directions=3, mode="reverse").passed
    assert len(model.used) >= 2 and set(model.used) == {"fast"}
    monkeypatch.delenv(strategies.PIN)
    model.used.clear()
    spectral.svd(model, plan, k=2, solver="matrix-free")
    assert {"slow", "fast"} <= set(model.used) and strategies.memo(model).tuners


# --- every strategy, the same Jacobian, on real architectures --------------------------------
@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """Traced TorchScript files of a Conv1d-GELU-Conv1d-Tanh net and an LSTM, with their
    eager modules in float64 (the reference)."""
    import torch

    torch.manual_seed(0)

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 6, 3, padding=1), torch.nn.GELU(), torch.nn.Conv1d(6, 2, 3, padding=1),
                               torch.nn.Tanh())
    out = {}
    for name, net, shape in (("conv1d", conv, (3, 5)), ("lstm", Recurrent(), (5, 3))):
        net.eval()
        path = tmp_path_factory.mktemp("strategies") / f"{name}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LSTM's shape checks, traced as constants
            torch.jit.trace(net, torch.zeros(2, *shape)).save(str(path))
        net64 = net.double()
        reference = lambda x, net64=net64: np.stack([  # noqa: E731  per sample, float64 autograd
            torch.autograd.functional.jacobian(lambda v: net64(v[None])[0], torch.from_numpy(v)).numpy()
            for v in x.astype(np.float64)])
        out[name] = (path, shape, reference)
    return out


def every_strategy(model, kind, x, monkeypatch, **kw):
    """The Jacobian with each of the model's strategies for ``kind`` pinned in turn, and
    unpinned ("default")."""
    mode = "reverse" if kind == "vjp" else "forward"
    plan = jacli.api.plan(model, x, mode=mode, batch=kw.get("batch", True))
    seeds = {n: np.zeros((2,) + v.shape, np.float32) for n, v in (plan.ys if kind == "vjp" else plan.xs).items()}
    results = {"default": jacli.jacobian(model, x, mode=mode, **kw)}
    for s in model.strategies(kind, plan.xs, seeds):
        monkeypatch.setenv(strategies.PIN, s)
        results[s] = jacli.jacobian(model, x, mode=mode, **kw)
    monkeypatch.delenv(strategies.PIN, raising=False)
    return results


# VJP: vmap over one plain backward pass (over torch.func's pullback for the LSTM, whose
# mkldnn backward has no batching rule), k backward passes; JVP: torch.func's vmap over the
# pushforward, except for the LSTM, whose CPU kernel has no forward-mode rule (its JVPs fold
# into the batch and take the double-VJP route)
@pytest.mark.parametrize("name, forward, functorch", [("conv1d", ["vectorised"], False), ("lstm", [], True)])
def test_every_torch_strategy_gives_the_same_jacobian(torch_models, name, forward, functorch, monkeypatch):
    path, shape, reference = torch_models[name]
    model = jacli.load(path)
    x = np.random.default_rng(3).standard_normal((4, *shape)).astype(np.float32)
    want = reference(x)
    scale = np.abs(want).max()
    for kind, expected in (("vjp", ["vectorised", "sequential"]), ("jvp", forward)):
        got = every_strategy(model, kind, x, monkeypatch)
        assert list(got) == ["default", *expected]
        for s, J in got.items():
            np.testing.assert_allclose(J, want, atol=2e-5 * scale, err_msg=f"{kind} {s}")
            np.testing.assert_allclose(J, got["default"], atol=STRATEGY_RTOL * scale, err_msg=f"{kind} {s}")
    assert getattr(model, "_functorch_vjp", False) is functorch  # which vectorised VJP was checked
    whole = every_strategy(model, "vjp", x[:2], monkeypatch, batch=False)  # cross-sample: zero off the diagonal
    assert list(whole) == ["default", "vectorised", "sequential"]
    for s, J in whole.items():
        blocks = np.stack([J[b, :, :, b] for b in range(2)])  # (2, *out) x (2, *in), per-sample shapes of rank 2
        np.testing.assert_allclose(blocks, want[:2], atol=2e-5 * scale, err_msg=s)
        np.testing.assert_allclose(J, whole["default"], atol=STRATEGY_RTOL * scale, err_msg=s)


def test_both_modes_and_the_tuned_auto_mode_give_the_same_jacobian(torch_models, tmp_path, monkeypatch):
    """Rows == columns (2x5 by 3x5 is 10 x 15, within MODE_SPAN): auto times both modes;
    whichever it runs, traced and as ONNX, the Jacobian is the same within STRATEGY_RTOL."""
    import torch

    monkeypatch.delenv(strategies.PIN, raising=False)
    path, shape, reference = torch_models["conv1d"]
    onnx_path = tmp_path / "conv1d.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.load(str(path)), (torch.zeros(2, *shape),), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    x = np.random.default_rng(5).standard_normal((4, *shape)).astype(np.float32)
    want = reference(x)
    scale = np.abs(want).max()
    for file in (path, onnx_path):
        model = jacli.load(str(file))
        got = {m: jacli.jacobian(model, x, mode=m) for m in ("reverse", "forward")}
        for _ in range(12):  # the tuner's trials: reverse (the shape's mode) twice (after the strategy
            got[f"auto {jacli.api.plan(model, x).mode}"] = jacli.jacobian(model, x)  # tuner's), then forward
            if "auto forward" in got:
                break
        assert {"auto reverse", "auto forward"} <= set(got), file
        for m, J in got.items():
            np.testing.assert_allclose(J, want, atol=2e-5 * scale, err_msg=f"{file.suffix} {m}")
            np.testing.assert_allclose(J, got["reverse"], atol=STRATEGY_RTOL * scale, err_msg=f"{file.suffix} {m}")


@pytest.mark.parametrize("file", ["mlp.keras", "mlp_savedmodel"])
def test_every_tensorflow_strategy_gives_the_same_jacobian(weights, monkeypatch, file):
    model = jacli.load(str(SAMPLES / file))
    x = np.random.default_rng(4).standard_normal((5, 500)).astype(np.float32)
    want = mlp_jacobian(weights, x)
    got = every_strategy(model, "vjp", x, monkeypatch)
    assert list(got) == ["default", "vectorised", "sequential", "xla"]
    assert model._compiled and not model._unmappable  # XLA compiled it (a failure would fall back unseen)
    for s, J in got.items():
        np.testing.assert_allclose(J, want, atol=2e-5 * np.abs(want).max(), err_msg=s)
        np.testing.assert_allclose(J, got["default"], atol=STRATEGY_RTOL * np.abs(want).max(), err_msg=s)


def test_plans_are_cached_per_model_in_the_engine():
    model = jacli.load(str(SAMPLES / "mlp.pt"))
    x = np.zeros((3, 500), np.float32)
    jac.plan(model, jacli.api.as_inputs(model, x))  # confirms the signature
    jac.plan(model, jacli.api.as_inputs(model, x))
    assert len(strategies.memo(model).plans) == 1 and strategies.memo(jacli.load(str(SAMPLES / "mlp.pt"))).plans == {}


# --- the thread policy --------------------------------------------------------------------
def cgroup(tmp_path, v2=None, v1=None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return str(tmp_path)


def test_threads_follow_the_cpu_quota_the_affinity_and_jacli_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(system.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert system.thread_count({}, cgroup(tmp_path / "none")) == 8  # no cgroup files: the affinity mask
    (tmp_path / "a").mkdir()
    assert system.thread_count({}, cgroup(tmp_path / "a", v2="150000 100000\n")) == 2  # 1.5 CPUs, rounded up
    (tmp_path / "b").mkdir()
    assert system.thread_count({}, cgroup(tmp_path / "b", v2="max 100000\n")) == 8  # no limit
    (tmp_path / "c").mkdir()
    assert system.thread_count({}, cgroup(tmp_path / "c", v2="3200000 100000\n")) == 8  # more than we may run on
    (tmp_path / "d").mkdir()
    assert system.thread_count({}, cgroup(tmp_path / "d", v1=("300000", "100000"))) == 3  # cgroup v1
    (tmp_path / "e").mkdir()
    assert system.thread_count({}, cgroup(tmp_path / "e", v1=("-1", "100000"))) == 8  # v1 without a limit
    assert system.thread_count({"JACLI_THREADS": "12"}, str(tmp_path / "a")) == 12  # the override wins
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="JACLI_THREADS"):
            system.thread_count({"JACLI_THREADS": bad})


def test_each_backend_takes_the_thread_count(monkeypatch):
    import torch

    from jacli.backends import _common

    saved = torch.get_num_threads()
    try:
        monkeypatch.setenv("JACLI_THREADS", "1")
        _common._torch_threads(torch)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("JACLI_THREADS")
        _common._torch_threads(torch)  # the policy only lowers what the caller chose
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    monkeypatch.setenv("JACLI_THREADS", "3")
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    assert model.session.get_session_options().intra_op_num_threads == 3
    monkeypatch.setenv("JACLI_THREADS", "many")
    r = run_jacli("compute", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "-q")
    assert r.code == 2 and r.stderr.startswith("Error: JACLI_THREADS='many': set a positive number")


def test_torch_loads_with_sleeping_openmp_threads_unless_the_caller_chose():
    """OMP_WAIT_POLICY is read once, when torch loads libgomp: jacli sets PASSIVE before its
    first import of torch, and keeps a value the caller set."""
    import os
    import subprocess
    import sys

    probe = ("import os, jacli; jacli.load({path!r}); import torch; "
             "print(os.environ.get('OMP_WAIT_POLICY'))")
    path = str(SAMPLES / "mlp.pt")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", probe.format(path=path)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[-1] == want
