"""--plot: what is drawn (read back from the PNG/SVG), streamed without holding J, and the
error paths (missing extra, unwritable path, atomic writes)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import tracemalloc
import xml.etree.ElementTree as ET

import numpy as np
import plot_models as pm  # sample_models/, on the path via conftest
import pytest
from conftest import ROOT, SAMPLES, imported, map2d_jacobian, run_jacli
from matplotlib import colormaps  # the extra jacli[plot], part of jacli[test]
from matplotlib.image import imread

import jacli
from jacli import api
from jacli.render import plots
from jacli.render.plot_sink import PlotSink, _edges, input_layout

VIRIDIS = colormaps["viridis"]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The plot models (TorchScript) and their inputs."""
    import torch

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("plot_models")
    rng = np.random.default_rng(0)
    paths = {"spot": pm.build("spot", d / "spot.pt"), "spot_hwc": pm.build("spot", d / "spot_hwc.pt", channels_last=True),
             "field": pm.build("field", d / "field.pt", size=32), "causal": pm.build("causal", d / "causal.pt"),
             "flawed": pm.build("flawed", d / "flawed.pt")}
    inputs = {"spot": rng.standard_normal((2, 3, 8, 8)), "field": rng.standard_normal((2, 3, 32, 32)),
              "causal": 0.3 * rng.standard_normal((2, 12, 3)), "flawed": rng.standard_normal((3, 4))}
    inputs["flawed"][0] = pm.at_switch(inputs["flawed"][0].astype(np.float32))
    inputs["spot_hwc"] = inputs["spot"].transpose(0, 2, 3, 1)
    for name, x in inputs.items():
        np.save(d / f"{name}.npy", x.astype(np.float32))
        paths[f"{name}_input"] = d / f"{name}.npy"
    return paths


def draw(plot_list, suffix=".png", together=True):
    """Render in-process: the pictures (with their panels) and the encoded bytes of the first."""
    pics = plots.pictures(plot_list, together=together)
    return pics, [p.encode(suffix) for p in pics]


def read_png(tmp_path, data: bytes, name="p.png") -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return imread(path)[:, :, :3]


def non_blank(img: np.ndarray) -> None:
    assert img.std() > 0.05 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def crop(img, panel):
    left, top, right, bottom = (int(round(v)) for v in panel.box)
    return img[top + 2 : bottom - 2, left + 2 : right - 2]


def cell_colour(img, panel, row, col, rows, cols):
    """The colour at the centre of cell (row, col) of an image panel's rows x cols array."""
    left, top, right, bottom = panel.box
    x = left + (col + 0.5) * (right - left) / cols
    y = top + (row + 0.5) * (bottom - top) / rows
    return img[int(y), int(x)]


def hottest_cell(img, panel, rows, cols):
    """Where, in a viridis panel, the pixels of the colour map's top colour are: the
    (row, col) cells they fall in."""
    left, top, right, bottom = panel.box
    near = np.linalg.norm(crop(img, panel) - np.array(VIRIDIS(1.0)[:3]), axis=2) < 0.08
    ys, xs = np.nonzero(near)
    assert ys.size, "no pixel of the hottest colour"
    y0, x0 = int(round(top)) + 2, int(round(left)) + 2  # where the crop starts
    return {(int((y0 + y + 0.5 - top) * rows / (bottom - top)), int((x0 + x + 0.5 - left) * cols / (right - left)))
            for y, x in zip(ys, xs)}


def svg_marks(svg: bytes, gid: str) -> int:
    """Markers drawn in the SVG group of id ``gid`` (matplotlib writes one <use> each)."""
    root = ET.fromstring(svg)
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        if g.get("id") == gid:
            return sum(1 for e in g.iter() if e.tag.endswith("use"))
    return 0


def stream(model, x, samples=3, budget=None, **kw):
    """A PlotSink fed by api.compute (no file), as the CLI does."""
    plan = api.plan(model, x)
    sink = PlotSink(plan, samples, **kw)
    api.compute(model, plan, None, max_memory=budget, tap=sink.wrap, heat=False)
    return plan, sink


# --- compute: heatmaps -----------------------------------------------------------------------
def test_map2d_heatmap_draws_each_entry_in_its_cell(tmp_path):
    """J = [[2x, -2y], [2y, 2x]]: every cell of the drawn heatmap has the colour of its |J|."""
    model = jacli.load(str(SAMPLES / "map2d.onnx"))
    x = np.load(SAMPLES / "map2d_input.npy")
    plan, sink = stream(model, x)
    (pic,), (png,) = draw(plots.compute_plots(sink.ordered(), plan.xs, {}, plan.batch))
    img = read_png(tmp_path, png)
    assert img.shape[:2] == pic.pixels[::-1] == (round(100 * (0.4 + 2.7 * 3)), round(100 * 3.8))
    non_blank(img)
    ref = np.abs(map2d_jacobian(x))
    panels = [p for p in pic.panels if p.kind == "heatmap"]
    assert [p.data["sample"] for p in panels] == [0, 1, 2]
    for p in panels:
        J = ref[p.data["sample"]]
        np.testing.assert_allclose(p.data["values"], J, rtol=1e-6)
        top = J.max() or 1.0
        for r in range(2):
            for c in range(2):
                np.testing.assert_allclose(cell_colour(img, p, r, c, 2, 2), VIRIDIS(J[r, c] / top)[:3], atol=0.02)
        if J.max() > J.min():  # in greyscale, larger |J| is lighter
            grey = [cell_colour(img, p, r, c, 2, 2) @ [0.299, 0.587, 0.114] for r, c in np.ndindex(2, 2)]
            assert np.argmax(grey) == np.argmax(J) and np.argmin(grey) == np.argmin(J)


@pytest.mark.parametrize("name,inputs,pairs", [("mlp", "mlp_input.npy", 1), ("multi", "multi_input.npz", 4)])
def test_cli_heatmaps_of_the_sample_models(tmp_path, name, inputs, pairs):
    out = tmp_path / f"{name}.png"
    r = run_jacli("compute", SAMPLES / f"{name}.onnx", SAMPLES / inputs, "--plot", out, "--plot-samples", "2", "-q")
    assert r.code == 0 and r.stderr == "" and r.stdout == b""
    img = imread(out)
    assert img.shape[:2] == (round(100 * (0.4 + 2.7 * 2)), round(100 * 3.8 * pairs))
    non_blank(img[:, :, :3])


def test_pooled_heatmap_is_the_max_over_each_cell(tmp_path):
    """mlp: 10 x 500 per sample, pooled to 10 x 256 cells, each the max of its |J| entries."""
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    x = np.load(SAMPLES / "mlp_input.npy")
    _, sink = stream(model, x, samples=2)
    J = np.abs(jacli.jacobian(model, x))
    cols = _edges(500, 256)
    for s in range(2):
        v = sink.views["dprobs/dx", s]
        assert v.pooled and v.heat.values.shape == (10, 256)
        expected = np.stack([J[s][:, a:b].max(axis=1) for a, b in zip(cols[:-1], cols[1:])], axis=1)
        np.testing.assert_allclose(v.heat.values, expected, rtol=1e-6)


def test_at_most_max_pairs_are_drawn_and_every_block_is_passed_on(tmp_path):
    from types import SimpleNamespace

    from jacli.engine.jacobian import Pair
    from jacli.render.plot_sink import MAX_PAIRS

    pairs = [Pair(f"y{i}$\\frac$", "x", (2,), (3,), 1) for i in range(MAX_PAIRS + 2)]  # names are not mathtext
    seen = []
    inner = SimpleNamespace(write=lambda key, s0, s1, block: seen.append(key))
    sink = PlotSink(SimpleNamespace(pairs=pairs, samples=1, batch=True, ys={}), samples=1).wrap(inner)
    assert sink.omitted == 2 and len(sink.views) == MAX_PAIRS
    for p in pairs:
        sink.write(p.key, 0, 1, np.ones((1, 2, 3)))
    assert seen == [p.key for p in pairs]
    assert all(v.seen == 6 and v.heat.values.max() == 1 for v in sink.views.values())
    (pic,), (png,) = draw(plots.compute_plots(sink.ordered(), {}, {}))
    assert len(pic.panels) == MAX_PAIRS and pic.panels[0].ax.get_title() == "sample 0: |dy0$\\frac$/dx|"
    non_blank(read_png(tmp_path, png))
    assert plots.file_name("saliency-a/b-c:d\n") == "saliency-a_b-c_d"


# --- compute: saliency maps and sequences ----------------------------------------------------
@pytest.mark.parametrize("kind,reduce", [("spot", "max"), ("spot_hwc", "max"), ("spot", "l2")])
def test_saliency_peaks_where_the_model_looks(built, tmp_path, kind, reduce):
    model = jacli.load(str(built[kind]))
    x = np.load(built[f"{kind}_input"])
    plan, sink = stream(model, x, samples=2, output=("top", 2), reduce=reduce)
    chw = x if kind == "spot" else x.transpose(0, 3, 1, 2)
    (pic,), (png,) = draw(plots.compute_plots(sink.ordered(), plan.xs, plan.ys, plan.batch, reduce))
    img = read_png(tmp_path, png)
    non_blank(img)
    maps = [p for p in pic.panels if p.kind == "saliency"]
    images = [p for p in pic.panels if p.kind == "image"]
    assert len(maps) == 4 and len(images) == 2  # 2 samples x (input image + top-2 outputs)
    for p in maps:
        s, k = p.data["sample"], p.data["output"]
        assert sink.views["doutput/dx", s].layout == ("chw" if kind == "spot" else "hwc")
        np.testing.assert_allclose(p.data["values"], pm.spot_saliency(chw[s], k, reduce), rtol=1e-4, atol=1e-7)
        assert hottest_cell(img, p, 8, 8) == {pm.SPOTS[k]}  # read back from the PNG
    for p in images:  # the input beside it, as RGB, in the same geometry
        assert p.data["values"].shape == (8, 8, 3) and crop(img, p).std() > 0.1
    y = plan.ys["output"]
    assert [p.data["output"] for p in maps[:2]] == list(np.argsort(-y[0]))  # top-2, largest first


def test_saliency_of_a_chosen_output_and_layout_override(built, tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    r = run_jacli("compute", built["spot"], built["spot_input"], "--plot", out, "--plot-output", "1", "-q")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "saliency-output-x.png"]
    non_blank(imread(out / "saliency-output-x.png")[:, :, :3])
    r = run_jacli("compute", built["spot"], built["spot_input"], "--plot", tmp_path / "flat", "--plot-layout", "flat")
    assert r.code == 2 and r.stderr.count("\n") == 1  # not a directory, not .png/.svg
    flat = tmp_path / "flat"
    flat.mkdir()
    r = run_jacli("compute", built["spot"], built["spot_input"], "--plot", flat, "--plot-layout", "flat", "-q")
    assert r.code == 0 and [p.name for p in flat.iterdir()] == ["heatmap.png"]
    for bad in (["--plot-layout", "x:hw"], ["--plot-layout", "y:chw"], ["--plot-output", "9"], ["--plot-output", "top0"]):
        r = run_jacli("compute", built["spot"], built["spot_input"], "--plot", tmp_path / "p.png", *bad)
        assert r.code == 2 and r.stderr.startswith("Error:") and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert not (tmp_path / "p.png").exists()


def test_layout_detection():
    assert input_layout((3, 32, 32)) == "chw" and input_layout((32, 32, 3)) == "hwc"
    assert input_layout((3, 8, 3)) == "chw" and input_layout((3, 8, 3), channels_last=True) == "hwc"
    assert input_layout((12, 5)) == "seq" and input_layout((500,)) == "flat" and input_layout((16, 8, 8)) == "flat"
    assert input_layout((28, 28), "hw") == "hw"


def test_sequence_blocks_show_causality(built, tmp_path):
    """y[t] depends on x[s] for s <= t only: the (time x time) block map is lower triangular."""
    model = jacli.load(str(built["causal"]))
    plan, sink = stream(model, np.load(built["causal_input"]), samples=2)
    for s in range(2):
        b = sink.views["doutput/dx", s].blocks.values
        assert b.shape == (12, 12)
        assert np.all(np.triu(b, 1) == 0) and np.all(b[np.tril_indices(12)] > 0)
    (pic,), (png,) = draw(plots.compute_plots(sink.ordered(), plan.xs, {}, plan.batch))
    img = read_png(tmp_path, png)
    blocks = [p for p in pic.panels if p.kind == "blocks"]
    assert len(blocks) == 2
    dark = np.array(VIRIDIS(0.0)[:3])
    for p in blocks:
        assert np.allclose(cell_colour(img, p, 2, 9, 12, 12), dark, atol=0.02)  # above the diagonal: 0
        assert not np.allclose(cell_colour(img, p, 9, 2, 12, 12), dark, atol=0.05)


def test_streamed_jacobian_is_plotted_without_holding_it(built, tmp_path, monkeypatch):
    """field: J is 1024 x 3072 (12 MiB) per sample; with a 4 MiB budget it arrives in row
    parts, and the plot is pooled from them in far less memory than one sample's J."""
    model = jacli.load(str(built["field"]))
    x = np.load(built["field_input"])
    parts = []
    real = PlotSink.write_part
    monkeypatch.setattr(PlotSink, "write_part", lambda self, key, s, rows, cols, block, n: (
        parts.append(block.nbytes), real(self, key, s, rows, cols, block, n)))
    sample_bytes = 1024 * 3072 * 4
    tracemalloc.start()
    plan, sink = stream(model, x, samples=2, budget=4 << 20, output=("index", (0, 5, 9)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(parts) > 8 and max(parts) < sample_bytes // 8
    assert sink.held_bytes() < sample_bytes // 10 and peak < sample_bytes // 2
    J = np.abs(jacli.jacobian(model, x).reshape(2, 1024, 3072))
    rows, cols = _edges(1024, 256), _edges(3072, 256)
    for s in range(2):
        v = sink.views["doutput/dx", s]
        assert v.seen == 1024 * 3072
        expected = np.maximum.reduceat(np.maximum.reduceat(J[s], rows[:-1], axis=0), cols[:-1], axis=1)
        np.testing.assert_allclose(v.heat.values, expected, rtol=1e-6)
        smap = v.saliency.maps()[0]
        assert np.unravel_index(np.argmax(smap), smap.shape) == (5, 9) and np.count_nonzero(smap) == 9
    (pic,), (png,) = draw(plots.compute_plots(sink.ordered(), plan.xs, plan.ys, plan.batch))
    img = read_png(tmp_path, png)
    for p in (p for p in pic.panels if p.kind == "saliency"):
        assert hottest_cell(img, p, 32, 32) == {(5, 9)}


# --- svd, det, check ---------------------------------------------------------------------------
def test_svd_spectra_with_error_bars_and_sigma_max(tmp_path):
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    x = np.load(SAMPLES / "mlp_input.npy")
    full = api.svd(model, x)
    (pic,), (png,) = draw([plots.svd_plot(full, samples=2)])
    spectrum, spread = pic.panels
    np.testing.assert_allclose(spectrum.data["values"], full.singular_values[:2])
    assert len(spectrum.ax.containers) == 2 and spectrum.data["bounds"] is None  # exact: no error bars
    np.testing.assert_allclose(spread.data["values"], full.sigma_max)
    non_blank(read_png(tmp_path, png))

    free = api.svd(model, x, k=2, smallest=True, solver="matrix-free")
    (pic,), (svg,) = draw([plots.svd_plot(free, samples=3)], ".svg")
    spectrum = pic.panels[0]
    assert len(spectrum.ax.containers) == 6  # 3 samples x (top, bottom)
    for c in spectrum.ax.containers:
        assert c.has_yerr and len(c.lines[2][0].get_segments()) == 2  # an error bar on each value
    assert any("κ" in t.get_text() for t in spectrum.ax.texts)  # the condition number, marked
    assert [t.get_text() for t in spectrum.ax.get_legend().get_texts()] == [
        f"sample {i}: κ = {plots._num(free.condition_number[i])}" for i in range(3)]


def test_cli_svd_det_and_check_plots(tmp_path):
    for cmd, name, extra in (("svd", "mlp", ["-k", "3"]), ("det", "map2d", []), ("check", "map2d", ["--fd"])):
        out = tmp_path / f"{cmd}.svg"
        r = run_jacli(cmd, SAMPLES / f"{name}.onnx", SAMPLES / f"{name}_input.npy", "--plot", out, "--json", *extra)
        assert r.code == 0 and r.stdout.startswith(b"{")
        assert out.read_bytes().startswith(b"<?xml")
    svg = (tmp_path / "det.svg").read_bytes()
    assert svg_marks(svg, "logdet-singular") == 1 and svg_marks(svg, "logdet-+1") == 2  # map2d: sample 2 is 0
    svg = (tmp_path / "check.svg").read_bytes()  # map2d passes: its entries (at least each sample's worst) are ok
    assert svg_marks(svg, "ad-fd-ok") >= 3 and svg_marks(svg, "ad-fd-wrong-gradient") == 0


def test_det_marks_singular_and_ill_conditioned_samples(tmp_path):
    from jacli.engine.spectral import DetResult

    unit = float(np.finfo(np.float32).eps)  # ill-conditioned where rcond <= √eps ≈ 3.5e-4
    rcond = np.array([0.5, 1e-4, 1e-8, np.nan, 0.2])
    logdet = np.array([1.0, -3.0, -np.inf, np.nan, 2.0])
    sign = np.array([1.0, 1.0, 0.0, np.nan, -1.0])
    cond = np.where(sign == 0, np.inf, 1 / rcond)
    r = DetResult(3, None, unit, sign, logdet, sign * np.exp(logdet), rcond, cond, np.full(5, 1e-6))
    assert {k: v.tolist() for k, v in plots.det_classes(r).items()} == {"ok": [0, 4], "ill": [1], "singular": [2],
                                                                         "nan": [3]}
    _, (svg,) = draw([plots.det_plot(r)], ".svg")
    assert [svg_marks(svg, f"logdet-{k}") for k in ("+1", "-1", "ill", "singular", "nan")] == [1, 1, 1, 1, 1]


def test_check_scatter_marks_each_diagnosis(built, tmp_path):
    model = jacli.load(str(built["flawed"]))
    x = np.load(built["flawed_input"])
    result = api.check(model, x)
    entries, complete = plots.check_entries(result)
    kinds = {d: sum(e.diagnosis == d for e in entries) for d in plots.MARKS}
    assert kinds["wrong-gradient"] == result.to_json()["failures"] == 6 and kinds["kink"] >= 1
    (pic,), (svg,) = draw([plots.check_plot(result)], ".svg")
    assert pic.panels[0].data["counts"] == {**kinds, "adjoint": 0}
    for d, n in kinds.items():  # as many marks as entries of each kind, in both panels
        assert svg_marks(svg, f"ad-fd-{d}") == n and svg_marks(svg, f"error-{d}") == n
    assert complete and len(entries) == result.to_json()["checked"]  # few entries: every one is drawn

    out = tmp_path / "check.png"
    r = run_jacli("check", built["flawed"], built["flawed_input"], "--fd", "--plot", out, "-q")
    assert r.code == 1 and r.stderr == ""  # the plot is written, and the exit code still says FAILED
    non_blank(imread(out)[:, :, :3])


def test_check_plot_of_leakage_is_its_message(tmp_path):
    from jacli.engine.check import CheckResult, Leakage, tolerance

    leak = Leakage(1, "y", [0], 0.5, 1e-6, [0])
    result = CheckResult("columns", tolerance(np.float32, np.float64), leakage=leak)
    (pic,), (png,) = draw([plots.check_plot(result)])
    (panel,) = pic.panels
    assert panel.kind == "message" and panel.data["message"] == leak.describe()
    assert read_png(tmp_path, png).min() < 0.5  # text on white: the message is drawn


# --- optional extra, errors, atomic writes ----------------------------------------------------
def test_missing_matplotlib_is_one_error_line(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "p.png"
    r = run_jacli("compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "--plot", out)
    assert r.code == 2 and r.stdout == b"" and not out.exists()
    assert r.stderr == "Error: --plot needs matplotlib, which is not installed; install it with: pip install 'jacli[plot]'\n"


def test_matplotlib_is_imported_only_for_plots(tmp_path):
    mods = imported(tmp_path, "compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "-q", "-o",
                    tmp_path / "J.npy")
    assert "matplotlib" not in mods and "PIL" not in mods
    code = "import sys, jacli.render.plots, jacli.render.plot_sink, jacli.cli.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_extra_the_error_names_exists():
    import re

    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert re.search(r'^plot = \["matplotlib>=[\d.]+"\]', text, re.M) and "jacli[plot]" in plots.INSTALL
    assert re.search(r'^test = \["jacli\[[a-z,]*plot[a-z,]*\]"', text, re.M)  # CI draws the plots


@pytest.mark.parametrize("target", ["file/p.png", "missing/p.png", "p.pdf"])
def test_unwritable_plot_path_fails_before_computing(tmp_path, target):
    (tmp_path / "file").write_text("not a directory")
    r = run_jacli("svd", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "--plot", tmp_path / target)
    assert r.code == 2 and r.stdout == b"" and r.stderr.startswith("Error: cannot write plot")
    assert r.stderr.count("\n") == 1 and sorted(os.listdir(tmp_path)) == ["file"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    old = tmp_path / "p.png"
    old.write_bytes(b"old picture")
    real = os.replace

    def full_disk(src, dst):
        if str(dst) == str(old):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    r = run_jacli("det", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "--plot", old, "-q")
    assert r.code == 2 and r.stderr == f"Error: cannot write {old}: No space left on device\n"
    assert old.read_bytes() == b"old picture" and os.listdir(tmp_path) == ["p.png"]


def test_no_color_does_not_apply_to_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = tmp_path / "p.png"
    assert run_jacli("compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "--plot", out, "-q").code == 0
    img = imread(out)[:, :, :3]
    assert np.abs(img[:, :, 0] - img[:, :, 2]).max() > 0.3  # viridis, not grey


def test_check_scatter_of_many_entries_is_a_uniform_sample_with_every_mismatch(built, monkeypatch):
    """Past check.SAMPLED compared entries the result keeps a uniform sample of them (bottom-k
    of random keys), and the scatter adds every listed mismatch and each sample's worst."""
    from jacli.engine import check as chk

    model = jacli.load(str(built["flawed"]))
    x = np.load(built["flawed_input"])
    every = api.check(model, x)
    monkeypatch.setattr(chk, "SAMPLED", 10)
    result = api.check(model, x)
    checked = result.to_json()["checked"]
    assert len(every.entries) == checked > 10 and len(result.entries) == 10
    key = lambda e: (e.sample, e.of, e.wrt, tuple(e.output_index), tuple(e.input_index or ()))  # noqa: E731
    assert {key(e) for e in result.entries} <= {key(e) for e in every.entries}
    entries, complete = plots.check_entries(result)
    assert not complete and {key(e) for e in result.mismatches} <= {key(e) for e in entries}
    assert len(entries) == len({key(e) for e in [*result.entries, *result.mismatches, *result.unresolved,
                                                  *(s.worst for s in result.samples)]})
    _, (svg,) = draw([plots.check_plot(result)], ".svg")
    assert sum(svg_marks(svg, f"ad-fd-{d}") for d in plots.MARKS) == len(entries)
