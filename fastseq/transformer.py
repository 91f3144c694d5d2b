"""Transformer layers on fastseq attention and layer norm: drop-ins for torch.nn's.

TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and
Transformer keep torch's constructors (inspect.signature included), parameter names,
state_dicts, forward signatures and input checks: each builds torch's module and swaps its
attention and norms for fastseq's twins (sharing the parameters).  Where a layer adds a residual
and then normalizes, it calls the fused add_layer_norm: post-norm `norm(x + f(x))` in one pass,
and in pre-norm layers the add that closes one block is fused with the norm that opens the next
(`add_layer_norm(..., return_sum=True)` gives both the normalized input and the residual stream).

In training mode every dropout of a layer is fused into the pass next to it (fastseq.dropout's
counter-based masks, regenerated in backward, never stored):
    post-norm   x = dropout_add_layer_norm(block(x), x)             norm(x + dropout(block(x)))
    pre-norm    h, x = dropout_add_layer_norm(block(norm(x)), x, return_sum=True)
                out = dropout_add(ff(h), x)                          the layer's last residual add
    ff(x)       = linear2(bias_act_dropout(x W1^T, b1, activation, p))
where block is self-attention or cross-attention (whose own probability dropout is fused into
the attention kernel).  A layer whose dropouts are not nn.Dropout modules, whose activation is
not relu / gelu / gelu_tanh / silu, whose norms are not LayerNorms, that overrides _sa_block or
_ff_block, that has hooks on its submodules, or that runs under autocast runs torch's _sa_block /
_ff_block instead.  In eval mode the layers compute exactly what they did before.

torch's fused inference paths (torch._transformer_encoder_layer_fwd, the nested-tensor
encoder) never run: the layers' forward always runs fastseq's kernels.  Where torch would have
taken them, fastseq gives what they give (padded positions of a nested-tensor encoder are 0)
and raises the exception types they raise.
"""
import warnings
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from .convert import convert
from .dropout import Dropout, bias_act_dropout, dropout_add
from .layer_norm import add_layer_norm, dropout_add_layer_norm
from .multihead_attention import _check_mha, _devices_ok, _is_compiling


def _add_norm(x: Tensor, y: Tensor, norm: torch.nn.Module, return_sum: bool = False):
    """norm(x + y) with the norm module's parameters, fused (a norm that is not a LayerNorm, which a
    user may have swapped in, is called as a module on the sum)."""
    if not isinstance(norm, torch.nn.LayerNorm):
        s = x + y
        return (norm(s), s) if return_sum else norm(s)
    return add_layer_norm(x, y, norm.normalized_shape, norm.weight, norm.bias, norm.eps, return_sum)


def _drop_add_norm(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm, p: float, return_sum: bool = False):
    """norm(dropout(x, p) + residual) with the norm module's parameters, fused (training mode)."""
    return dropout_add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps, p, True,
                                  return_sum)


def _activation_name(act) -> Optional[str]:
    """The bias_act_dropout activation a layer's `activation` computes, or None if not one of them."""
    if act is F.relu or act is torch.relu or type(act) is torch.nn.ReLU:
        return "relu"
    if act is F.gelu:
        return "gelu"
    if type(act) is torch.nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if act is F.silu or type(act) is torch.nn.SiLU:
        return "silu"
    return None


def _dropout_ps(layer, names) -> Optional[tuple]:
    """The probabilities of the layer's dropout modules `names`, or None if one is not a plain
    nn.Dropout (a custom module: the layer runs torch's unfused blocks)."""
    ps = []
    for name in names:
        m = getattr(layer, name, None)
        if type(m) not in (torch.nn.Dropout, Dropout):
            return None
        ps.append(float(m.p))
    return tuple(ps)


def _fused_training_plan(layer, dropout_names, x: Tensor) -> Optional[tuple]:
    """(activation, dropout probabilities) when the layer's training step can run fused, else None.
    Under autocast the feed-forward block stays torch's: its first linear adds the bias in the
    autocast dtype (bf16 / fp16), which a separate bias + activation would not reproduce."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    act = _activation_name(layer.activation)
    ps = _dropout_ps(layer, dropout_names)
    if act is None or ps is None or type(layer.linear1) is not torch.nn.Linear or _hooked(layer):
        return None
    base = torch.nn.TransformerEncoderLayer if isinstance(layer, torch.nn.TransformerEncoderLayer) else \
        torch.nn.TransformerDecoderLayer
    if type(layer)._sa_block is not base._sa_block or type(layer)._ff_block is not base._ff_block:
        return None                                 # a subclass computes its blocks its own way
    norms = [layer.norm1, layer.norm2] + ([layer.norm3] if hasattr(layer, "norm3") else [])
    if any(not isinstance(m, torch.nn.LayerNorm) for m in norms):
        return None
    return act, ps


def _ff_fused(layer, x: Tensor, act: str, p: float) -> Tensor:
    """linear2(dropout(act(linear1(x)))) with bias + activation + dropout in one pass."""
    h = F.linear(x, layer.linear1.weight)                                  # (*, F), bias added below
    return layer.linear2(bias_act_dropout(h, layer.linear1.bias, act, p))  # (*, E)


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's F._canonical_mask: a bool mask (True = masked) as an additive float one."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _hooked(module: Module) -> bool:
    return any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on fastseq kernels (same arguments and state_dict).

    Input checks are torch's (mask dtypes, shapes, the feature count), with the exception type
    torch raises: in eval with batch_first and no grad, torch's fused layer raises RuntimeError
    where its Python path raises AssertionError, and so does this layer.  One difference: in
    that same fused path torch reads a float src_mask / src_key_padding_mask as 0 / -inf only
    (other values give NaN); fastseq adds float masks to the scores as documented, which is
    what torch's own training-mode path computes.
    """

    _native_casts_float_masks = True      # torch's fused layer takes float masks of any dtype

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-05,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        convert(self, _inside=True)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        kpm = src_key_padding_mask
        if _check_mha(self.self_attn, self, src, src, src, kpm, src_mask, False, is_causal,
                      "src_key_padding_mask", "src_mask", "TransformerEncoderLayer", self.norm_first):
            src_mask = src_mask if src_mask is None or src_mask.dtype == torch.bool else src_mask.to(src.dtype)
            kpm = kpm if kpm is None or kpm.dtype == torch.bool else kpm.to(src.dtype)
        if kpm is not None and src_mask is not None and kpm.dtype != src_mask.dtype:
            # torch's layer turns both into float masks (and has warned): its attention sees those
            kpm = _float_mask(kpm, src.dtype) if kpm.dtype == torch.bool else kpm
            src_mask = _float_mask(src_mask, src.dtype) if src_mask.dtype == torch.bool else src_mask
        x = src
        plan = _fused_training_plan(self, ("dropout1", "dropout", "dropout2"), x) if self.training else None
        if plan is not None:
            return self._fused_forward(x, src_mask, kpm, is_causal, *plan)
        if self.norm_first:
            x_sa = self._sa_block(self.norm1(x), src_mask, kpm, is_causal)
            h, x = _add_norm(x, x_sa, self.norm2, return_sum=True)     # norm2(x + sa), x + sa
            return x + self._ff_block(h)
        x = _add_norm(x, self._sa_block(x, src_mask, kpm, is_causal), self.norm1)
        return _add_norm(x, self._ff_block(x), self.norm2)

    def _fused_forward(self, x, src_mask, kpm, is_causal, act, ps):
        """Training mode with every dropout fused (module docstring); x (B, T, E) or (T, B, E)."""
        p1, p, p2 = ps

        def sa(h):
            return self.self_attn(h, h, h, attn_mask=src_mask, key_padding_mask=kpm, need_weights=False,
                                  is_causal=is_causal)[0]
        if self.norm_first:
            h, x = _drop_add_norm(sa(self.norm1(x)), x, self.norm2, p1, return_sum=True)   # norm2(x + sa), x + sa
            return dropout_add(_ff_fused(self, h, act, p), x, p2)
        x = _drop_add_norm(sa(x), x, self.norm1, p1)
        return _drop_add_norm(_ff_fused(self, x, act, p), x, self.norm2, p2)

    def _torch_native(self, src, key, value, src_mask, src_key_padding_mask) -> bool:
        """Whether torch's TransformerEncoderLayer.forward would run this call on its fused path
        (its conditions, in its order), or its self-attention on torch's native MHA path (no
        masks: torch hands its attention float masks, which keep that path off).  Only for
        choosing the exception type torch would raise; never on the hot path."""
        sa = self.self_attn
        fused = torch.backends.mha.get_fastpath_enabled() and src.dim() == 3 and not self.training and \
            sa.batch_first and sa.in_proj_bias is not None and sa._qkv_same_embed_dim and \
            self.activation_relu_or_gelu and self.norm1.eps == self.norm2.eps and \
            not (src.is_nested and (src_mask is not None or src_key_padding_mask is not None)) and \
            sa.num_heads % 2 == 0 and not torch.is_autocast_enabled() and not _hooked(self)
        if fused:
            args = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                    self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
                    self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)
            fused = not torch.overrides.has_torch_function(args) and _devices_ok(args) and \
                not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args))
        if fused:
            return True
        return src_mask is None and src_key_padding_mask is None and not self.norm_first and \
            sa._torch_native(src, src, src, None, None)


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer on fastseq kernels (same arguments and state_dict).
    Input checks are those of torch's attention modules (fastseq.nn.MultiheadAttention's)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-05,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        convert(self, _inside=True)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        plan = _fused_training_plan(self, ("dropout1", "dropout2", "dropout", "dropout3"), x) if self.training else None
        if plan is not None and not (self.norm_first and x.shape[-1] != self.self_attn.embed_dim):
            return self._fused_forward(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                                       tgt_is_causal, memory_is_causal, *plan)
        if self.norm_first:
            if x.shape[-1] != self.self_attn.embed_dim:          # torch's norm1 raises first
                raise RuntimeError(f"TransformerDecoderLayer: given normalized_shape=[{self.self_attn.embed_dim}], "
                                   f"expected input with shape [*, {self.self_attn.embed_dim}], but got input of "
                                   f"size {list(x.shape)}")
            x_sa = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = _add_norm(x, x_sa, self.norm2, return_sum=True)
            x_ca = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = _add_norm(x, x_ca, self.norm3, return_sum=True)
            return x + self._ff_block(h)
        x = _add_norm(x, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), self.norm1)
        x = _add_norm(x, self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal),
                      self.norm2)
        return _add_norm(x, self._ff_block(x), self.norm3)

    def _fused_forward(self, x, memory, tgt_mask, memory_mask, tgt_kpm, memory_kpm, tgt_is_causal,
                       memory_is_causal, act, ps):
        """Training mode with every dropout fused (module docstring)."""
        p1, p2, p, p3 = ps

        def sa(h):
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_kpm, is_causal=tgt_is_causal,
                                  need_weights=False)[0]

        def ca(h):
            return self.multihead_attn(h, memory, memory, attn_mask=memory_mask, key_padding_mask=memory_kpm,
                                       is_causal=memory_is_causal, need_weights=False)[0]
        if self.norm_first:
            h, x = _drop_add_norm(sa(self.norm1(x)), x, self.norm2, p1, return_sum=True)
            h, x = _drop_add_norm(ca(h), x, self.norm3, p2, return_sum=True)
            return dropout_add(_ff_fused(self, h, act, p), x, p3)
        x = _drop_add_norm(sa(x), x, self.norm1, p1)
        x = _drop_add_norm(ca(x), x, self.norm2, p2)
        return _drop_add_norm(_ff_fused(self, x, act, p), x, self.norm3, p3)


def _no_nesting_reason(layer) -> str:
    """torch.nn.TransformerEncoder.__init__'s reasons not to use nested tensors ('' if none)."""
    if not isinstance(layer, torch.nn.TransformerEncoderLayer):
        return "not a TransformerEncoderLayer"
    sa = layer.self_attn
    if layer.norm_first or not sa.batch_first or not sa._qkv_same_embed_dim or sa.in_proj_bias is None or \
            not layer.activation_relu_or_gelu or layer.norm1.eps != layer.norm2.eps or sa.num_heads % 2 == 1:
        return "layer configuration"
    return ""


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder over fastseq layers.

    enable_nested_tensor defaults to True as in torch, but torch's nested-tensor path never
    runs (use_nested_tensor is False: it would bypass the layers' forward, and fastseq's kernels
    take right padding as key lengths instead).  Where torch would have run it (eval, no grad,
    batch_first post-norm layers with an even head count, a src_key_padding_mask, no mask; see
    _torch_nests), torch's output at padded positions is 0 (before the final norm); fastseq
    gives 0 there too, so outputs match torch's everywhere.  Its input checks are torch's.  (One
    difference: when every sequence of the batch is fully padded, torch's nested path raises
    RuntimeError in to_padded_tensor; fastseq returns the zero rows, normalized.)
    """

    def __init__(self, encoder_layer: "TransformerEncoderLayer", num_layers: int, norm: Optional[Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        self._torch_nested = self.use_nested_tensor    # what torch decided; read by _torch_nests
        self.use_nested_tensor = False
        convert(self, _inside=True)

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        kpm = src_key_padding_mask
        if kpm is not None:                                 # torch's F._canonical_mask checks
            if kpm.dtype != torch.bool and not kpm.dtype.is_floating_point:
                raise AssertionError(f"TransformerEncoder: only bool and floating types of src_key_padding_mask are "
                                     f"supported, got {kpm.dtype}")
            if mask is not None and mask.dtype != kpm.dtype:
                warnings.warn("Support for mismatched src_key_padding_mask and mask is deprecated. Use same type "
                              f"for both instead (got {kpm.dtype} and {mask.dtype}).", stacklevel=2)
                if mask.dtype.is_floating_point or mask.dtype == torch.bool:   # torch passes float masks on
                    kpm = _float_mask(kpm, src.dtype) if kpm.dtype == torch.bool else kpm
                    mask = _float_mask(mask, src.dtype) if mask.dtype == torch.bool else mask
        if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise AssertionError(f"TransformerEncoder: only bool and floating types of mask are supported, got "
                                 f"{mask.dtype}")
        pad = None
        if kpm is not None and self._torch_nests(src, mask, kpm):
            pad = kpm if kpm.dtype == torch.bool else kpm != 0      # torch: not kpm.logical_not()
            kpm = pad                                              # the nested layers see only the lengths
        first = self.layers[0]
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, first.self_attn.batch_first))
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if pad is not None:
            output = output.masked_fill(pad.unsqueeze(-1), 0.0)    # torch's to_padded_tensor(0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _torch_nests(self, src, mask, kpm) -> bool:
        """Whether torch.nn.TransformerEncoder.forward would run the layers on a nested tensor
        (its conditions, in its order; the mask check raises RuntimeError for a padding mask of
        the wrong shape, as torch's).  Called only with a src_key_padding_mask."""
        nested = self.__dict__.get("_torch_nested")
        if nested is None:              # converted from torch's module: its use_nested_tensor was reset
            nested = self.enable_nested_tensor and not _no_nesting_reason(self.layers[0])
        first = self.layers[0]
        mask_check = getattr(self, "mask_check", True)
        if not nested or not torch.backends.mha.get_fastpath_enabled() or first.training or src.dim() != 3:
            return False
        if mask_check:
            if _is_compiling():
                return False
            if kpm.dim() != 2 or kpm.shape != src.shape[:2]:      # torch's mask check raises RuntimeError
                raise RuntimeError(f"TransformerEncoder: expected src_key_padding_mask of shape "
                                   f"{list(src.shape[:2])} (batch, source length), got {list(kpm.shape)}")
        if src.is_nested or mask is not None or torch.is_autocast_enabled():
            return False
        sa = first.self_attn
        args = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
        if torch.overrides.has_torch_function(args) or not _devices_ok(args) or \
                (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
            return False
        # torch tests left alignment before the conditions above; its value only matters here
        return not mask_check or bool(torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not()))


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder over fastseq layers."""

    def __init__(self, decoder_layer: "TransformerDecoderLayer", num_layers: int,
                 norm: Optional[Module] = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        convert(self, _inside=True)


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer on fastseq kernels: same arguments, initialization and state_dict."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, custom_encoder: Optional[Any] = None,
                 custom_decoder: Optional[Any] = None, layer_norm_eps: float = 1e-05, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
                         custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias, device, dtype)
        convert(self, _inside=True)
