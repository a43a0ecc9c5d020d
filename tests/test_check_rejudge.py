"""Every-entry `check`: entries found wrong are judged again at nearby points
(jacli/engine/rejudge.py), as failing directions are. A ReLU whose pre-activation the
float32 model and the float64 FD function put on different sides at x, with no FD step
crossing it, is a kink, not a wrong gradient; AD and FD are recomputed there only for the
affected columns (rows in reverse mode), and nothing at all when nothing fails. The planted
bugs of the suite (tests/test_check.py, test_check_real.py, test_check_keras.py) stay
wrong gradients in every-entry mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import corpus_torch as corpus
import jacli
from conftest import run_jacli
from jacli.engine import rejudge

HIDDEN, OUT = 12, 5


class SplitUnit(torch.nn.Module):
    """A ReLU MLP (16 -> 12 + 1 -> 5) whose extra hidden unit has the pre-activation
    u = 10·(((x0 + 100) − 100) − x0) + x1. At x0 = 3e-6, x1 = 1e-5 it is 1e-5 in float64
    (the bracket is exact to 1e-14) and 1e-5 − 3e-5 < 0 in float32 (100 + 3e-6 rounds to
    100): float32 AD sees the unit off, float64 FD on, so every output's derivative in x1
    differs by that output's weight on the unit, and no FD step (6e-6) crosses u's switch.
    Elementwise operations only on the unit's path: IEEE rounding, whatever the BLAS."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(16, HIDDEN, generator=g) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(HIDDEN + 1, OUT, generator=g) / 4)
        with torch.no_grad():
            self.w2[HIDDEN] = torch.linspace(0.5, 1.0, OUT)  # the unit's weights: mismatches of 0.5..1

    def forward(self, x):
        u = 10.0 * (((x[:, :1] + 100.0) - 100.0) - x[:, :1]) + x[:, 1:2]
        return torch.relu(torch.cat([x @ self.w1, u], dim=1)) @ self.w2


class ScaledRow(torch.autograd.Function):
    """The identity whose gradient is 1.1 times too large for output 3."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        scale = torch.ones_like(g)
        scale[:, 3] = 1.1
        return g * scale


class PlantedSplit(SplitUnit):
    def forward(self, x):
        return ScaledRow.apply(super().forward(x))


def split_input(samples: int = 2) -> torch.Tensor:
    x = torch.randn(samples, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0], x[:, 1] = 3e-6, 1e-5
    return x


@pytest.fixture(scope="session")
def split(tmp_path_factory):
    """{format: loaded model} of SplitUnit (TorchScript trace, ONNX), the input (also saved
    as x.npy beside them) and {format: path}."""
    torch.set_num_threads(1)
    x = split_input()
    paths, failed = corpus.save_all(SplitUnit().eval(), x, tmp_path_factory.mktemp("split"), formats=("trace", "onnx"))
    assert not failed, failed
    np.save(paths["trace"].parent / "x.npy", x.numpy())
    return {f: jacli.load(str(p), trust=True) for f, p in paths.items()}, x.numpy(), paths


class Calls:
    """Counts a model's forward64/jvp/vjp calls and the seeds each JVP/VJP got."""

    def __init__(self, model, patch):
        self.log = []
        for name in ("forward64", "jvp", "vjp"):
            patch.setattr(model, name, self._spy(name, getattr(model, name)))

    def _spy(self, name, inner):
        def call(xs, *args, **kw):
            seeds = next(iter(args[0].values())).shape[0] if args else None
            self.log.append((name, next(iter(xs.values())).shape[0], seeds))
            return inner(xs, *args, **kw)

        return call

    def count(self, name=None):
        return sum(1 for c in self.log if name is None or c[0] == name)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("fmt", ["trace", "onnx"])
def test_float32_float64_switch_split_is_a_kink_in_every_entry_mode(split, fmt, mode):
    models, x, _ = split
    model = models[fmt]
    xs = jacli.api.as_inputs(model, x)
    name = model.output_names()[0]
    assert model.forward64(xs)[name].shape == (2, OUT)
    doc = jacli.check(model, x, mode=mode).to_json()
    assert doc["passed"] and doc["mode"] == mode and doc["fd_dtype"] == "float64", doc["mismatches"][:2]
    assert doc["failures"] == 0 and doc["kinks"] == 2 * OUT and doc["fd_noise"] == 0
    w = SplitUnit().w2.detach().numpy()[HIDDEN]
    assert {(e["sample"], e["output_index"][0], e["input_index"][0]) for e in doc["unresolved"]} == {
        (s, r, 1) for s in range(2) for r in range(OUT)}
    for e in doc["unresolved"]:
        assert e["diagnosis"] == "kink"
        assert e["fd"] - e["ad"] == pytest.approx(w[e["output_index"][0]], rel=1e-5)  # the unit on in float64 only
        # no FD step crossed the switch: the one-sided differences agree (the one-sided kink test cannot see it)
        assert e["forward_difference"] == pytest.approx(e["backward_difference"], rel=1e-6)
        assert e["abs_error"] > 100 * e["allowed"]


def test_cli_reports_the_split_as_kinks_and_passes(split):
    _, _, paths = split
    r = run_jacli("check", paths["trace"], paths["trace"].parent / "x.npy", "--fd", "--trust-model")
    assert r.code == 0 and "PASSED" in r.out and "0 wrong, 10 at kinks" in r.out, r.out + r.stderr
    assert "vanished or jumped a step 1e-4 away" in r.out and "dx[1]" in r.out and r.stderr == ""


def test_only_the_affected_columns_and_rows_are_recomputed(split, monkeypatch):
    """Forward mode: one JVP tangent (column x1) and one FD column per sample at the nearby
    point; reverse mode: one VJP cotangent per output row; the mismatch vanished there
    at the first point."""
    models, x, _ = split
    model = models["trace"]
    for mode, primitive, seeds in (("forward", "jvp", 1), ("reverse", "vjp", OUT)):
        columns = []
        with monkeypatch.context() as m:
            calls = Calls(model, m)
            inner = rejudge.estimate_columns
            m.setattr(rejudge, "estimate_columns", lambda *a, **kw: columns.append(list(a[9])) or inner(*a, **kw))
            assert jacli.check(model, x, mode=mode).passed
        again = [c for c in calls.log if c[0] == primitive and c[1] == 1]  # one sample at a time: the re-judging
        assert again == [(primitive, 1, seeds)] * 2, calls.log
        assert columns == [[1], [1]]


def test_nothing_is_rejudged_when_nothing_fails(split, monkeypatch):
    """A correct model where every entry passes: the same forward64/JVP/VJP calls as a check
    whose re-judging is switched off, and the re-judging's FD and AD never run."""
    models, x, _ = split
    model = models["trace"]
    x = x.copy()
    x[:, 0], x[:, 1] = 0.25, 0.5  # the unit far from its switch
    for mode in ("forward", "reverse"):
        with monkeypatch.context() as m:
            on = Calls(model, m)
            for name in ("again", "_fd_at", "_ad_at"):
                m.setattr(rejudge, name, lambda *a, name=name, **kw: pytest.fail(f"{name} called, nothing wrong"))
            doc = jacli.check(model, x, mode=mode).to_json()
        assert doc["passed"] and doc["kinks"] == 0 and doc["failures"] == 0
        with monkeypatch.context() as m:
            off = Calls(model, m)
            m.setattr(rejudge, "columns", lambda *a, **kw: None)
            jacli.check(model, x, mode=mode)
        assert on.count("forward64") > 0 and on.count("jvp" if mode == "forward" else "vjp") > 0
        assert on.log == off.log


def test_a_wrong_gradient_next_to_the_split_stays_wrong(split, tmp_path, monkeypatch):
    """A gradient 1.1x too large on output 3 of the same net, at the same split point: the
    split's entries are kinks (that of output 3 too: a wrong gradient at a kink is a kink),
    every other entry of output 3 that is not tiny stays a wrong gradient — its mismatch is
    the same a step away, at each of the RETRIES points — and nothing else fails."""
    torch.save(PlantedSplit().eval(), str(tmp_path / "planted.pt"))
    model = jacli.load(str(tmp_path / "planted.pt"), trust=True)
    _, x, _ = split
    points = []
    inner = rejudge.nearby
    monkeypatch.setattr(rejudge, "nearby", lambda *a: points.append(1) or inner(*a))
    for mode in ("forward", "reverse"):
        points.clear()
        r = jacli.check(model, x, mode=mode)
        assert len(points) == rejudge.RETRIES  # the wrong entries stay wrong at every point
        doc = r.to_json()
        assert not doc["passed"] and doc["checked"] == len(r.entries) == 2 * OUT * 16
        assert {(e["sample"], e["output_index"][0], e["input_index"][0]) for e in doc["unresolved"]} == {
            (s, o, 1) for s in range(2) for o in range(OUT)}
        wrong = [e for e in r.entries if e.diagnosis == "wrong-gradient"]
        assert len(wrong) == doc["failures"] and {e.output_index[0] for e in wrong} == {3}
        for s in range(2):
            row = [e for e in r.entries if e.sample == s and e.output_index == [3]]
            big = {e.input_index[0] for e in row if abs(e.fd) > 0.1 * max(abs(f.fd) for f in row)} - {1}
            assert big and big <= {e.input_index[0] for e in wrong if e.sample == s}, mode
        for e in wrong:
            assert e.ad / e.fd == pytest.approx(1.1, abs=1e-4)


def test_the_rule_a_change_beyond_the_error_bars_not_a_slide_under_the_tolerance():
    """``rejudge.again`` on made-up comparisons (FD 1 ± 1e-10, allowed error 4e-3): a
    mismatch that vanishes or jumps a step away is a switch point; one just past its
    tolerance that slides just under it, one that is nearly the same (a wrong gradient's),
    and one that is not finite there stay wrong, judged at all RETRIES points."""
    from jacli.engine.check import _Tally, tolerance
    from jacli.engine.fd import Estimate

    tally = _Tally(1, tolerance("float32", "float64"))

    def compared(mismatch):
        fd = np.ones(len(mismatch))
        return 1 + np.asarray(mismatch), Estimate(fd, np.full_like(fd, 1e-10), fd, fd, -fd), np.full_like(fd, 2e-3)

    at_x = [4.04e-3, 0.05, 0.05, 0.05, 0.05, 1e-4]  # ratios 1.01, 12.5 (x4), 0.025
    nearby = [3.96e-3, 1e-9, 0.12, np.nan, 0.0501, 1e-4]  # slid under; vanished; jumped; not finite; the same
    points = []

    def evaluate(moved, failing):
        points.append(failing.copy())
        return [compared(nearby)]

    switched = rejudge.again(tally, [compared(at_x)], evaluate, {"x": np.zeros((1, 2))}, ["x"],
                             np.random.default_rng(0), unit=lambda masks: masks[0])
    assert switched.tolist() == [False, True, True, False, False, False]
    assert [p.tolist() for p in points] == [[True] * 5 + [False]] + [[True, False, False, True, True, False]] * 2
