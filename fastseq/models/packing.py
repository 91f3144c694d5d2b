"""Transformer layers run on a padded batch's real tokens only ("unpadding").

A batch padded at the end of each row, (B, T, E) with lengths (B,), holds N = sum(lengths) real
tokens.  Everything in a Transformer layer but attention is row-wise -- the projections and the
feed-forward block (nearly all of a step's FLOPs), the norms, the dropouts -- so it runs on the
(N, E) real rows: at 50-100 % random lengths that is a quarter of the GEMM work saved.  Attention
alone needs the rows' structure: q, k, v are scattered into (B, NH, T, D) (zeros at the pads),
attended with key_lengths (fastseq's kernel skips the padded keys), and the real rows' outputs
gathered back.  A padded position's output is never computed; unpacking puts zeros there.

The layers are torch.nn.TransformerEncoderLayer / TransformerDecoderLayer modules (fastseq.nn's,
state_dict keys unchanged): encoder_layer / decoder_layer compute what their forward computes in
training mode -- every dropout included, fused as fastseq.transformer fuses them -- and in eval
mode, on the packed rows, from the modules' parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as FF


class Rows:
    """Where the real tokens of a batch padded at the end of each row are: lengths (B,) of rows of
    width T.  pack: (B, T, *) -> (N, *); unpack: (N, *) -> (B, T, *) with zeros at the pads."""

    def __init__(self, lengths: Optional[Tensor], B: int, T: int, device=None):
        self.B, self.T = B, T
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=device)
        self.lengths = lengths
        self.full = bool((lengths == T).all())
        if self.full:
            self.index = None
            self.N = B * T
        else:
            keep = torch.arange(T, device=lengths.device).view(1, T) < lengths.view(B, 1)     # (B, T)
            self.index = keep.reshape(-1).nonzero().squeeze(1)                               # (N,) b T + t
            self.N = self.index.numel()

    def pack(self, x: Tensor) -> Tensor:
        flat = x.reshape(self.B * self.T, *x.shape[2:])                                      # (B T, *)
        return flat if self.full else flat.index_select(0, self.index)                      # (N, *)

    def unpack(self, y: Tensor) -> Tensor:
        if not self.full:
            y = y.new_zeros(self.B * self.T, *y.shape[1:]).index_copy(0, self.index, y)      # (B T, *)
        return y.view(self.B, self.T, *y.shape[1:])                                          # (B, T, *)

    def positions(self) -> Tensor:
        """The position t of every real token (N,)."""
        t = torch.arange(self.T, device=self.lengths.device).expand(self.B, self.T)
        return self.pack(t)


# ============================================================================ attention

def _heads(x: Tensor, rows: Rows, NH: int, D: int) -> Tensor:
    """(N, k NH D) real rows -> (k, B, NH, T, D) padded, for k stacked projections."""
    B, T = rows.B, rows.T
    return rows.unpack(x).view(B, T, -1, NH, D).permute(2, 0, 3, 1, 4)                      # (k, B, NH, T, D)


def _merge(o: Tensor, rows: Rows) -> Tensor:
    """(B, NH, T, D) -> the real rows (N, NH D)."""
    B, NH, T, D = o.shape
    return rows.pack(o.transpose(1, 2)).reshape(-1, NH * D)                                  # (N, E)


def self_attention(mha: nn.MultiheadAttention, x: Tensor, rows: Rows, causal: bool) -> Tensor:
    """mha(x, x, x) on the real rows x (N, E): keys beyond each row's length never seen."""
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)                                 # (N, 3E)
    q, k, v = _heads(qkv, rows, mha.num_heads, mha.head_dim)                                 # 3 x (B, NH, T, D)
    p = mha.dropout if mha.training else 0.0
    o = FF.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                        key_lengths=None if rows.full else rows.lengths)
    return F.linear(_merge(o, rows), mha.out_proj.weight, mha.out_proj.bias)                 # (N, E)


def cross_attention(mha: nn.MultiheadAttention, x: Tensor, rows: Rows, memory: Tensor, memory_rows: Rows) -> Tensor:
    """mha(x, memory, memory): queries from the real rows x (N, E), keys and values from the
    real rows of memory (M, E)."""
    E = x.shape[-1]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    NH, D = mha.num_heads, mha.head_dim
    q = _heads(F.linear(x, w[:E], b[:E]), rows, NH, D)[0]                                   # (B, NH, T, D)
    k, v = _heads(F.linear(memory, w[E:], b[E:]), memory_rows, NH, D)                       # 2 x (B, NH, S, D)
    p = mha.dropout if mha.training else 0.0
    o = FF.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                        key_lengths=None if memory_rows.full else memory_rows.lengths)
    return F.linear(_merge(o, rows), mha.out_proj.weight, mha.out_proj.bias)                 # (N, E)


# ============================================================================ layers

def _drop_add_norm(branch: Tensor, x: Tensor, norm: nn.LayerNorm, p: float, training: bool, return_sum=False):
    return FF.dropout_add_layer_norm(branch, x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, p,
                                     training, return_sum)


def _norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return FF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def feed_forward(layer: nn.Module, x: Tensor, activation: str) -> Tensor:
    """linear2(dropout(act(linear1(x)))), bias + activation + dropout in one pass."""
    h = FF.bias_act_dropout(F.linear(x, layer.linear1.weight), layer.linear1.bias, activation, layer.dropout.p,
                            layer.training)
    return F.linear(h, layer.linear2.weight, layer.linear2.bias)                              # (N, E)


def encoder_layer(layer: nn.TransformerEncoderLayer, x: Tensor, rows: Rows, activation: str,
                  causal: bool = False) -> Tensor:
    """layer(x, src_key_padding_mask=<pads of rows>) on the real rows x (N, E) -> (N, E).
    activation: the layer's, by name (relu, gelu, gelu_tanh, silu)."""
    tr = layer.training
    p1, p2 = layer.dropout1.p, layer.dropout2.p
    if layer.norm_first:
        h, x = _drop_add_norm(self_attention(layer.self_attn, _norm(x, layer.norm1), rows, causal), x, layer.norm2,
                              p1, tr, return_sum=True)                                      # norm2(x + sa), x + sa
        return FF.dropout_add(feed_forward(layer, h, activation), x, p2, tr)
    x = _drop_add_norm(self_attention(layer.self_attn, x, rows, causal), x, layer.norm1, p1, tr)
    return _drop_add_norm(feed_forward(layer, x, activation), x, layer.norm2, p2, tr)


def decoder_layer(layer: nn.TransformerDecoderLayer, x: Tensor, rows: Rows, memory: Tensor, memory_rows: Rows,
                  activation: str) -> Tensor:
    """layer(x, memory, tgt_mask=<causal>, memory_key_padding_mask=<pads of memory_rows>) on the
    real rows x (N, E) of the target and memory (M, E) of the source -> (N, E)."""
    tr = layer.training
    p1, p2, p3 = layer.dropout1.p, layer.dropout2.p, layer.dropout3.p
    if layer.norm_first:
        h, x = _drop_add_norm(self_attention(layer.self_attn, _norm(x, layer.norm1), rows, True), x, layer.norm2,
                              p1, tr, return_sum=True)                                      # norm2(x + sa), x + sa
        h, x = _drop_add_norm(cross_attention(layer.multihead_attn, h, rows, memory, memory_rows), x, layer.norm3,
                              p2, tr, return_sum=True)                                      # norm3(x + ca), x + ca
        return FF.dropout_add(feed_forward(layer, h, activation), x, p3, tr)
    x = _drop_add_norm(self_attention(layer.self_attn, x, rows, True), x, layer.norm1, p1, tr)
    x = _drop_add_norm(cross_attention(layer.multihead_attn, x, rows, memory, memory_rows), x, layer.norm2, p2, tr)
    return _drop_add_norm(feed_forward(layer, x, activation), x, layer.norm3, p3, tr)
