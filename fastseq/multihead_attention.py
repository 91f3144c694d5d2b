"""fastseq.nn.MultiheadAttention: torch.nn.MultiheadAttention on the flash attention kernels.

Same constructor, parameters, state_dict keys, forward signature and return values as torch's.
The attention itself runs through fastseq.functional.scaled_dot_product_attention; masks are
passed on without expanding them to (B, heads, T, S): a right-padded key_padding_mask becomes
per-sequence key lengths (padded key tiles are skipped), other masks are read in place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .attention import scaled_dot_product_attention


def _padding_as_lengths(kpm: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, S) bool key_padding_mask (True = pad) -> (B,) lengths, when every row pads a suffix."""
    lengths = (~kpm).sum(-1)
    S = kpm.shape[-1]
    if torch.equal(kpm, torch.arange(S, device=kpm.device).view(1, S) >= lengths.view(-1, 1)):
        return lengths
    return None


def _merge_masks(attn_mask, kpm, B, H, T, S, dtype):
    """torch MHA masks (bool: True = blocked; float: added) -> (sdpa mask, key_lengths).

    attn_mask: (T, S) or (B*H, T, S); kpm: (B, S).  The result broadcasts to (B, H, T, S)
    and is only materialized at that size when both masks are given."""
    key_lengths = None
    mask = None
    if attn_mask is not None:
        m = attn_mask.view(B, H, T, S) if attn_mask.dim() == 3 else attn_mask
        mask = ~m if m.dtype == torch.bool else m.to(dtype)
    if kpm is not None:
        if kpm.dtype == torch.bool:
            key_lengths = _padding_as_lengths(kpm)
            if key_lengths is None:
                pad = (~kpm).view(B, 1, 1, S)
                mask = pad if mask is None else (mask & pad if mask.dtype == torch.bool else
                                                 mask.masked_fill(~pad, float("-inf")))
        else:
            pad = kpm.to(dtype).view(B, 1, 1, S)
            if mask is None:
                mask = pad
            elif mask.dtype == torch.bool:
                mask = torch.zeros((), dtype=dtype, device=pad.device).masked_fill(~mask, float("-inf")) + pad
            else:
                mask = mask + pad
    return mask, key_lengths


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on fastseq's flash attention.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None), as torch.

    need_weights=True: the flash kernel never forms the attention matrix, so the weights are
    computed separately (softmax(q k^T / sqrt(d) + mask), one more T x S pass per head) and the
    output still comes from the fused kernel.  Pass need_weights=False to skip that cost.
    Layers with bias_k/bias_v or add_zero_attn, and need_weights=True together with dropout in
    training (torch returns the dropped weights), run torch's own forward.  Dropout otherwise
    runs in the fused kernel, with fastseq's own counter-based masks (not torch's).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        dropout = self.dropout if self.training else 0.0
        if self.bias_k is not None or self.add_zero_attn or (dropout > 0 and need_weights):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal=True is a hint that attn_mask is causal and needs "
                             "attn_mask (torch's rule); got attn_mask=None")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"MultiheadAttention: expected 2-D or 3-D query, key, value of one rank, got "
                             f"{query.dim()}D, {key.dim()}D, {value.dim()}D")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiheadAttention: expected query with {self.embed_dim} features, got {query.shape[-1]}")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, B, E) as torch's functional form
        T, B, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q = q.view(T, B, H, hd).permute(1, 2, 0, 3)                      # (B, H, T, hd)
        k = k.view(S, B, H, hd).permute(1, 2, 0, 3)                      # (B, H, S, hd)
        v = v.view(S, B, H, hd).permute(1, 2, 0, 3)                      # (B, H, S, hd)
        if is_causal and key_padding_mask is None:
            mask, key_lengths, causal = None, None, True                 # trust the hint, as torch
        else:
            mask, key_lengths = _merge_masks(attn_mask, key_padding_mask, B, H, T, S, q.dtype)
            causal = False
        o = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                         key_lengths=key_lengths)
        o = o.permute(2, 0, 1, 3).reshape(T, B, E)                       # (T, B, E)
        out = F.linear(o, self.out_proj.weight, self.out_proj.bias)
        weights = None
        if need_weights:
            weights = self._weights(q, k, mask, key_lengths, causal, average_attn_weights)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w = self.in_proj_weight.chunk(3)
            b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            return F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return (F.linear(query, self.q_proj_weight, b[0]), F.linear(key, self.k_proj_weight, b[1]),
                F.linear(value, self.v_proj_weight, b[2]))

    @staticmethod
    def _weights(q, k, mask, key_lengths, causal, average):
        """softmax(q k^T / sqrt(d) + mask), (B, H, T, S); averaged over heads when asked."""
        s = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
        T, S = s.shape[-2:]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        if causal:
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        if key_lengths is not None:
            s = s.masked_fill(torch.arange(S, device=s.device).view(1, 1, 1, S) >= key_lengths.view(-1, 1, 1, 1),
                              float("-inf"))
        w = torch.softmax(s, dim=-1)
        return w.mean(dim=1) if average else w
