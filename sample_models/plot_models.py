"""Small TorchScript models with inputs that ``--plot`` draws as pictures, and whose
sensitivities are known in closed form; built on demand (tests/test_plots.py,
docs/make_gallery.py), never stored.

  spot    an image (3, S, S) (or (S, S, 3) with ``channels_last``) -> 2 outputs: output k is
          tanh of a 3x3 convolution read at pixel SPOTS[k] only. The kernel's centre
          weights (CENTRE, per channel) dominate its rim (RIM), so |dy_k/dx| peaks at
          SPOTS[k] and vanishes outside its 3x3 neighbourhood.
  field   an image (3, S, S) -> (1, S, S): the same convolution at every pixel (the
          Jacobian is S²x3S², a 3x3 stencil; for streaming tests).
  causal  a sequence (T, 3) -> (T, 2): y[t] = tanh(sum_{s<=t} x[s] W), so block (t, s) of
          the Jacobian is zero exactly when s > t.
  flawed  (4,) -> (5,) for gradient-check pictures: relu(x A) (kinks where x A = 0, see
          ``at_switch``) and, with a misplaced detach(), x[2:] * exp(tanh(x[:2])), whose
          derivatives by x[:2] are wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPOTS = ((2, 5), (6, 1))
CENTRE = (1.0, -0.5, 0.25)  # per input channel
RIM = 0.1


def kernel() -> np.ndarray:
    """(1, 3, 3, 3) OIHW: RIM everywhere, CENTRE[c] at the centre of channel c."""
    k = np.full((1, 3, 3, 3), RIM, np.float32)
    k[0, :, 1, 1] = CENTRE
    return k


def spot_saliency(x: np.ndarray, output: int, reduce: str = "max") -> np.ndarray:
    """The closed-form saliency map (H, W) of output ``output`` at one CHW sample ``x``:
    |tanh'(h)| |K[c, i - r + 1, j - q + 1]| reduced over channels c around (r, q)."""
    k = kernel()[0]
    r, q = SPOTS[output]
    h = float(np.sum(k * np.pad(x, ((0, 0), (1, 1), (1, 1)))[:, r : r + 3, q : q + 3]))
    out = np.zeros(x.shape[1:])
    a = np.abs(k) * (1 - np.tanh(h) ** 2)
    red = a.max(axis=0) if reduce == "max" else np.sqrt((a * a).sum(axis=0))
    for di in range(3):
        for dj in range(3):
            i, j = r + di - 1, q + dj - 1
            if 0 <= i < x.shape[1] and 0 <= j < x.shape[2]:
                out[i, j] = red[di, dj]
    return out


def switch_matrix() -> np.ndarray:
    return (np.random.default_rng(4).standard_normal((4, 3)) / 2).astype(np.float32)


def at_switch(x: np.ndarray) -> np.ndarray:
    """``x`` (4,) moved onto the switch point of relu unit 0 of ``flawed``."""
    a = switch_matrix()[:, 0].astype(np.float64)
    return (x - (x @ a) / (a @ a) * a).astype(np.float32)


def build(kind: str, path: Path, channels_last: bool = False, size: int = 8, steps: int = 12) -> Path:
    import torch

    K = torch.from_numpy(kernel())
    W = torch.from_numpy(np.random.default_rng(3).standard_normal((3, 2)).astype(np.float32) / 2)

    class Spot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("K", K)

        def forward(self, x):
            if channels_last:
                x = x.permute(0, 3, 1, 2)
            h = torch.tanh(torch.nn.functional.conv2d(x, self.K, padding=1))
            return torch.stack([h[:, 0, SPOTS[0][0], SPOTS[0][1]], h[:, 0, SPOTS[1][0], SPOTS[1][1]]], dim=1)

    class Field(Spot):
        def forward(self, x):
            return torch.tanh(torch.nn.functional.conv2d(x, self.K, padding=1))

    class Causal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("W", W)

        def forward(self, x):
            return torch.tanh(torch.cumsum(x, dim=1) @ self.W)

    class Flawed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("A", torch.from_numpy(switch_matrix()))

        def forward(self, x):
            a, b = x[:, :2], x[:, 2:]
            return torch.cat([torch.relu(x @ self.A), b * torch.exp(torch.tanh(a)).detach()], dim=1)

    module, example = {"spot": (Spot, (size, size, 3) if channels_last else (3, size, size)),
                       "field": (Field, (3, size, size)), "causal": (Causal, (steps, 3)),
                       "flawed": (Flawed, (4,))}[kind]
    torch.jit.save(torch.jit.trace(module().eval(), torch.zeros(2, *example)), str(path))
    return path
