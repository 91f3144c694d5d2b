"""GPT: a decoder-only Transformer language model with GPT-2's architecture.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): learned
token and position embeddings, a stack of pre-norm blocks

    h   = x + dropout(attention(ln_1(x)))          causal multi-head self-attention
    out = h + dropout(mlp(ln_2(h)))                mlp(u) = proj(gelu_tanh(fc(u))), 4x wide

a final LayerNorm, and an output layer tied to the token embedding.  Dropout (p) on the
embeddings' sum, on the attention probabilities and on both residual branches.  Initialization:
normal(0, 0.02) for every weight matrix and embedding, zero biases, and the two projections that
write into the residual stream (attention's and the mlp's) at 0.02 / sqrt(2 * layers).

On fastseq's ops every residual add is fused with the norm that follows it: a block hands back
its mlp output and its residual stream, and the model calls
dropout_add_layer_norm(mlp_out, h, <next block's ln_1 or ln_f>, return_sum=True), which gives
both the next block's normalized input and its residual stream in one pass.  Attention runs on
fastseq's flash-style kernel (causal, dropout inside), the mlp's bias + GELU in one pass, and the
head is fused into the loss (fastseq.functional.linear_cross_entropy): the (B T, V) logits are
formed only by forward(), never by loss().

State_dict keys (GPT.from_hf maps Hugging Face's names onto these, transposing its Conv1D weights):
    tok_emb.weight (V, E)   pos_emb.weight (P, E)
    blocks.{i}.ln_1.{weight,bias} (E)       blocks.{i}.attn.qkv.{weight (3E, E), bias (3E)}
    blocks.{i}.attn.proj.{weight (E, E), bias}   blocks.{i}.ln_2.{weight,bias}
    blocks.{i}.mlp.fc.{weight (F, E), bias (F)}  blocks.{i}.mlp.proj.{weight (E, F), bias (E)}
    ln_f.{weight,bias}      head.weight (V, E) -- only when tie_weights=False

batch (loss): {"tokens": (B, T) int64, "targets": (B, T) int64, -100 where no loss is taken}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as FF
from .. import nn as fnn
from ..generation import gpt_step
from ..generation.cache import KVCache

ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    max_positions: int = 1024             # P: the longest sequence
    dim: int = 768                        # E
    layers: int = 12
    heads: int = 12                       # NH; head dim D = E / NH
    ffn_dim: Optional[int] = None         # F: the mlp's width, 4 E when None
    dropout: float = 0.1                  # residual branches (and embeddings / attention when theirs are None)
    attention_dropout: Optional[float] = None
    embedding_dropout: Optional[float] = None
    activation: str = "gelu_tanh"         # GPT-2's "gelu_new"
    layer_norm_eps: float = 1e-5
    tie_weights: bool = True              # output layer = token embedding

    def __post_init__(self):
        for name in ("vocab_size", "max_positions", "dim", "layers", "heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.heads:
            raise ValueError(f"GPTConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        if not isinstance(self.ffn_dim, int) or self.ffn_dim < 1:
            raise ValueError(f"GPTConfig.ffn_dim must be a positive int, got {self.ffn_dim!r}")
        for name in ("dropout", "attention_dropout", "embedding_dropout"):
            p = getattr(self, name)
            if p is None:
                setattr(self, name, self.dropout)
            elif not 0.0 <= p < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {p!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# ============================================================================ blocks

class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, each position seeing itself and the positions before it."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads, self.p = c.heads, c.attention_dropout
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def forward(self, u: Tensor, cache=None, layer: int = 0, visible: Optional[Tensor] = None) -> Tensor:
        """u (B, T, E).  With a KVCache: the T new keys / values are written at the cache's end and
        the queries attend over every position it holds (read in place); visible (B, 1, T, S) bool,
        True where a query may see a key, or None (then: causal over T fresh positions, or all)."""
        B, T, E = u.shape
        NH = self.heads
        q, k, v = self.qkv(u).view(B, T, 3, NH, E // NH).permute(2, 0, 3, 1, 4)   # 3 x (B, NH, T, D)
        causal = visible is None and (cache is None or cache.length == 0)
        if cache is not None:
            k, v = cache.write(layer, k, v)                                       # 2 x (B, NH, S, D)
        o = FF.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=self.p if self.training else 0.0,
                                            is_causal=causal and T > 1)           # (B, NH, T, D)
        o = o.transpose(1, 2).reshape(B, T, E)                                    # (B, T, E)
        return self.proj(o)


class MLP(nn.Module):
    """proj(act(fc(u))): the bias + activation run fused after a bias-free GEMM."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.activation = c.activation
        self.fc = nn.Linear(c.dim, c.ffn_dim)
        self.proj = nn.Linear(c.ffn_dim, c.dim)

    def forward(self, u: Tensor) -> Tensor:
        a = torch.nn.functional.linear(u, self.fc.weight)                         # (B, T, F)
        return self.proj(FF.bias_act_dropout(a, self.fc.bias, self.activation, 0.0, self.training))


class Block(nn.Module):
    """One pre-norm block.  forward(u, x) takes the residual stream x and u = ln_1(x) (computed by
    the caller, fused with the add before it) and returns (m, h): h = x + dropout(attn(u)) and the
    mlp's output m; the block's output h + dropout(m) is formed by the caller, fused with the norm
    after it."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.p = c.dropout
        self.ln_1 = fnn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = fnn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, u: Tensor, x: Tensor, cache=None, layer: int = 0, visible: Optional[Tensor] = None):
        a = self.attn(u, cache, layer, visible)
        u2, h = _drop_add_norm(a, x, self.ln_2, self.p, self.training)           # ln_2(h), h: (B, T, E)
        return self.mlp(u2), h


def _positions(B: int, T: int, n: int, attention_mask: Optional[Tensor], device):
    """(positions (B, T) or None for n..n+T-1, visible (B or 1, 1, T, n+T) bool or None) of T new
    tokens after n cached ones.  With a mask (B, n+T), 1 = token, 0 = padding: a token's position
    counts the tokens before it, and a query sees the earlier tokens and itself (a pad query only
    itself, so no row is empty)."""
    S = n + T
    if attention_mask is None:
        if n == 0 or T == 1:
            return None, None                              # causal from position 0, or one query: all
        q = torch.arange(n, S, device=device).view(T, 1)   # a continuation: causal, bottom-right aligned
        return None, (torch.arange(S, device=device).view(1, S) <= q).view(1, 1, T, S)
    if attention_mask.shape != (B, S):
        raise ValueError(f"GPT: attention_mask must be (B, cached + new) = ({B}, {S}), got "
                         f"{tuple(attention_mask.shape)}")
    real = attention_mask.to(device=device, dtype=torch.bool)                            # (B, S)
    pos = (real.long().cumsum(1) - 1).masked_fill_(~real, 1)[:, n:]                       # (B, T), HF's rule
    q = torch.arange(n, S, device=device).view(T, 1)
    k = torch.arange(S, device=device).view(1, S)
    visible = ((k <= q) & real.view(B, 1, S)) | (k == q)                                 # (B, T, S)
    return pos, visible.view(B, 1, T, S)


def _drop_add_norm(branch: Tensor, residual: Tensor, norm: nn.LayerNorm, p: float, training: bool):
    """(norm(residual + dropout(branch)), residual + dropout(branch)) in one pass."""
    return FF.dropout_add_layer_norm(branch, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps,
                                     p, training, return_sum=True)


# ============================================================================ the model

class GPT(nn.Module):
    """GPT-2-style language model.  forward(tokens (B, T)) -> logits (B, T, V); loss(batch) -> the
    mean next-token cross-entropy with the head fused into the loss."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT(config): expected a GPTConfig, got {type(config).__name__}")
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_positions, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = fnn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.head = None if c.tie_weights else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std, c = 0.02, self.config
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for b in self.blocks:              # the projections into the residual stream
            nn.init.normal_(b.attn.proj.weight, 0.0, std / math.sqrt(2 * c.layers))
            nn.init.normal_(b.mlp.proj.weight, 0.0, std / math.sqrt(2 * c.layers))

    @property
    def output_weight(self) -> Tensor:
        """The output layer's weight (V, E): the token embedding when tied."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def hidden(self, tokens: Tensor, cache=None, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The final normalized hidden states (B, T, E) of tokens (B, T); with a cache (a KVCache of
        new_cache), tokens are the T positions after the cache's and are appended to it."""
        c = self.config
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"GPT: tokens must be (B, T), got shape {tuple(getattr(tokens, 'shape', ()))}")
        B, T = tokens.shape
        n = 0 if cache is None else cache.length
        if n + T > c.max_positions:
            raise ValueError(f"GPT: sequence length {n + T} exceeds max_positions {c.max_positions}")
        if cache is not None:
            cache.check_room(T)
        pos, visible = _positions(B, T, n, attention_mask, tokens.device)
        x = self.tok_emb(tokens) + (self.pos_emb.weight[n:n + T] if pos is None else self.pos_emb(pos))  # (B, T, E)
        x = FF.dropout(x, c.embedding_dropout, self.training)
        first = self.blocks[0].ln_1
        u = FF.layer_norm(x, first.normalized_shape, first.weight, first.bias, first.eps)
        for i, block in enumerate(self.blocks):
            m, h = block(u, x, cache, i, visible)
            norm = self.blocks[i + 1].ln_1 if i + 1 < len(self.blocks) else self.ln_f
            u, x = _drop_add_norm(m, h, norm, c.dropout, self.training)           # next ln_1(x) (or ln_f), x
        if cache is not None:
            cache.advance(T)
        return u                                                                  # (B, T, E)

    def forward(self, tokens: Tensor, cache=None, attention_mask: Optional[Tensor] = None):
        """The next-token logits of every position.

        Args:
            tokens: int64 ids; with a cache, the positions after the cached ones (the whole
                prompt first, then one token a step).
            cache: None, or a KVCache from new_cache, appended to in place.
            attention_mask: None, or 1 = token, 0 = left padding, over every position so far
                (cached and new), as Hugging Face's: a padded position is seen by no other, and
                positions count the tokens only (cumsum(mask) - 1).
        Returns:
            logits, or (logits, cache) when a cache is given.
        Shapes:
            tokens (B, T); attention_mask (B, cache.length + T); logits (B, T, V).
        """
        if cache is not None and isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.shape[1] == 1 \
                and gpt_step.backend(self, tokens, cache) == "cpu":                # one compiled call per step
            return gpt_step.decode_step(self, tokens, cache, attention_mask), cache
        logits = torch.nn.functional.linear(self.hidden(tokens, cache, attention_mask), self.output_weight)
        return logits if cache is None else (logits, cache)                      # (B, T, V)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KVCache for batch_size rows of up to max_length positions (the model's dtype
        and device)."""
        c = self.config
        if not 1 <= max_length <= c.max_positions:
            raise ValueError(f"GPT.new_cache: max_length must be in [1, max_positions={c.max_positions}], "
                             f"got {max_length}")
        w = self.tok_emb.weight
        return KVCache(c.layers, batch_size, c.heads, c.head_dim, max_length, w.dtype, w.device)

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        """Mean cross-entropy over the targets that are not -100 (the logits never formed)."""
        if not isinstance(batch, dict) or "tokens" not in batch or "targets" not in batch:
            raise ValueError(f"GPT.loss: expected a dict with 'tokens' and 'targets', got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        tokens, targets = batch["tokens"], batch["targets"]
        if getattr(targets, "shape", None) != getattr(tokens, "shape", None):
            raise ValueError(f"GPT.loss: targets must have the tokens' shape {tuple(getattr(tokens, 'shape', ()))}, "
                             f"got {tuple(getattr(targets, 'shape', ()))}")
        h = self.hidden(tokens)
        return FF.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output_weight,
                                       targets.reshape(-1), ignore_index=-100,
                                       label_smoothing=label_smoothing, smoothing=smoothing)

    # ------------------------------------------------------------------ Hugging Face weights

    @classmethod
    def from_hf(cls, hf_model, **overrides) -> "GPT":
        """A GPT holding the weights of a Hugging Face GPT2LMHeadModel (or GPT2Model), with its
        config's sizes and dropouts (overrides: GPTConfig fields to change, dropout say).  HF's
        Conv1D layers store weights as (in, out); they are transposed into nn.Linear's (out, in)."""
        hc = hf_model.config
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT.from_hf: scale_attn_by_inverse_layer_idx=True is not GPT-2's attention")
        if not getattr(hc, "scale_attn_weights", True):
            raise ValueError("GPT.from_hf: scale_attn_weights=False is not GPT-2's attention")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}.get(hc.activation_function)
        if act is None:
            raise ValueError(f"GPT.from_hf: activation_function {hc.activation_function!r} is not supported")
        fields = dict(vocab_size=hc.vocab_size, max_positions=hc.n_positions, dim=hc.n_embd, layers=hc.n_layer,
                      heads=hc.n_head, ffn_dim=hc.n_inner, dropout=hc.resid_pdrop, attention_dropout=hc.attn_pdrop,
                      embedding_dropout=hc.embd_pdrop, activation=act, layer_norm_eps=hc.layer_norm_epsilon,
                      tie_weights=bool(getattr(hc, "tie_word_embeddings", True)))
        model = cls(GPTConfig(**(fields | overrides)))
        model.load_state_dict(_hf_state_dict(hf_model.state_dict(), model.config))
        return model


def _hf_state_dict(sd: Dict[str, Tensor], c: GPTConfig) -> Dict[str, Tensor]:
    """Hugging Face GPT-2 keys -> GPT's (see the module docstring)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(c.layers):
        for hf, ours in names.items():
            w, b = sd[f"h.{i}.{hf}.weight"], sd[f"h.{i}.{hf}.bias"]
            out[f"blocks.{i}.{ours}.weight"] = w if hf.startswith("ln") else w.t().contiguous()   # Conv1D: (in, out)
            out[f"blocks.{i}.{ours}.bias"] = b
    if not c.tie_weights:
        if "lm_head.weight" not in sd:
            raise ValueError("GPT.from_hf: the model's config has tie_word_embeddings=False but its state_dict has "
                             "no 'lm_head.weight' (a bare GPT2Model has no output layer: pass a GPT2LMHeadModel)")
        out["head.weight"] = sd["lm_head.weight"]
    return out


def example_batch(config: GPTConfig, B: int, T: int, generator: Optional[torch.Generator] = None,
                  device="cpu") -> Dict[str, Tensor]:
    """Random tokens (B, T) and their next-token targets (B, T): two tensors with their own
    storage (not views of one sequence, so writing -100 into the targets leaves the tokens alone)."""
    seq = torch.randint(0, config.vocab_size, (B, T + 1), generator=generator)
    return {"tokens": seq[:, :-1].clone().to(device), "targets": seq[:, 1:].clone().to(device)}
