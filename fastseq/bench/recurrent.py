"""Benchmark cases of the recurrent family (issue #4 configs): one LSTM layer, inference
forward and training forward+backward, against torch.nn.LSTM (oneDNN on the CPU)."""
from __future__ import annotations

import torch

from ..nn import LSTM
from .registry import Case, Setup, register

CONFIGS = [(128, 32, 256, 256), (256, 16, 512, 512), (64, 1, 256, 256), (512, 64, 128, 128)]


def lstm_flops(T, B, I, H, backward=False):
    """2 T B 4H (I + H) forward (input and recurrent GEMMs); backward twice that."""
    f = 2 * T * B * 4 * H * (I + H)
    return 3 * f if backward else f


def _case(T, B, I, H, backward):
    def setup():
        torch.manual_seed(0)
        ref = torch.nn.LSTM(I, H)
        fast = LSTM(I, H)
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, I, requires_grad=backward)

        def runner(m):
            if not backward:
                def run():
                    with torch.no_grad():
                        return m(x)
                return run
            params = [x] + list(m.parameters())
            dy = torch.randn(T, B, H)
            return lambda: torch.autograd.grad(m(x)[0], params, dy)
        return Setup(fastseq=runner(fast), peers={"torch": runner(ref)}, flops=lstm_flops(T, B, I, H, backward))
    return setup


for _cfg in CONFIGS:
    for _bwd in (False, True):
        register(Case("recurrent", f"lstm {'train' if _bwd else 'infer'} (T,B,I,H)={_cfg}", "cpu",
                      _case(*_cfg, _bwd), quick=_cfg in CONFIGS[::2]))
