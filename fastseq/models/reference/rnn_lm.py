"""TorchRNNLM: fastseq.models.rnn_lm.RNNLM written the way pytorch/examples' word_language_model
writes it: nn.Embedding, nn.Dropout, nn.LSTM / nn.GRU in their default time-major layout (the
example's batchify gives (T, B) batches), nn.Linear, the logits formed whole and F.cross_entropy
on them against the time-major targets.  Same config, same state_dict keys, same forward (logits
handed back as (B, T, V)) and loss.  Everything is built here from the config, nothing from the
fastseq model's construction code.

torch has no layer-normalized LSTM or GRU, so for those cells TorchLayerNormRNN is what a user
writes today: a loop over the steps in torch ops, with the parameters of fastseq.nn.LayerNormLSTM /
LayerNormGRU under the same names (F.linear and F.layer_norm on them, as nn.Linear and
nn.LayerNorm would, but keyed like torch.nn.LSTM so state_dicts load both ways)."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rnn_lm import RNNLMConfig
from ._loss import token_cross_entropy


class TorchLayerNormRNN(nn.Module):
    """A layer-normalized LSTM ("lstm") or GRU ("gru") stack, step by step (Ba et al. 2016):

        LSTM:  G  = LN(x W_ih^T) g_ih + b_ih + LN(h W_hh^T) g_hh + b_hh        gates i, f, g, o
               c' = s(f) c + s(i) tanh(g);   h' = s(o) tanh(LN(c') g_c + b_c)
        GRU:   a = LN(x W_ih^T) g_ih + b_ih;  u = LN(h W_hh^T) g_hh + b_hh     gates r, z, n
               r = s(a_r + u_r), z = s(a_z + u_z), n = tanh(a_n + r u_n),  h' = (1 - z) n + z h

    LN normalizes over the whole gate row (G H) or the cell (H).  forward(x, hx=None) as
    torch.nn.LSTM / GRU's (no PackedSequence)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 batch_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.lstm = mode == "lstm"
        self.hidden_size, self.num_layers, self.dropout, self.batch_first, self.eps = \
            hidden_size, num_layers, dropout, batch_first, eps
        G, H = (4 if self.lstm else 3), hidden_size
        bound = 1.0 / math.sqrt(H)
        for k in range(num_layers):
            C = input_size if k == 0 else H
            for name, shape in (("weight_ih", (G * H, C)), ("weight_hh", (G * H, H)), ("bias_ih", (G * H,)),
                                ("bias_hh", (G * H,))):
                self.register_parameter(f"{name}_l{k}", nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
            self.register_parameter(f"norm_ih_weight_l{k}", nn.Parameter(torch.ones(G * H)))
            self.register_parameter(f"norm_hh_weight_l{k}", nn.Parameter(torch.ones(G * H)))
            if self.lstm:
                self.register_parameter(f"norm_c_weight_l{k}", nn.Parameter(torch.ones(H)))
                self.register_parameter(f"norm_c_bias_l{k}", nn.Parameter(torch.zeros(H)))

    def forward(self, x: Tensor, hx=None):
        if self.batch_first:
            x = x.transpose(0, 1)                                                   # (T, B, C)
        T, B, _ = x.shape
        L, H = self.num_layers, self.hidden_size
        if hx is None:
            zeros = x.new_zeros(L, B, H)
            hx = (zeros, zeros) if self.lstm else zeros
        h0, c0 = hx if self.lstm else (hx, None)
        hs, cs = [], []
        for k in range(L):
            p = {name: getattr(self, f"{name}_l{k}") for name in
                 ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "norm_ih_weight", "norm_hh_weight")}
            GH = p["weight_ih"].shape[0]
            a = F.layer_norm(F.linear(x, p["weight_ih"]), (GH,), p["norm_ih_weight"], None, self.eps) \
                + p["bias_ih"]                                                      # (T, B, G H): every step at once
            h, c = h0[k], (c0[k] if self.lstm else None)
            ys = []
            for t in range(T):
                u = F.layer_norm(F.linear(h, p["weight_hh"]), (GH,), p["norm_hh_weight"], None, self.eps) \
                    + p["bias_hh"]                                                  # (B, G H)
                if self.lstm:
                    i, f, g, o = (a[t] + u).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    c_hat = F.layer_norm(c, (H,), getattr(self, f"norm_c_weight_l{k}"),
                                         getattr(self, f"norm_c_bias_l{k}"), self.eps)
                    h = torch.sigmoid(o) * torch.tanh(c_hat)
                else:
                    ar, az, an = a[t].chunk(3, dim=-1)
                    ur, uz, un = u.chunk(3, dim=-1)
                    r, z = torch.sigmoid(ar + ur), torch.sigmoid(az + uz)
                    h = (1 - z) * torch.tanh(an + r * un) + z * h
                ys.append(h)
            x = torch.stack(ys)                                                     # (T, B, H)
            if k < L - 1:
                x = F.dropout(x, self.dropout, self.training)
            hs.append(h)
            cs.append(c)
        out = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.stack(hs)                                                       # (L, B, H)
        return out, ((h_n, torch.stack(cs)) if self.lstm else h_n)


class TorchRNNLM(nn.Module):
    def __init__(self, config: RNNLMConfig):
        super().__init__()
        c = self.config = config
        between = c.dropout if c.layers > 1 else 0.0
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.Embedding(c.vocab_size, c.dim)
        if c.cell in ("lstm", "gru"):
            self.rnn = (nn.LSTM if c.cell == "lstm" else nn.GRU)(c.dim, c.hidden, c.layers, dropout=between)
        else:                                                                   # "layer_norm_lstm" / "layer_norm_gru"
            self.rnn = TorchLayerNormRNN(c.cell[len("layer_norm_"):], c.dim, c.hidden, c.layers, dropout=between,
                                         eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden, c.vocab_size)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)                        # the example's init_weights
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def time_major_logits(self, tokens: Tensor, state=None):
        """Logits (T, B, V) of tokens (B, T), and the final state."""
        y, state = self.rnn(self.drop(self.encoder(tokens.t())), state)        # (T, B, H)
        return self.decoder(self.drop(y)), state                                # (T, B, V)

    def forward(self, tokens: Tensor, state=None, return_state: bool = False):
        logits, state = self.time_major_logits(tokens, state)
        logits = logits.transpose(0, 1)                                         # (B, T, V)
        return (logits, state) if return_state else logits

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        logits, _ = self.time_major_logits(batch["tokens"], batch.get("state"))  # (T, B, V)
        return token_cross_entropy(logits, batch["targets"].t(), label_smoothing, smoothing)
