"""Benchmark cases of the attention family (issue #3 targets) and its long-context sweep.

Cases: T = S = 4096 (B = 1, 8 heads, D = 64) forward and forward+backward, causal and not; a
BERT-base-like shape (B = 8, 12 heads, T = 512); decode (T = 1 against S = 4096 cached keys);
sliding window and key padding against torch's SDPA given the equivalent mask.  Peers: torch's
SDPA (its CPU flash kernel), torch's math backend, the naive formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import visible_count, visible_keys
from ..functional import scaled_dot_product_attention as fast_sdpa
from .registry import Case, Setup, register


def naive_attention(q, k, v, mask=None, is_causal=False):
    """What a user writes by hand: the T x S scores, softmax, weighted sum."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def torch_math(q, k, v, mask=None, is_causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)


def torch_sdpa(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=is_causal)


def attention_flops(B, H, T, S, D, causal=False, backward=False):
    """Two GEMMs forward (Q K^T, P V), five backward; causal halves both."""
    f = 4 * B * H * T * S * D * (0.5 if causal and T == S else 1.0)
    return f * 3.5 if backward else f


def _inputs(B, H, T, S, D, device, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device).requires_grad_(grad) for n in (T, S, S))
    return q, k, v


def _runner(fn, q, k, v, backward, **kw):
    if not backward:
        def run():
            with torch.no_grad():
                return fn(q, k, v, **kw)
        return run
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device)

    def run():
        return torch.autograd.grad(fn(q, k, v, **kw), (q, k, v), do)
    return run


def _case(B, H, T, S, D, causal, backward, peers, device="cpu", dropout=0.0):
    def setup():
        q, k, v = _inputs(B, H, T, S, D, device, backward)
        kw = dict(is_causal=causal, **({"dropout_p": dropout} if dropout else {}))
        return Setup(fastseq=_runner(fast_sdpa, q, k, v, backward, **kw),
                     peers={name: _runner(fn, q, k, v, backward, **kw) for name, fn in peers.items()},
                     flops=attention_flops(B, H, T, S, D, causal, backward))
    return setup


def _masked_case(B, H, T, D, backward, window=None, lengths=None, device="cpu"):
    """fastseq's window / key_lengths extras against torch's SDPA given the same T x S mask."""
    def setup():
        q, k, v = _inputs(B, H, T, T, D, device, backward)
        kl = torch.tensor(lengths, device=device) if lengths is not None else None
        keep = visible_keys(T, T, False, window, kl, device=device)
        counted = visible_count(T, T, False, window, kl.cpu() if kl is not None else None)    # counts on the CPU
        visible = counted * (B if kl is None else 1) * H
        return Setup(fastseq=_runner(fast_sdpa, q, k, v, backward, window=window, key_lengths=kl),
                     peers={"torch+mask": _runner(torch_sdpa, q, k, v, backward, mask=keep)},
                     flops=4 * visible * D * (3.5 if backward else 1))
    return setup


PEERS = {"torch": torch_sdpa, "math": torch_math, "naive": naive_attention}
QUICK = {"quick_peers": ["torch"]}        # --quick times only torch's SDPA beside fastseq
ALL, TORCH = tuple(PEERS), ("torch",)

for _dev in ("cpu", "cuda"):              # the same cases on a GPU (fastseq's Numba kernels against torch's)
    for _bwd in (False, True):
        _mode = "fwd+bwd" if _bwd else "fwd"
        for _causal in (False, True):
            register(Case("attention", f"sdpa {_mode} T=S=4096 B=1 H=8 D=64" + (" causal" if _causal else ""), _dev,
                          _case(1, 8, 4096, 4096, 64, _causal, _bwd, PEERS, _dev), peers=ALL, meta=QUICK,
                          quick=not _bwd))
        register(Case("attention", f"sdpa {_mode} BERT B=8 H=12 T=512 D=64", _dev,
                      _case(8, 12, 512, 512, 64, False, _bwd, PEERS, _dev), peers=ALL, meta=QUICK))
    if _dev == "cpu":                      # fastseq's CUDA kernels have no dropout yet
        register(Case("attention", "sdpa fwd+bwd dropout=0.1 BERT B=8 H=12 T=512", _dev,
                      _case(8, 12, 512, 512, 64, False, True, {"torch": torch_sdpa}, _dev, dropout=0.1), peers=TORCH))
        register(Case("attention", "sdpa fwd+bwd dropout=0.1 T=S=4096 B=1 H=8", _dev,
                      _case(1, 8, 4096, 4096, 64, False, True, {"torch": torch_sdpa}, _dev, dropout=0.1),
                      peers=TORCH, quick=False))
    register(Case("attention", "sdpa decode T=1 S=4096 B=1 H=8 D=64", _dev,
                  _case(1, 8, 1, 4096, 64, False, False, PEERS, _dev), peers=ALL))
    register(Case("attention", "sdpa decode T=1 S=4096 B=8 H=8 D=64", _dev,
                  _case(8, 8, 1, 4096, 64, False, False, PEERS, _dev), peers=ALL))
    register(Case("attention", "sdpa fwd window=(512,0) T=8192 H=8", _dev,
                  _masked_case(1, 8, 8192, 64, False, window=(512, 0), device=_dev), peers=("torch+mask",),
                  quick=_dev == "cuda"))           # on the CPU the quick sweep has it
    register(Case("attention", "sdpa fwd+bwd key_lengths B=4 T=2048 H=8", _dev,
                  _masked_case(4, 8, 2048, 64, True, lengths=[2048, 1500, 700, 300], device=_dev),
                  peers=("torch+mask",), quick=False))
