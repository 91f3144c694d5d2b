"""TorchELMo: fastseq.models.elmo.ELMo written the way a PyTorch user writes ELMo's biLM: nn.Embedding,
nn.LSTM(proj_size=dim) layers (batch_first; torch runs the projection without oneDNN), nn.Dropout,
the backward LM on rows reversed by a gather, the logits formed whole in the tokens' positions and
F.cross_entropy on targets shifted each way (only the backward LM's last layer is flipped back
for the loss; representations() flips back all L + 1).  With layer_norm the layers are
TorchLayerNormRNN's step-by-step LSTM.  Everything is built here from the config, nothing from the
fastseq model's construction code.  Same config, same state_dict keys, same forward,
representations and loss."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..elmo import ELMoConfig
from ._loss import token_cross_entropy
from .rnn_lm import TorchLayerNormRNN


def reverse_rows(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """x (B, T, ...) with each row's first lengths[b] steps in reverse order, the rest in place."""
    if lengths is None:
        return x.flip(1)
    B, T = x.shape[:2]
    t = torch.arange(T, device=x.device).expand(B, T)                           # (B, T)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)        # (B, T)
    return x.gather(1, idx.view(B, T, *([1] * (x.dim() - 2))).expand_as(x))


def torch_elmo_layer(c: ELMoConfig) -> nn.Module:
    """One layer of one direction, E -> E, batch_first: an nn.LSTM of H cells projected to E (no
    projection when H == E), or with layer_norm the step-by-step layer-normalized LSTM."""
    if c.layer_norm:
        return TorchLayerNormRNN("lstm", c.dim, c.hidden, batch_first=True, eps=c.layer_norm_eps)
    return nn.LSTM(c.dim, c.hidden, batch_first=True, proj_size=c.dim if c.hidden > c.dim else 0)


class TorchELMo(nn.Module):
    def __init__(self, config: ELMoConfig):
        super().__init__()
        c = self.config = config
        self.embedding = nn.Embedding(c.vocab_size, c.dim)
        self.forward_layers = nn.ModuleList(torch_elmo_layer(c) for _ in range(c.layers))
        self.backward_layers = nn.ModuleList(torch_elmo_layer(c) for _ in range(c.layers))
        self.output = nn.Linear(c.dim, c.vocab_size)
        if c.tie_weights:
            self.output.weight = self.embedding.weight
        self.drop = nn.Dropout(c.dropout)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)

    def _stack(self, layers, x: Tensor) -> List[Tensor]:
        outs = [x]
        for k, lstm in enumerate(layers):
            y = self.drop(lstm(x)[0])                                           # (B, T, E)
            x = y if k == 0 else x + y
            outs.append(x)
        return outs

    def _both(self, tokens: Tensor, lengths: Optional[Tensor]):
        """Both stacks' [e, h_1, ..., h_L], each (B, T, E); the backward one still reversed."""
        e = self.embedding(tokens)                                              # (B, T, E)
        return self._stack(self.forward_layers, e), self._stack(self.backward_layers, reverse_rows(e, lengths))

    def forward(self, tokens: Tensor, lengths: Optional[Tensor] = None):
        fwd, bwd = self._both(tokens, lengths)
        return self.output(fwd[-1]), self.output(reverse_rows(bwd[-1], lengths))   # 2 x (B, T, V)

    def representations(self, tokens: Tensor, lengths: Optional[Tensor] = None) -> List[Tensor]:
        fwd, bwd = self._both(tokens, lengths)
        out = [torch.cat([f, reverse_rows(b, lengths)], dim=-1) for f, b in zip(fwd, bwd)]   # (B, T, 2E)
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]   # (B, T)
            out = [h.masked_fill(~valid[..., None], 0.0) for h in out]
        return out

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        tokens, lengths = batch["tokens"], batch.get("lengths")
        logits_f, logits_b = self(tokens, lengths)                              # only the last layers flipped back
        T = tokens.shape[1]
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), T, device=tokens.device)
        later_valid = torch.arange(1, T, device=tokens.device)[None, :] < lengths[:, None]          # (B, T-1): position t+1 is a token
        next_tokens = tokens[:, 1:].masked_fill(~later_valid, -100)             # what positions 0..T-2 predict
        prev_tokens = tokens[:, :-1].masked_fill(~later_valid, -100)            # what positions 1..T-1 predict
        loss_f = token_cross_entropy(logits_f[:, :-1], next_tokens, label_smoothing, smoothing)
        loss_b = token_cross_entropy(logits_b[:, 1:], prev_tokens, label_smoothing, smoothing)
        return 0.5 * (loss_f + loss_b)
