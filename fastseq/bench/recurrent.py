"""Benchmark cases of the recurrent family (issue #4 configs (T, B, I, H)): one layer, inference
forward and training forward+backward.

Peers: torch.nn.LSTM / GRU (oneDNN on the CPU, cuDNN on a GPU) for the plain cells; for the
layer-normalized LSTM and GRU, which torch lacks, what users write today: a Python loop over
time with nn.LayerNorm on the gate pre-activations (and the LSTM's cell) (PythonLoopLayerNorm*
below), and the same module compiled by TorchScript; plus fastseq's own plain LSTM / GRU, the
cost the norms add.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import nn

from ..nn import GRU, LSTM, LayerNormGRU, LayerNormLSTM
from .registry import Case, Setup, register

CONFIGS = [(128, 32, 256, 256), (256, 16, 512, 512), (64, 1, 256, 256), (512, 64, 128, 128)]
QUICK = CONFIGS[::2]


def rnn_flops(T, B, I, H, gates, backward=False):
    """2 T B G H (I + H) forward (input and recurrent GEMMs); training adds twice that (the
    gradients of the inputs and of the weights)."""
    f = 2 * T * B * gates * H * (I + H)
    return 3 * f if backward else f


class PythonLoopLayerNormLSTM(nn.Module):
    """A layer-normalized LSTM as written without fused kernels: nn.Linear projections and
    nn.LayerNorm on the input and recurrent gate pre-activations and on the cell, one Python
    iteration per step.  Same equations as fastseq.nn.LayerNormLSTM (load_from copies its
    parameters, so the two compute the same function)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)
        self.ln_ih = nn.LayerNorm(4 * hidden_size, elementwise_affine=True, bias=False)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, elementwise_affine=True, bias=False)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor]):
        h, c = state
        # every step's input part at once; unbind, not xp[t]: indexing would make autograd fill a
        # whole (T, B, 4H) gradient per step, O(T^2) (14 s instead of 0.4 s at T = 512)
        xs = (self.ln_ih(x @ self.ih.weight.t()) + self.ih.bias).unbind(0)
        ys = []
        for xp_t in xs:
            g = xp_t + self.ln_hh(h @ self.hh.weight.t()) + self.hh.bias
            i, f, gg, o = g.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            ys.append(h)
        return torch.stack(ys), (h, c)

    @torch.no_grad()
    def load_from(self, m: LayerNormLSTM):
        self.ih.weight.copy_(m.weight_ih_l0)
        self.ih.bias.copy_(m.bias_ih_l0)
        self.hh.weight.copy_(m.weight_hh_l0)
        self.hh.bias.copy_(m.bias_hh_l0)
        self.ln_ih.weight.copy_(m.norm_ih_weight_l0)
        self.ln_hh.weight.copy_(m.norm_hh_weight_l0)
        self.ln_c.weight.copy_(m.norm_c_weight_l0)
        self.ln_c.bias.copy_(m.norm_c_bias_l0)
        return self


class PythonLoopLayerNormGRU(nn.Module):
    """A layer-normalized GRU as written without fused kernels: nn.LayerNorm on the input and
    recurrent gate pre-activations, torch's GRU equations, one Python iteration per step.  Same
    function as fastseq.nn.LayerNormGRU (load_from copies its parameters)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size)
        self.ln_ih = nn.LayerNorm(3 * hidden_size, elementwise_affine=True, bias=False)
        self.ln_hh = nn.LayerNorm(3 * hidden_size, elementwise_affine=True, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        xs = (self.ln_ih(x @ self.ih.weight.t()) + self.ih.bias).unbind(0)     # see PythonLoopLayerNormLSTM
        ys = []
        for xp_t in xs:
            a = self.ln_hh(h @ self.hh.weight.t()) + self.hh.bias
            xr, xz, xn = xp_t.chunk(3, 1)
            ar, az, an = a.chunk(3, 1)
            r, z = torch.sigmoid(xr + ar), torch.sigmoid(xz + az)
            n = torch.tanh(xn + r * an)
            h = (1 - z) * n + z * h
            ys.append(h)
        return torch.stack(ys), h

    @torch.no_grad()
    def load_from(self, m: LayerNormGRU):
        self.ih.weight.copy_(m.weight_ih_l0)
        self.ih.bias.copy_(m.bias_ih_l0)
        self.hh.weight.copy_(m.weight_hh_l0)
        self.hh.bias.copy_(m.bias_hh_l0)
        self.ln_ih.weight.copy_(m.norm_ih_weight_l0)
        self.ln_hh.weight.copy_(m.norm_hh_weight_l0)
        return self


def _runner(m, x, H, backward, state=None):
    """A callable running module m on x: forward under no_grad, or forward + backward to the
    input and every parameter."""
    args = (x,) if state is None else (x, state)
    if not backward:
        def run():
            with torch.no_grad():
                return m(*args)
        return run
    params = [x] + list(m.parameters())
    dy = torch.randn(x.shape[0], x.shape[1], H, device=x.device)
    return lambda: torch.autograd.grad(m(*args)[0], params, dy)


def _plain_case(kind, T, B, I, H, backward, proj=0, device="cpu"):
    torch_cls, fast_cls, gates = {"lstm": (nn.LSTM, LSTM, 4), "gru": (nn.GRU, GRU, 3)}[kind]

    def setup():
        torch.manual_seed(0)
        kw = {"proj_size": proj} if proj else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # torch: "LSTM with projections is not supported with oneDNN"
            ref = torch_cls(I, H, **kw).to(device)
        fast = fast_cls(I, H, **kw).to(device)
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, I, device=device, requires_grad=backward)
        flops = rnn_flops(T, B, I, H, gates, backward) if not proj else \
            (3 if backward else 1) * 2 * T * B * (4 * H * (I + proj) + proj * H)
        return Setup(fastseq=_runner(fast, x, proj or H, backward), peers={"torch": _runner(ref, x, proj or H, backward)},
                     flops=flops)
    return setup


def _layer_norm_case(kind, T, B, I, H, backward, device="cpu"):
    fast_cls, loop_cls, plain_cls, gates = {"lstm": (LayerNormLSTM, PythonLoopLayerNormLSTM, LSTM, 4),
                                            "gru": (LayerNormGRU, PythonLoopLayerNormGRU, GRU, 3)}[kind]

    def setup():
        torch.manual_seed(0)
        fast = fast_cls(I, H)
        loop = loop_cls(I, H).load_from(fast).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                # TorchScript's deprecation notice
            scripted = torch.jit.script(loop_cls(I, H).load_from(fast).to(device))
        fast, plain = fast.to(device), plain_cls(I, H).to(device)
        x = torch.randn(T, B, I, device=device, requires_grad=backward)
        z = lambda: torch.zeros(B, H, device=device)          # noqa: E731
        state = (z(), z()) if kind == "lstm" else z()
        return Setup(fastseq=_runner(fast, x, H, backward),
                     peers={"py-loop": _runner(loop, x, H, backward, state),
                            "torchscript": _runner(scripted, x, H, backward, state),
                            f"fs-{kind.upper()}": _runner(plain, x, H, backward)},
                     flops=rnn_flops(T, B, I, H, gates, backward))
    return setup


for _dev in ("cpu", "cuda"):              # on a GPU: fastseq's step kernels against cuDNN
    for _cfg in CONFIGS:
        for _bwd in (False, True):
            _mode = "train" if _bwd else "infer"
            for _kind in ("lstm", "gru"):
                register(Case("recurrent", f"{_kind} {_mode} (T,B,I,H)={_cfg}", _dev,
                              _plain_case(_kind, *_cfg, _bwd, device=_dev), peers=("torch",), quick=_cfg in QUICK))
    for _bwd in (False, True):                # torch's proj_size (torch runs it without oneDNN)
        register(Case("recurrent", f"lstm-proj128 {'train' if _bwd else 'infer'} (T,B,I,H)={CONFIGS[0]}", _dev,
                      _plain_case("lstm", *CONFIGS[0], _bwd, proj=128, device=_dev), peers=("torch",), quick=False))
    for _kind in ("lstm", "gru"):
        for _cfg in CONFIGS:
            register(Case("recurrent", f"ln-{_kind} train (T,B,I,H)={_cfg}", _dev,
                          _layer_norm_case(_kind, *_cfg, True, device=_dev),
                          peers=("py-loop", "torchscript", f"fs-{_kind.upper()}"), quick=_cfg in QUICK))
