"""ELMo: the bidirectional LSTM language model of Peters et al. 2018 ("Deep contextualized word
representations"), with a token embedding in place of its character CNN.

Two language models share the embedding and the output layer (the "softmax") and nothing else:
the forward LM reads the sentence left to right and predicts each next token, the backward LM
reads it right to left and predicts each previous token.  Each is a stack of `layers` LSTMs whose
cells hold `hidden` units and whose outputs are projected to `dim` (torch's proj_size, as ELMo's
LSTMP cells: 4096 cells projected to 512 in the paper), with a residual connection around every
layer after the first:

    e    = Emb[tokens]                                    (B, T, E)
    h_1  = dropout(LSTM_1(e))                             (B, T, E)
    h_k  = h_{k-1} + dropout(LSTM_k(h_{k-1})),  k >= 2
    forward LM:  position t predicts token t + 1 from softmax(h_L W^T + b)
    backward LM: the same stack, its own weights, on each row reversed within its length;
                 position t predicts token t - 1

W is the embedding when tie_weights (ELMo's char-CNN could not tie; here it is optional).  The
training loss is the mean of the two directions' mean cross-entropies (pads never count).
Downstream users take ScalarMix over the L + 1 layers [e e, h_1 h_1', ..., h_L h_L'] (each the
forward and backward outputs side by side, (B, T, 2E)): gamma * sum_k softmax(s)_k layer_k.

layer_norm=True runs fastseq.nn.LayerNormLSTM layers (Ba et al. 2016) instead.  They have no
projection, so then hidden must equal dim (a ValueError otherwise: a linear map after the layer
would not be ELMo's recurrent projection, so none is added).

Padding: rows padded at the end, their lengths (B,) given.  Both stacks run as plain padded
batches on the fused layers: the forward LM's outputs at valid positions never see the pads that
follow them, and the backward LM runs on each row's valid prefix reversed (an index flip of the
tokens, pads left in place at the end), so neither needs a PackedSequence.  In reversed
coordinates the backward LM is a forward LM too, so loss() takes its next-token loss there and
never flips its outputs back; forward() and representations() do, to the tokens' positions.
Internally every stack runs time-major, (T, B, E) contiguous from the embedding lookup of
tokens.t() on.  Pad positions must hold valid token ids (any); their outputs are meaningless
(zero in representations()).

State_dict keys:
    embedding.weight (V, E)
    forward_layers.{k}.*, backward_layers.{k}.*: torch.nn.LSTM's keys with one layer, l0:
        weight_ih_l0 (4H, E), weight_hh_l0 (4H, E), bias_ih_l0, bias_hh_l0 (4H,), weight_hr_l0 (E, H)
        (no weight_hr_l0 when hidden == dim; with layer_norm fastseq.nn.LayerNormLSTM's:
        weight_hh_l0 (4H, H), norm_ih_weight_l0, norm_hh_weight_l0 (4H,), norm_c_weight_l0, norm_c_bias_l0 (H,))
    output.weight (V, E) (the same tensor as embedding.weight when tied), output.bias (V,)

batch (loss): {"tokens": (B, T) int64, optional "lengths": (B,) int64 in [1, T] (absent: no padding)}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import functional as FF
from .. import nn as fnn


@dataclass
class ELMoConfig:
    vocab_size: int = 256                 # V
    dim: int = 128                        # E: the embedding and every layer's (projected) output
    hidden: int = 1024                    # H: the LSTM cells (AllenNLP's "small" ELMo: 1024 -> 128)
    layers: int = 2                       # L, per direction
    layer_norm: bool = False              # LayerNormLSTM layers (then hidden == dim)
    dropout: float = 0.1                  # on every layer's output
    tie_weights: bool = False             # output weight = embedding
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "dim", "hidden", "layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ELMoConfig.{name} must be a positive int, got {v!r}")
        if self.layer_norm and self.hidden != self.dim:
            raise ValueError(f"ELMoConfig.hidden must equal dim with layer_norm=True (LayerNormLSTM has no "
                             f"projection), got hidden={self.hidden}, dim={self.dim}")
        if self.hidden < self.dim:
            raise ValueError(f"ELMoConfig.hidden must be >= dim (the LSTM output is projected down to dim), "
                             f"got hidden={self.hidden}, dim={self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ELMoConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"ELMoConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")


def elmo_layer(c: ELMoConfig) -> nn.Module:
    """One layer of one direction: E -> E (an LSTM of H cells projected to E, or a LayerNormLSTM)."""
    if c.layer_norm:
        return fnn.LayerNormLSTM(c.dim, c.hidden, eps=c.layer_norm_eps)
    return fnn.LSTM(c.dim, c.hidden, proj_size=c.dim if c.hidden > c.dim else 0)


# ============================================================================ padding

def check_lengths(lengths: Optional[Tensor], B: int, T: int) -> Optional[Tensor]:
    """lengths (B,) integers in [1, T], or None (no padding)."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor) or lengths.shape != (B,) or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool:
        raise ValueError(f"ELMo: lengths must be a ({B},) integer tensor, got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} of shape "
                         f"{tuple(getattr(lengths, 'shape', ()))}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise ValueError(f"ELMo: lengths must lie in [1, T={T}], got min {lo}, max {hi}")
    return lengths


def reversal(lengths: Tensor, T: int) -> Tensor:
    """(T, B) time index: step L_b - 1 - t of row b for t < L_b, step t (a pad, left in place)
    after; its own inverse."""
    t = torch.arange(T, device=lengths.device)[:, None]                        # (T, 1)
    rev = lengths.to(t.dtype)[None, :] - 1 - t                                  # (T, B)
    return torch.where(rev >= 0, rev, t)


def _flip(x: Tensor, rev: Optional[Tensor]) -> Tensor:
    """x (T, B, ...) with each row reversed in time within its length (rev None: no padding)."""
    if rev is None:
        return x.flip(0)
    return x.gather(0, rev.view(rev.shape + (1,) * (x.dim() - 2)).expand_as(x))


def next_token_targets(tokens: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """(T, B) targets of time-major tokens (T, B): token t + 1, -100 where t + 1 is past the row's length."""
    T = tokens.shape[0]
    targets = torch.cat([tokens[1:], tokens.new_full((1, tokens.shape[1]), -100)])     # (T, B)
    if lengths is not None:
        past = torch.arange(1, T + 1, device=tokens.device)[:, None] >= lengths[None, :]  # (T, B)
        targets = targets.masked_fill(past, -100)
    return targets


# ============================================================================ the model

class ELMo(nn.Module):
    """ELMo's biLM.  forward(tokens (B, T), lengths=None) -> (forward-LM logits, backward-LM
    logits), each (B, T, V), at position t the scores of token t + 1 and of token t - 1;
    representations(tokens, lengths=None) -> L + 1 tensors (B, T, 2E); loss(batch) -> the mean of
    the two directions' cross-entropies, the output layer fused into the loss."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        if not isinstance(config, ELMoConfig):
            raise TypeError(f"ELMo(config): expected an ELMoConfig, got {type(config).__name__}")
        c = self.config = config
        self.embedding = nn.Embedding(c.vocab_size, c.dim)
        self.forward_layers = nn.ModuleList(elmo_layer(c) for _ in range(c.layers))     # time-major
        self.backward_layers = nn.ModuleList(elmo_layer(c) for _ in range(c.layers))
        self.output = nn.Linear(c.dim, c.vocab_size)
        if c.tie_weights:
            self.output.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)

    def _stack(self, layers: nn.ModuleList, tokens: Tensor) -> List[Tensor]:
        """[e, h_1, ..., h_L] of one direction for time-major tokens (T, B), each (T, B, E)."""
        p, training = self.config.dropout, self.training
        x = self.embedding(tokens)                                              # (T, B, E)
        outs = [x]
        for k, lstm in enumerate(layers):
            y, _ = lstm(x)                                                      # (T, B, E)
            x = FF.dropout(y, p, training) if k == 0 else FF.dropout_add(y, x, p, training)
            outs.append(x)
        return outs

    def _both(self, tokens: Tensor, lengths: Optional[Tensor]):
        """Time-major tokens (T, B), the reversal (T, B) (None without padding), and both stacks'
        outputs, the backward one in reversed coordinates."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"ELMo: tokens must be a (B, T) tensor, got shape {tuple(getattr(tokens, 'shape', ()))}")
        B, T = tokens.shape
        lengths = check_lengths(lengths, B, T)
        rev = None if lengths is None else reversal(lengths, T)
        tok = tokens.t()                                                        # (T, B)
        tok_rev = _flip(tok, rev)                                               # (T, B): rows reversed
        return tok, tok_rev, rev, lengths, self._stack(self.forward_layers, tok), \
            self._stack(self.backward_layers, tok_rev)

    def forward(self, tokens: Tensor, lengths: Optional[Tensor] = None):
        _, _, rev, _, fwd, bwd = self._both(tokens, lengths)
        W, b = self.output.weight, self.output.bias
        logits_f = torch.nn.functional.linear(fwd[-1].transpose(0, 1), W, b)                # (B, T, V)
        logits_b = torch.nn.functional.linear(_flip(bwd[-1], rev).transpose(0, 1), W, b)   # (B, T, V)
        return logits_f, logits_b

    def representations(self, tokens: Tensor, lengths: Optional[Tensor] = None) -> List[Tensor]:
        """The L + 1 layers downstream users mix: [e e, h_1 h_1', ..., h_L h_L'], each (B, T, 2E),
        forward then backward features, zero at pad positions."""
        _, _, rev, lengths, fwd, bwd = self._both(tokens, lengths)
        out = [torch.cat([f, _flip(b, rev)], dim=-1).transpose(0, 1) for f, b in zip(fwd, bwd)]   # (B, T, 2E)
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]   # (B, T)
            out = [h * valid[..., None].to(h.dtype) for h in out]
        return out

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        """(forward LM's mean next-token loss + backward LM's mean previous-token loss) / 2, pads
        ignored.  The backward LM's is its next-token loss in reversed coordinates, and both
        directions count the same targets (L_b - 1 per row), so the mean of the two means is the
        mean over both directions' rows at once: one fused head + loss call (one dW GEMM)."""
        if not isinstance(batch, dict) or "tokens" not in batch:
            raise ValueError(f"ELMo.loss: expected a dict with 'tokens' (and optional 'lengths'), got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        tokens = batch["tokens"]
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"ELMo.loss: tokens must be a (B, T) tensor with T >= 2, got shape "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        tok, tok_rev, _, lengths, fwd, bwd = self._both(tokens, batch.get("lengths"))
        h = torch.cat([fwd[-1], bwd[-1]]).view(-1, self.config.dim)                        # (2 T B, E)
        targets = torch.cat([next_token_targets(tok, lengths), next_token_targets(tok_rev, lengths)]).view(-1)
        if lengths is not None:                 # the head runs on the rows with a target only
            live = (targets != -100).nonzero().squeeze(1)                                   # (M,)
            h, targets = h.index_select(0, live), targets[live]                             # (M, E), (M,)
        return FF.linear_cross_entropy(h, self.output.weight, targets, linear_bias=self.output.bias,
                                       ignore_index=-100, label_smoothing=label_smoothing, smoothing=smoothing)


# ============================================================================ the downstream mix

class ScalarMix(nn.Module):
    """gamma * sum_k softmax(s)_k layer_k over num_layers tensors of one shape (Peters et al. 2018,
    eq. 1): s (num_layers,) starts at 0 (an even mix), gamma at 1.

    do_layer_norm=True first normalizes each layer by the mean and variance of all its elements
    at the unmasked positions (one mean and variance per layer, as AllenNLP's ScalarMix; not a
    per-position LayerNorm).  forward(tensors, mask=None): mask (B, T), True / 1 at real tokens,
    used only by do_layer_norm (None: every position counts)."""

    def __init__(self, num_layers: int, do_layer_norm: bool = False):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"ScalarMix: num_layers must be a positive int, got {num_layers!r}")
        self.num_layers, self.do_layer_norm = num_layers, do_layer_norm
        self.scalars = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, tensors: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tensor:
        if len(tensors) != self.num_layers:
            raise ValueError(f"ScalarMix: expected {self.num_layers} tensors, got {len(tensors)}")
        w = torch.softmax(self.scalars, dim=0)
        out = 0
        for k, h in enumerate(tensors):
            out = out + w[k] * (self._normalize(h, mask) if self.do_layer_norm else h)
        return self.gamma * out

    @staticmethod
    def _normalize(h: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is None:
            mean = h.mean()
            var = ((h - mean) ** 2).mean()
        else:
            m = mask.to(h.dtype)[..., None]                                     # (B, T, 1)
            n = m.sum() * h.shape[-1]
            mean = (h * m).sum() / n
            var = (((h - mean) * m) ** 2).sum() / n
        return (h - mean) / torch.sqrt(var + 1e-12)


def example_batch(config: ELMoConfig, B: int, T: int, generator: Optional[torch.Generator] = None,
                  device="cpu") -> Dict[str, Tensor]:
    """Random tokens (B, T), the first row full, the others padded (with 0) to random lengths in [2, T]."""
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=generator)
    lengths = torch.randint(min(2, T), T + 1, (B,), generator=generator)
    lengths[0] = T
    tokens = tokens.masked_fill(torch.arange(T)[None, :] >= lengths[:, None], 0)
    return {"tokens": tokens.to(device), "lengths": lengths.to(device)}
