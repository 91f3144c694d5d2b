"""TorchGPT: fastseq.models.gpt.GPT written the way a PyTorch user writes GPT-2 (nanoGPT's
shape): torch.nn modules, F.scaled_dot_product_attention, nn.Dropout, the logits formed whole and
F.cross_entropy.  Same config, same state_dict keys, same forward and loss."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gpt import GPTConfig
from ._loss import token_cross_entropy

_ACT = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads, self.p = c.heads, c.attention_dropout
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(x).split(E, dim=-1)
        q, k, v = (t.view(B, T, self.heads, E // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, D)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.act = _ACT[c.activation]
        self.fc = nn.Linear(c.dim, c.ffn_dim)
        self.proj = nn.Linear(c.ffn_dim, c.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.mlp = MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TorchGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_positions, c.dim)
        self.drop = nn.Dropout(c.embedding_dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.head = None if c.tie_weights else nn.Linear(c.dim, c.vocab_size, bias=False)
        for name, p in self.named_parameters():                                 # GPT-2's init
            if name.endswith("proj.weight"):                                    # writes into the residual stream
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.layers))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.tok_emb.weight if self.head is None else self.head.weight)   # (B, T, V)

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        return token_cross_entropy(self(batch["tokens"]), batch["targets"], label_smoothing, smoothing)
