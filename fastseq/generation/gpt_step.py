"""GPT's fused decode step: one compiled call (kernels/cpu/decode.pyx) runs a whole step -- the
embedding, every layer with its KV-cache write and attention over the cache, the final norm and
the output layer -- for one new token per row.  GPT.forward takes it for a one-token step with a
cache in inference (eval mode or no dropout, no gradient wanted) on the CPU; its reference is
GPT's own module-by-module path (`fastseq.use_backend("torch")` forces it), which the tests
compare it to.

Registered with the dispatcher as op "gpt_decode_step" (backends "cpu" and "torch"), so
`fastseq.explain("gpt_decode_step", model, tokens, cache)` says which one a call takes and why.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _blas, _dispatch, _library
from ..dropout import ACTIVATIONS
from .cache import KVCache

OP = "gpt_decode_step"


def _facts(model, tokens: Tensor, cache) -> dict:
    c = model.config
    w = model.tok_emb.weight
    dropout = model.training and max(c.dropout, c.attention_dropout, c.embedding_dropout) > 0
    kv = getattr(cache, "kv", None)
    return {"device": w.device.type, "dtype": w.dtype, "tokens_device": tokens.device.type,
            "tokens_dtype": tokens.dtype, "cache": type(cache).__name__, "cache_dtype": getattr(kv, "dtype", None),
            "cache_device": getattr(getattr(kv, "device", None), "type", None),
            "dropout": dropout, "grad": torch.is_grad_enabled() and w.requires_grad}


def _cpu_reasons(f: dict) -> List[str]:
    out = []
    if f["dtype"] not in (torch.float32, torch.float64):
        out.append(f"the fused step runs fp32 and fp64, got {f['dtype']}")
    if f["tokens_device"] != "cpu" or f["tokens_dtype"] not in (torch.int64, torch.int32):
        out.append(f"tokens must be int64 or int32 on the CPU, got {f['tokens_dtype']} on {f['tokens_device']}")
    if f["cache"] != "KVCache" or f["cache_dtype"] != f["dtype"] or f["cache_device"] != "cpu":
        out.append(f"the cache must be a CPU KVCache of the model's dtype, got {f['cache']} of {f['cache_dtype']} "
                   f"on {f['cache_device']}")
    if f["dropout"]:
        out.append("training with dropout (the fused step is inference only)")
    if f["grad"]:
        out.append("gradients are wanted (the fused step has no backward; use torch.no_grad())")
    return out


_dispatch.register_op(OP, _facts, cpu=_cpu_reasons, torch=lambda f: [])


def backend(model, tokens: Tensor, cache) -> str:
    """"cpu" when the fused step can run this call, else "torch" (GPT's module path)."""
    if _library.transformed() or torch.compiler.is_compiling():
        return "torch"
    w = model.tok_emb.weight
    kv = getattr(cache, "kv", None)
    key = (w.device, w.dtype, tokens.device, tokens.dtype, type(cache), getattr(kv, "dtype", None),
           getattr(kv, "device", None),
           model.training and max(model.config.dropout, model.config.attention_dropout,
                                  model.config.embedding_dropout) > 0,
           torch.is_grad_enabled() and w.requires_grad)
    return _dispatch.choose_cached(OP, key, _facts, model, tokens, cache)


def _slots(model) -> List[Tuple[nn.Module, str]]:
    """(module, parameter name) of every tensor the step reads, in decode.pyx's table order."""
    out = []
    for b in model.blocks:
        for m in (b.ln_1, b.attn.qkv, b.attn.proj, b.ln_2, b.mlp.fc, b.mlp.proj):
            out += [(m, "weight"), (m, "bias")]
    head = model.tok_emb if model.head is None else model.head
    return out + [(model.tok_emb, "weight"), (model.pos_emb, "weight"), (model.ln_f, "weight"), (model.ln_f, "bias"),
                  (head, "weight")]


class _Table:
    """A model's weight table (the addresses decode.pyx reads), kept on the model and reused while
    every slot still holds the same contiguous tensor at the same address: checking that is ~80
    dictionary lookups, gathering the slots again through nn.Module attributes ~150 us a step."""

    def __init__(self, model):
        self.slots = [(m._parameters, name, m._parameters[name]) for m, name in _slots(model)]
        self.addresses = [t.data_ptr() for _, _, t in self.slots]
        self.contiguous = all(t.is_contiguous() for _, _, t in self.slots)
        w = model.tok_emb.weight                 # the step reads every slot as the model's dtype, on the CPU
        self.uniform = all(t.dtype == w.dtype and t.device.type == "cpu" for _, _, t in self.slots)
        self.table = torch.tensor(self.addresses, dtype=torch.int64)

    def valid(self) -> bool:
        for (params, name, t), address in zip(self.slots, self.addresses):
            if params.get(name) is not t or t.data_ptr() != address:
                return False
        return True


def _table(model) -> _Table:
    t = model.__dict__.get("_fused_step_table")
    if t is None or not t.valid():
        t = model.__dict__["_fused_step_table"] = _Table(model)
    return t


def decode_step(model, tokens: Tensor, cache: KVCache, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The logits of one new token per row, appended to the cache (GPT.forward's T = 1 step).

    Args:
        model: a GPT.
        tokens: the new token ids.
        cache: the model's KVCache holding n positions; the token goes to position n.
        attention_mask: None, or 1 = token, 0 = left padding over the n + 1 positions.
    Returns:
        logits.
    Shapes:
        tokens (B, 1); attention_mask (B, n + 1); logits (B, 1, V).
    """
    c = model.config
    B = tokens.shape[0]
    n = cache.length
    k = _blas.cpu_kernels("decode")
    if tokens.dim() != 2 or tokens.shape[1] != 1:
        raise ValueError(f"GPT: the fused step takes one token a row, (B, 1), got {tuple(tokens.shape)}")
    if cache.batch_size != B:
        raise ValueError(f"GPT: the cache holds {cache.batch_size} rows, the step has {B}")
    if n + 1 > c.max_positions:
        raise ValueError(f"GPT: sequence length {n + 1} exceeds max_positions {c.max_positions}")
    cache.check_room(1)
    t = _table(model)
    if not t.uniform:
        raise ValueError("GPT: the fused step needs every parameter on the CPU in the model's dtype, got "
                         + ", ".join(sorted({f"{w.dtype} on {w.device}" for _, _, w in t.slots})))
    keep = None
    if t.contiguous:
        table = t.table
    else:                                                                  # a strided weight: contiguous copies
        keep = [w.detach().contiguous() for _, _, w in t.slots]
        table = torch.tensor([w.data_ptr() for w in keep], dtype=torch.int64)
    tok = tokens.reshape(B).to(torch.int64).contiguous()
    if attention_mask is not None and tuple(attention_mask.shape) != (B, n + 1):
        raise ValueError(f"GPT: attention_mask must be (B, cached + new) = ({B}, {n + 1}), got "
                         f"{tuple(attention_mask.shape)}")
    mask = None if attention_mask is None else attention_mask.to("cpu", torch.int64).contiguous()
    nt = _dispatch.num_threads()
    dtype = cache.kv.dtype
    ws = torch.empty(k.workspace_size(B, c.dim, c.ffn_dim, cache.max_length, nt), dtype=dtype)
    logits = torch.empty(B, 1, c.vocab_size, dtype=dtype)
    origin = cache.origin                  # its positions >= n already name row i (KVCache.reorder)
    rc = k.gpt_step(table.data_ptr(), tok.data_ptr(), 0 if origin is None else origin.data_ptr(),
                    0 if mask is None else mask.data_ptr(), cache.kv.data_ptr(),
                    ws.data_ptr(), logits.data_ptr(), B, cache.kv.shape[2], c.dim, c.heads, c.ffn_dim, c.layers, c.vocab_size,
                    cache.max_length, n, ACTIVATIONS.index(c.activation), c.layer_norm_eps, nt,
                    dtype == torch.float64)
    if rc != 0:
        bad = tok[(tok < 0) | (tok >= c.vocab_size)].tolist()
        raise ValueError(f"GPT: token ids must be in [0, vocab_size={c.vocab_size}), got {bad}")
    del keep
    cache.advance(1)
    return logits
