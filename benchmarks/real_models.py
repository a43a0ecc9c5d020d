"""Full-size builders of the real architectures bench_real.py times, in plain torch (no
torchvision), with random weights: each returns an eval-mode module and its per-sample
input shape. The image networks follow the published layer tables (ResNet-18: He et al.
2015; MobileNetV3-small: Howard et al. 2019, table 2; EfficientNet-B0: Tan & Le 2019,
table 1) with a 10-class head, at the input size the benchmark asks for."""
from __future__ import annotations

import torch
from torch import nn


class Recurrent(nn.Module):
    """12 steps of 4 features -> 12 x 4 hidden states of an nn.LSTM or nn.GRU: a 48 x 48
    Jacobian per sample."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(4, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def lstm():
    return Recurrent(nn.LSTM), (12, 4)


def gru():
    return Recurrent(nn.GRU), (12, 4)


def conv1d():
    """Conv1d-GELU-Conv1d-Tanh on 4 channels x 16 steps: 64 x 64."""
    net = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.GELU(), nn.Conv1d(16, 4, 3, padding=1), nn.Tanh())
    return net, (4, 16)


class Block(nn.Module):
    """A BERT-style encoder block (post-norm, GELU feed-forward), attention written out."""

    def __init__(self, d=16, heads=2, ff=64):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.ff(x))


def transformer():
    """16 tokens x 16 features: 256 x 256."""
    return Block(), (16, 16)


# --- ResNet-18 -------------------------------------------------------------------------------
class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(size=64, classes=10):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return _randomised(nn.Sequential(*layers)), (3, size, size)


# --- MobileNetV3-small and EfficientNet-B0: inverted residuals with squeeze-excitation ------------
class SE(nn.Module):
    def __init__(self, c, squeezed, gate):
        super().__init__()
        self.reduce, self.expand, self.act, self.gate = nn.Conv2d(c, squeezed, 1), nn.Conv2d(squeezed, c, 1), \
            nn.ReLU() if gate is nn.Hardsigmoid else nn.SiLU(), gate()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class Inverted(nn.Module):
    def __init__(self, cin, k, expanded, cout, se, act, stride, se_from_input=False, gate=nn.Hardsigmoid):
        super().__init__()
        layers = [] if expanded == cin else [nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act()]
        layers += [nn.Conv2d(expanded, expanded, k, stride, k // 2, groups=expanded, bias=False),
                   nn.BatchNorm2d(expanded), act()]
        if se:
            squeezed = max(1, cin // 4) if se_from_input else _divisible(expanded // 4)
            layers.append(SE(expanded, squeezed, gate))
        layers += [nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def _divisible(v, d=8):
    return max(d, int(v + d / 2) // d * d)


def mobilenet_v3_small(size=64, classes=10):
    RE, HS = nn.ReLU, nn.Hardswish
    table = [(3, 16, 16, True, RE, 2), (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
             (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
             (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2),
             (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)]
    layers, cin = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), HS()], 16
    for k, expanded, cout, se, act, stride in table:
        layers.append(Inverted(cin, k, expanded, cout, se, act, stride))
        cin = cout
    layers += [nn.Conv2d(cin, 576, 1, bias=False), nn.BatchNorm2d(576), HS(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(576, 1024), HS(), nn.Linear(1024, classes)]
    return _randomised(nn.Sequential(*layers)), (3, size, size)


def efficientnet_b0(size=64, classes=10):
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # expansion, kernel, stride, channels, repeats
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()], 32
    for t, k, s, c, n in stages:
        for i in range(n):
            layers.append(Inverted(cin, k, cin * t, c, True, nn.SiLU, s if i == 0 else 1, se_from_input=True,
                                   gate=nn.Sigmoid))
            cin = c
    layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(1280, classes)]
    return _randomised(nn.Sequential(*layers)), (3, size, size)


def _randomised(net: nn.Module) -> nn.Module:
    """Batch-norm statistics and scales drawn at random (as after training, not the identity)."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
    return net


BUILDERS = {"lstm": lstm, "gru": gru, "conv1d": conv1d, "transformer": transformer, "resnet18": resnet18,
            "mobilenet_v3_small": mobilenet_v3_small, "efficientnet_b0": efficientnet_b0}


def build(name: str, **kw):
    torch.manual_seed(0)
    net, shape = BUILDERS[name](**kw)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, shape
