"""transformers BERT and GPT-2 at tiny sizes, and a timm-style ViT in plain torch whose
blocks take ``attn_mask: Optional[Tensor] = None, is_causal: bool = False``; saved as
TorchScript (traced and scripted) and torch.export ``.pt2``. References: torch's autograd
in float64 on float64 copies of the same eager modules (no jacli code involved)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEQ, HIDDEN, VOCAB = 4, 16, 50


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_layer=1, n_head=2)).eval()


class Embeds(nn.Module):
    """The model from its input embeddings (a float input to differentiate) to its last
    hidden state, as one would wrap a transformers model for saliency."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds):
        return self.model(inputs_embeds=inputs_embeds).last_hidden_state


class Ids(nn.Module):
    """The raw model on integer token ids, returning its last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


# --- a timm-style ViT ------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, one block, head: (B, 3, 8, 8) -> (B, 3)."""

    def __init__(self, dim: int = HIDDEN, heads: int = 2, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.block, self.norm, self.head = Block(dim, heads), nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.block(tokens, attn_mask=attn_mask, is_causal=is_causal))[:, 0])


def vit():
    torch.manual_seed(0)
    return ViT().eval()


# --- saving and references -----------------------------------------------------------------------
def save(module: nn.Module, example: tuple, how: str, path: Path, kwargs: dict | None = None) -> Path:
    """``traced``/``scripted`` TorchScript (.pt) or ``export`` (.pt2)."""
    if how == "traced":
        torch.jit.save(torch.jit.trace(module, example, strict=False), path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if how == "scripted":
        torch.jit.save(torch.jit.script(module), path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    torch.export.save(torch.export.export(module, example, kwargs or {}), path.with_suffix(".pt2"))
    return path.with_suffix(".pt2")


def reference(module: nn.Module, x: np.ndarray, output=lambda y: y) -> np.ndarray:
    """Per-sample Jacobians (B, *out, *in) of ``output(module(x))`` in float64."""
    module64 = copy.deepcopy(module).double()
    rows = []
    for xi in torch.from_numpy(x.astype(np.float64)):
        rows.append(torch.autograd.functional.jacobian(lambda v: output(module64(v[None]))[0], xi).numpy())
    return np.stack(rows)
