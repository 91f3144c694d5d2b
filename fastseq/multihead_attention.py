"""fastseq.nn.MultiheadAttention: torch.nn.MultiheadAttention on the flash attention kernels.

Same constructor, parameters, state_dict keys, forward signature and return values as torch's.
The attention itself runs through fastseq.functional.scaled_dot_product_attention; masks are
passed on without expanding them to (B, heads, T, S): a right-padded key_padding_mask becomes
per-sequence key lengths (padded key tiles are skipped), other masks are read in place.

Input validation mirrors torch's (F._canonical_mask, F._mha_shape_check and the checks of
F.multi_head_attention_forward), with torch's exception types, before anything runs: see
_check_mha.  The checks are attribute reads and comparisons (no tensor ops), so they cost
next to nothing per decoding step.
"""
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import scaled_dot_product_attention


def _is_compiling() -> bool:
    return _compiler_is_compiling is not None and _compiler_is_compiling()


_compiler_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


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
            # the lengths test reads the mask's values: not while torch.compile traces (a graph break)
            key_lengths = None if _is_compiling() else _padding_as_lengths(kpm)
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


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for `device_type`, else None."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except TypeError:                                                    # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _mask_dtype_error(float_dtype, query, need_weights) -> Optional[str]:
    """Whether torch's attention would accept float masks merging to `float_dtype` for this
    query (None) or not (the message).  Torch adds the masks to the scores with baddbmm
    (need_weights=True: the scores' dtype only) or hands them to SDPA (float32 or the query's
    dtype); under autocast both cast every floating mask but a float64 one to the autocast
    dtype, as they cast the projected query.  Read only when a float mask's dtype differs from
    the query's."""
    qd = query.dtype
    md = float_dtype
    ad = _autocast_dtype(query.device.type)
    if ad is not None:
        if qd != torch.float64:
            qd = ad
        if md != torch.float64:
            md = ad
    if md == qd or (not need_weights and md == torch.float32):
        return None
    return (f"expected float masks of the attention's dtype {qd}{'' if need_weights else ' or torch.float32'}, "
            f"got {float_dtype}")


def _check_mha(mha, owner, query, key, value, key_padding_mask, attn_mask, need_weights, is_causal,
               kpm_name="key_padding_mask", mask_name="attn_mask", where="MultiheadAttention",
               norm_first=False) -> bool:
    """torch's input checks of MultiheadAttention.forward, in torch's order, with its exception
    types: AssertionError for a mask neither bool nor floating (F._canonical_mask), for ranks
    (F._mha_shape_check), the embedding dim, key vs value and the key_padding_mask's shape;
    RuntimeError for the attn_mask's shape, an is_causal hint without attn_mask and float masks
    of another dtype.  A UserWarning, as torch's, for a bool mask with a float one.

    Where torch's forward would take its native fast path (eval, self-attention, batch_first,
    no grad: `owner._torch_native(...)`), torch's fused kernel raises RuntimeError for the
    shape errors its Python path raises AssertionError for; fastseq raises the type torch
    would for the same call.  `owner._torch_native` is only evaluated when raising.

    norm_first: the query goes through a LayerNorm first (pre-norm Transformer layers), whose
    RuntimeError for the wrong feature count comes before the attention's checks.
    Returns True when float masks must be cast to the query's dtype: torch's fused encoder layer
    (owner._native_casts_float_masks) takes float masks of any dtype."""
    if key_padding_mask is not None:
        kd = key_padding_mask.dtype
        if kd != torch.bool and not kd.is_floating_point:
            raise AssertionError(f"{where}: only bool and floating types of {kpm_name} are supported, got {kd}")
        if attn_mask is not None and attn_mask.dtype != kd:
            warnings.warn(f"Support for mismatched {kpm_name} and {mask_name} is deprecated. Use same type for "
                          f"both instead (got {kd} and {attn_mask.dtype}).", stacklevel=3)
    if attn_mask is not None:
        ad = attn_mask.dtype
        if ad != torch.bool and not ad.is_floating_point:
            raise AssertionError(f"{where}: only bool and floating types of {mask_name} are supported, got {ad}")

    qs, ks, vs = query.shape, key.shape, value.shape
    E = mha.embed_dim
    if norm_first and qs[-1] != E:
        raise RuntimeError(f"{where}: given normalized_shape=[{E}], expected input with shape [*, {E}], but got "
                           f"input of size {list(qs)}")
    native = (owner, query, key, value, attn_mask, key_padding_mask)   # for _fail, read only when raising
    qdim = len(qs)
    if qdim == 3:
        if len(ks) != 3 or len(vs) != 3:
            raise AssertionError(f"{where}: for batched (3-D) query, expected key and value to be 3-D but found "
                                 f"{len(ks)}-D and {len(vs)}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            _fail(native, AssertionError, f"{where}: for batched (3-D) query, expected {kpm_name} to be None or "
                  f"2-D (N, S) but found a {key_padding_mask.dim()}-D tensor of shape "
                  f"{list(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            _fail(native, AssertionError, f"{where}: for batched (3-D) query, expected {mask_name} to be None, 2-D "
                  f"or 3-D but found a {attn_mask.dim()}-D tensor of shape {list(attn_mask.shape)}")
        if mha.batch_first:
            B, T, S, kB = qs[0], qs[1], ks[1], ks[0]
        else:
            T, B, S, kB = qs[0], qs[1], ks[0], ks[1]
    elif qdim == 2:
        if len(ks) != 2 or len(vs) != 2:
            raise AssertionError(f"{where}: for unbatched (2-D) query, expected key and value to be 2-D but found "
                                 f"{len(ks)}-D and {len(vs)}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(f"{where}: for unbatched (2-D) query, expected {kpm_name} to be None or 1-D (S,) "
                                 f"but found a {key_padding_mask.dim()}-D tensor of shape "
                                 f"{list(key_padding_mask.shape)}")
        T, B, S, kB = qs[0], 1, ks[0], 1
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(f"{where}: for unbatched (2-D) query, expected {mask_name} to be None, 2-D or "
                                     f"3-D but found a {attn_mask.dim()}-D tensor of shape {list(attn_mask.shape)}")
            if attn_mask.dim() == 3 and attn_mask.shape != (mha.num_heads, T, S):
                raise AssertionError(f"{where}: expected {mask_name} shape to be {(mha.num_heads, T, S)} but got "
                                     f"{tuple(attn_mask.shape)}")
    else:
        raise AssertionError(f"{where}: query should be unbatched 2D or batched 3D tensor but received {qdim}-D "
                             f"query tensor of shape {list(qs)}")
    if is_causal and attn_mask is None:
        raise RuntimeError(f"{where}: is_causal=True is a hint that {mask_name} is the causal mask and needs "
                           f"{mask_name} (torch's rule); got {mask_name}=None.  Transformer."
                           "generate_square_subsequent_mask makes one")
    if qs[-1] != E:
        _fail(native, AssertionError, f"{where}: was expecting embedding dimension of {E}, but got query of shape "
              f"{list(qs)}")
    if mha._qkv_same_embed_dim:
        if ks != vs:
            raise AssertionError(f"{where}: key shape {list(ks)} does not match value shape {list(vs)}")
    elif ks[:-1] != vs[:-1]:
        raise AssertionError(f"{where}: key's sequence and batch dims {list(ks[:-1])} do not match value's "
                             f"{list(vs[:-1])}")
    if kB != B:
        raise RuntimeError(f"{where}: query (shape {list(qs)}) and key (shape {list(ks)}) have different batch "
                           f"sizes, {B} and {kB}")
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (T, S):
                raise RuntimeError(f"{where}: the shape of the 2D {mask_name} is {tuple(attn_mask.shape)}, but "
                                   f"should be {(T, S)} (target length, source length)")
        elif attn_mask.shape != (B * mha.num_heads, T, S):
            raise RuntimeError(f"{where}: the shape of the 3D {mask_name} is {tuple(attn_mask.shape)}, but should "
                               f"be {(B * mha.num_heads, T, S)} (batch * num_heads, target length, source length)")
    if key_padding_mask is not None:
        kps = key_padding_mask.shape
        if qdim == 3 and kps[0] != B:
            _fail(native, AssertionError, f"{where}: expected {kpm_name}.shape[0] to be the batch size {B}, but got "
                  f"{kpm_name} of shape {list(kps)}")
        if kps[-1] != S:
            _fail(native, AssertionError, f"{where}: expected {kpm_name}.shape[-1] to be the source length {S}, "
                  f"but got {kpm_name} of shape {list(kps)}")
    # float masks: the dtype the scores are added in (a bool mask becomes one of the query's dtype)
    fd = None
    if attn_mask is not None and not (is_causal and key_padding_mask is None and not need_weights):
        fd = query.dtype if attn_mask.dtype == torch.bool else attn_mask.dtype
    if key_padding_mask is not None:
        kd = query.dtype if key_padding_mask.dtype == torch.bool else key_padding_mask.dtype
        fd = kd if fd is None else torch.promote_types(fd, kd)
    if fd is not None and fd != query.dtype:
        msg = _mask_dtype_error(fd, query, need_weights)
        if msg is not None:
            if owner._native_casts_float_masks and owner._torch_native(query, key, value, attn_mask,
                                                                       key_padding_mask):
                return True
            raise RuntimeError(f"{where}: {msg} ({mask_name} {None if attn_mask is None else attn_mask.dtype}, "
                               f"{kpm_name} {None if key_padding_mask is None else key_padding_mask.dtype}, "
                               f"query {query.dtype})")
    return False


def _fail(native, exc, msg):
    """Raise `exc`, or RuntimeError where torch's native fast path would have run the call
    (native: (owner, query, key, value, attn_mask, key_padding_mask); see _check_mha)."""
    owner, *args = native
    raise (RuntimeError if owner._torch_native(*args) else exc)(msg)


def _devices_ok(tensors) -> bool:
    ok = ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
    return all(t is None or t.device.type in ok for t in tensors)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on fastseq's flash attention.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None), as torch.

    need_weights=True: the flash kernel never forms the attention matrix, so the weights are
    computed separately (softmax(q k^T / sqrt(d) + mask), one more T x S pass per head) and the
    output still comes from the fused kernel.  Pass need_weights=False to skip that cost.
    Layers with bias_k/bias_v or add_zero_attn, need_weights=True together with dropout in
    training (torch returns the dropped weights), and nested-tensor inputs run torch's own
    forward.  Dropout otherwise runs in the fused kernel, with fastseq's own counter-based masks
    (not torch's).

    Bad input raises what torch's raises (see _check_mha), with one deliberate difference:
    is_causal=True without attn_mask always raises RuntimeError, as torch's Python path does;
    torch's native fast path (eval, batch_first self-attention, no grad) ignores the hint and
    silently attends to every key.  Under autocast the projections run in the autocast dtype
    (F.linear is autocast-listed), the attention gets bf16/fp16 q, k, v and runs on torch's
    SDPA (fastseq's CPU kernels take fp32/fp64), and the output has torch's dtype.
    """

    _native_casts_float_masks = False

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        dropout = self.dropout if self.training else 0.0
        if self.bias_k is not None or self.add_zero_attn or (dropout > 0 and need_weights) or query.is_nested:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        _check_mha(self, self, query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        return self._attend(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                            is_causal, dropout)

    def _torch_native(self, query, key, value, attn_mask, key_padding_mask) -> bool:
        """Whether torch's MultiheadAttention.forward would run this call on its native fast path
        (torch._native_multi_head_attention): its conditions, in its order.  Only for choosing
        the exception type torch would raise; never on the hot path."""
        if (attn_mask is not None and attn_mask.is_floating_point()) or \
                (key_padding_mask is not None and key_padding_mask.is_floating_point()):
            return False
        w, b = self.in_proj_weight, self.in_proj_bias
        if not torch.backends.mha.get_fastpath_enabled() or query.dim() != 3 or query is not key or \
                key is not value or w is None or b is None or query.dtype != b.dtype or query.dtype != w.dtype or \
                self.training or self.num_heads % 2 or not self.batch_first or self.bias_k is not None or \
                self.bias_v is not None or self.add_zero_attn or not self._qkv_same_embed_dim or \
                torch.is_autocast_enabled():
            return False
        args = (query, key, value, w, b, self.out_proj.weight, self.out_proj.bias)
        if torch.overrides.has_torch_function(args) or not _devices_ok(args):
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args))

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal, dropout):
        """The fused forward, on checked inputs."""
        batched = query.dim() == 3
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
