"""Helpers shared by the recurrent test files: random layer parameters, layer-normalized modules."""
import torch

import fastseq


def params(cell, C, H, d):
    """(w_ih, w_hh, b_ih, b_hh[, norm_ih, norm_hh[, norm_c_weight, norm_c_bias]]) of `cell` with
    C inputs and H hidden units; d: tensor keywords (dtype, device)."""
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "ln_lstm": 4, "ln_gru": 3}[cell]
    p = [torch.randn(G * H, C, **d), torch.randn(G * H, H, **d) / H ** 0.5, torch.randn(G * H, **d),
         torch.randn(G * H, **d)]
    if cell.startswith("ln"):
        p += [1 + 0.3 * torch.randn(G * H, **d), 1 + 0.3 * torch.randn(G * H, **d)]
    if cell == "ln_lstm":
        p += [1 + 0.3 * torch.randn(H, **d), 0.3 * torch.randn(H, **d)]
    return p


LN = {"LayerNormLSTM": fastseq.nn.LayerNormLSTM, "LayerNormGRU": fastseq.nn.LayerNormGRU}


def ln_module(kind, C, H, dtype, **kw):
    """A LayerNormLSTM / LayerNormGRU with its norms moved off their ones / zeros init."""
    m = LN[kind](C, H, **kw).to(dtype)
    with torch.no_grad():                      # move the norms off their ones / zeros init
        for name, p in m.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    return m
