"""A corpus of real architectures in plain torch (torchvision is not importable here), with
random weights, for the gradient-check and Jacobian tests and benchmarks.

Every architecture is a builder ``name(size="tiny")``: ``"tiny"`` keeps the architecture's
block types (basic blocks, inverted residuals with squeeze-excite, MBConv, dense blocks and
transitions, SDPA attention...) at CI sizes; ``"full"`` is the published configuration at
224x224 (benchmarks only). ``build(name, size, seed)`` returns the module in eval mode with
seeded He-scaled weights and randomised BatchNorm statistics, and an example input.

``save_all(module, x, directory)`` writes the module in every format that can hold it
(TorchScript trace and script, torch.export ``.pt2``, ONNX from both exporters), with a
dynamic batch axis, and returns the paths written and the reasons for the formats that did
not work. ``reference_jacobian(module, x)`` is the independent reference: per-sample
``torch.func.jacrev`` on a float64 copy of the eager module, shape (B, *out, *in).
"""
from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of ``divisor``, not below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# --- ResNet-18 ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def resnet18(size: str = "tiny") -> nn.Module:
    return ResNet() if size == "full" else ResNet(widths=(4, 8, 8, 8), blocks=(2, 2, 2, 2), classes=5)


# --- MobileNetV3-small --------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x · gate(fc2(act(fc1(mean(x)))))."""

    def __init__(self, channels: int, squeeze: int, act: Callable = F.relu, gate: Callable = F.hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act, gate

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def _conv_bn(cin, cout, k, stride=1, groups=1, act: type | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class InvertedResidual(nn.Module):
    """MobileNetV3's bneck: expand 1x1, depthwise kxk, optional SE, project 1x1, residual."""

    def __init__(self, cin, k, expanded, cout, se: bool, act: str, stride: int):
        super().__init__()
        a = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [] if expanded == cin else [_conv_bn(cin, expanded, 1, act=a)]
        layers.append(_conv_bn(expanded, expanded, k, stride, groups=expanded, act=a))
        if se:
            layers.append(SqueezeExcite(expanded, _divisible(expanded // 4)))
        layers.append(_conv_bn(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


MOBILENET_V3_SMALL = [  # input, kernel, expanded, output, SE, activation, stride (torchvision's table)
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, setting, last: int, classes: int):
        super().__init__()
        layers = [_conv_bn(3, setting[0][0], 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(*row) for row in setting]
        head = 6 * setting[-1][3]
        layers.append(_conv_bn(setting[-1][3], head, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(head, last), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_v3_small(size: str = "tiny") -> nn.Module:
    if size == "full":
        return MobileNetV3(MOBILENET_V3_SMALL, 1024, 1000)
    tiny = [(8, 3, 8, 8, True, "RE", 2), (8, 3, 16, 8, False, "RE", 1), (8, 5, 16, 16, True, "HS", 2),
            (16, 5, 24, 16, True, "HS", 1)]
    return MobileNetV3(tiny, 16, 5)


# --- EfficientNet-B0 ----------------------------------------------------------------------
class MBConv(nn.Module):
    """EfficientNet's MBConv: expand 1x1 (SiLU), depthwise (SiLU), SE (SiLU, sigmoid), project;
    residual when the shape allows (stochastic depth is off in eval mode)."""

    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        layers = [] if mid == cin else [_conv_bn(cin, mid, 1, act=nn.SiLU)]
        layers.append(_conv_bn(mid, mid, k, stride, groups=mid, act=nn.SiLU))
        layers.append(SqueezeExcite(mid, max(1, cin // 4), act=F.silu, gate=torch.sigmoid))
        layers.append(_conv_bn(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


EFFICIENTNET_B0 = [  # expand, kernel, stride, input, output, layers
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    def __init__(self, setting, head: int, classes: int):
        super().__init__()
        layers = [_conv_bn(3, setting[0][3], 3, 2, act=nn.SiLU)]
        for expand, k, stride, cin, cout, n in setting:
            for j in range(n):
                layers.append(MBConv(expand, k, stride if j == 0 else 1, cin if j == 0 else cout, cout))
        layers.append(_conv_bn(setting[-1][4], head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def efficientnet_b0(size: str = "tiny") -> nn.Module:
    if size == "full":
        return EfficientNet(EFFICIENTNET_B0, 1280, 1000)
    tiny = [(1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 8, 2), (6, 5, 2, 8, 16, 1)]
    return EfficientNet(tiny, 32, 5)


# --- DenseNet-121 -------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(bn_size * growth), nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, classes=1000):
        super().__init__()
        layers = [nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        c = init
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1))


def densenet121(size: str = "tiny") -> nn.Module:
    return DenseNet() if size == "full" else DenseNet(growth=4, blocks=(2, 2), init=8, bn_size=2, classes=5)


# --- transformers -------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class PreNormBlock(nn.Module):
    """ViT and GPT-2: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, causal: bool, gelu: str = "none"):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gelu = gelu

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate=self.gelu))


class ViT(nn.Module):
    def __init__(self, image=224, patch=16, dim=768, depth=12, heads=12, classes=1000):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[PreNormBlock(dim, heads, causal=False) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.ln(self.blocks(t))[:, 0])


def vit(size: str = "tiny") -> nn.Module:
    return ViT() if size == "full" else ViT(image=8, patch=4, dim=8, depth=1, heads=2, classes=4)


class GPT2(nn.Module):
    """GPT-2 from inputs_embeds: + learned positions, pre-LN causal blocks (tanh GELU), final LN."""

    def __init__(self, seq=1024, dim=768, depth=12, heads=12):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.Sequential(*[PreNormBlock(dim, heads, causal=True, gelu="tanh") for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, inputs_embeds):
        return self.ln(self.blocks(inputs_embeds + self.pos[:, : inputs_embeds.shape[1]]))


class BertLayer(nn.Module):
    """BERT's post-LN layer: LN(x + attn(x)), then LN(x + MLP(x)) with erf GELU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = Attention(dim, heads, causal=False)
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    """BERT's encoder from inputs_embeds: + positions, embedding LN, post-LN layers."""

    def __init__(self, seq=512, dim=768, depth=12, heads=12):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.Sequential(*[BertLayer(dim, heads) for _ in range(depth)])

    def forward(self, inputs_embeds):
        return self.layers(self.ln(inputs_embeds + self.pos[:, : inputs_embeds.shape[1]]))


def gpt2(size: str = "tiny") -> nn.Module:
    return GPT2() if size == "full" else GPT2(seq=8, dim=8, depth=1, heads=2)


def bert(size: str = "tiny") -> nn.Module:
    return Bert() if size == "full" else Bert(seq=8, dim=8, depth=1, heads=2)


# --- recurrent and 1-D --------------------------------------------------------------------
class Recurrent(nn.Module):
    """nn.LSTM or nn.GRU (batch first) and a linear read-out of every step."""

    def __init__(self, cell: str, features: int, hidden: int, layers: int, out: int):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(features, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def lstm(size: str = "tiny") -> nn.Module:
    return Recurrent("lstm", 64, 256, 2, 64) if size == "full" else Recurrent("lstm", 3, 5, 2, 2)


def gru(size: str = "tiny") -> nn.Module:
    return Recurrent("gru", 64, 256, 2, 64) if size == "full" else Recurrent("gru", 3, 5, 2, 2)


class Conv1dNet(nn.Module):
    """Conv1d, GELU, Conv1d, Tanh."""

    def __init__(self, channels: int, hidden: int, k: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(channels, hidden, k, padding=k // 2), nn.Conv1d(hidden, channels, k, padding=k // 2)

    def forward(self, x):
        return torch.tanh(self.c2(F.gelu(self.c1(x))))


def conv1d(size: str = "tiny") -> nn.Module:
    return Conv1dNet(64, 256, 5) if size == "full" else Conv1dNet(3, 6, 3)


# --- the corpus ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    builder: Callable[[str], nn.Module]
    tiny: tuple[int, ...]  # one sample's input shape
    full: tuple[int, ...]
    smooth: bool  # no ReLU/max switch points (FD converges everywhere)
    forward_mode: bool = True  # torch has forward-mode rules for every op (CPU)


IMAGE = (3, 224, 224)
ARCHS: dict[str, Arch] = {
    "resnet18": Arch(resnet18, (3, 16, 16), IMAGE, smooth=False),
    "mobilenet_v3_small": Arch(mobilenet_v3_small, (3, 16, 16), IMAGE, smooth=False),
    "efficientnet_b0": Arch(efficientnet_b0, (3, 16, 16), IMAGE, smooth=True),
    "densenet121": Arch(densenet121, (3, 16, 16), IMAGE, smooth=False),
    "vit": Arch(vit, (3, 8, 8), IMAGE, smooth=True, forward_mode=False),
    "gpt2": Arch(gpt2, (6, 8), (128, 768), smooth=True, forward_mode=False),
    "bert": Arch(bert, (6, 8), (128, 768), smooth=True, forward_mode=False),
    "lstm": Arch(lstm, (5, 3), (32, 64), smooth=True),
    "gru": Arch(gru, (5, 3), (32, 64), smooth=True),
    "conv1d": Arch(conv1d, (3, 12), (64, 256), smooth=True),
}


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """He-scaled weights (fan in), small biases, and BatchNorm with random affine parameters
    and running statistics, all from ``seed``; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.LSTM, nn.GRU)):
                for p in m.parameters():
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(m.hidden_size))
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if name in ("cls", "pos"):  # class tokens, position embeddings
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def build(name: str, size: str = "tiny", seed: int = 0, batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """The architecture ``name`` (a key of ARCHS) with seeded random weights, eval mode,
    and an example input of ``batch`` samples (float32, N(0, 1))."""
    arch = ARCHS[name]
    torch.manual_seed(seed)
    module = randomize(arch.builder(size), seed)
    shape = arch.full if size == "full" else arch.tiny
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed + 1))
    return module, x


# --- saving -------------------------------------------------------------------------------
FORMATS = ("trace", "script", "pt2", "onnx", "onnx-dynamo")


def save_all(module: nn.Module, x: torch.Tensor, directory, formats=FORMATS, name: str = "model"):
    """Write ``module`` in each of ``formats`` that can hold it, with a dynamic batch axis:
    ``trace``/``script`` (TorchScript ``.pt``), ``pt2`` (torch.export), ``onnx`` (the
    TorchScript-based exporter, dynamo=False) and ``onnx-dynamo`` (dynamo=True, offline).
    Returns ({format: path}, {format: why it failed})."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, failed = {}, {}
    for fmt in formats:
        path = directory / f"{name}.{fmt}{'.pt2' if fmt == 'pt2' else '.onnx' if fmt.startswith('onnx') else '.pt'}"
        try:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                _SAVERS[fmt](module, x, path)
            paths[fmt] = path
        except Exception as e:  # noqa: BLE001 — a format that cannot hold this module
            failed[fmt] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return paths, failed


def _trace(module, x, path):
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module, x, check_trace=False), str(path))


def _script(module, x, path):
    torch.jit.save(torch.jit.script(module), str(path))


def _pt2(module, x, path):
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))


def _onnx(module, x, path):
    torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)


def _onnx_dynamo(module, x, path):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" lines
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(module, (x,), None, input_names=["x"], output_names=["y"], dynamo=True,
                                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    program.save(str(path))


_SAVERS = {"trace": _trace, "script": _script, "pt2": _pt2, "onnx": _onnx, "onnx-dynamo": _onnx_dynamo}


# --- the reference ------------------------------------------------------------------------
def reference_jacobian(module: nn.Module, x) -> np.ndarray:
    """Per-sample Jacobians (B, *out, *in) by torch.func.jacrev on a float64 copy of the
    eager module (weights and buffers made double)."""
    m64 = copy.deepcopy(module).double().eval()
    x64 = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    rows = []
    for i in range(x64.shape[0]):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            jac = torch.func.jacrev(lambda v: m64(v[None])[0])(x64[i])
        rows.append(jac.detach().numpy())
    return np.stack(rows)
