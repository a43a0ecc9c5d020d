"""Regenerate the pictures of docs/plots.md (docs/img/*.png) with `jacli ... --plot`.

    python docs/make_gallery.py        (needs jacli[plot], onnxruntime and torch)

The heatmaps, spectra and determinants come from sample_models/ as they are; the image,
sequence and gradient-check examples from the small TorchScript models that
sample_models/plot_models.py builds (into a temporary folder) with seeded inputs.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
IMG = ROOT / "docs" / "img"
sys.path[:0] = [str(ROOT), str(SAMPLES)]

import plot_models  # noqa: E402
from jacli.cli.main import main  # noqa: E402


def jacli(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        if e.code not in (0, 1, None):  # check exits 1 on the planted bug
            raise


def picture(name: str, *args) -> None:
    """Run one command with --plot into a scratch folder and keep its pictures as
    docs/img/NAME-<plot>.png (NAME.png when it draws one), reduced to 128 colours (a
    third of the size, for the repository; jacli itself writes full colour)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        jacli(*args, "--plot", tmp, "-q")
        made = sorted(Path(tmp).glob("*.png"))
        for p in made:
            dest = IMG / (f"{name}.png" if len(made) == 1 else f"{name}-{p.stem}.png")
            with Image.open(p) as im:
                im.convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(dest, optimize=True)
            print(f"{dest.relative_to(ROOT)}  ({dest.stat().st_size // 1024} KiB)")


def run() -> None:
    IMG.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        models = {kind: plot_models.build(kind, d / f"{kind}.pt") for kind in ("spot", "causal", "flawed")}
        flawed = rng.standard_normal((3, 4)).astype(np.float32)
        flawed[0] = plot_models.at_switch(flawed[0])
        inputs = {"spot": rng.standard_normal((2, 3, 8, 8)), "causal": 0.3 * rng.standard_normal((1, 12, 3)),
                  "flawed": flawed}
        for kind, x in inputs.items():
            np.save(d / f"{kind}.npy", x.astype(np.float32))
        picture("mlp", "compute", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "--plot-samples", "2")
        picture("multi", "compute", SAMPLES / "multi.onnx", SAMPLES / "multi_input.npz", "--plot-samples", "1")
        picture("spot", "compute", models["spot"], d / "spot.npy", "--plot-output", "top-2", "--plot-samples", "2")
        picture("causal", "compute", models["causal"], d / "causal.npy")
        picture("svd", "svd", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "-k", "3", "--smallest",
                "--solver", "matrix-free")
        picture("det", "det", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy")
        picture("check", "check", models["flawed"], d / "flawed.npy", "--fd")


if __name__ == "__main__":
    run()
