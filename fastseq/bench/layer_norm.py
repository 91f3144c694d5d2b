"""Benchmark cases of the LayerNorm family (issue #2 targets): forward, forward+backward and
the fused residual add, against F.layer_norm / F.rms_norm and the naive pure-torch formula."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import _dispatch
from ..functional import add_layer_norm, layer_norm, rms_norm
from ..layer_norm import layer_norm_ref
from .registry import Case, Setup, register

SHAPES = [(4096, 768), (8192, 1024), (32768, 768)]


def _leaves(device, shape, n, residual=False):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()   # noqa: E731
    x, w, b = mk(*shape), mk(n), mk(n)
    r = mk(*shape) if residual else None
    dy = torch.randn(*shape, generator=g).to(device)
    return x, r, w, b, dy


def _cpu_kernels(x, r, w, b, dy, center, backward):
    """fastseq's CPU kernels alone, every buffer preallocated: the kernel-only time."""
    k = _dispatch.cpu_kernels("layer_norm")
    m, n = x.shape
    nt = _dispatch.num_threads()
    v = lambda t: t.detach().numpy().reshape(-1)                       # noqa: E731
    e = np.empty(0, np.float32)
    y, dx = torch.empty(m, n), torch.empty(m, n)
    mean, rstd = torch.empty(m), torch.empty(m)
    scratch, partial = torch.empty(nt * n), torch.empty(2 * nt * n)
    dw, db = torch.empty(n), torch.empty(n)
    args_f = (v(x), v(r) if r is not None else e, v(w), v(b), v(y), e, v(scratch) if r is not None else e,
              v(mean), v(rstd), m, n, 1e-5, center, nt)
    args_b = (v(x), v(r) if r is not None else e, v(dy) if backward else e, e, v(w), v(mean), v(rstd), v(dx), v(partial),
              v(scratch) if r is not None else e, v(dw), v(db) if center else e, m, n, center, nt)

    def run():
        k.forward(*args_f)
        if backward:
            k.backward(*args_b)
    return run


def _grad(y, inputs, dy):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], dy)


def _fwd(device, shape):
    def setup():
        n = shape[-1]
        x, _, w, b, _ = _leaves(device, shape, n)
        with torch.no_grad():
            return Setup(
                fastseq=lambda: layer_norm(x.detach(), (n,), w.detach(), b.detach()),
                peers={"torch": lambda: F.layer_norm(x.detach(), (n,), w.detach(), b.detach()),
                       "naive": lambda: layer_norm_ref(x.detach(), (n,), w.detach(), b.detach())},
                bytes=2 * x.numel() * 4,
                kernel=_cpu_kernels(x, None, w, b, None, True, False) if device == "cpu" else None)
    return setup


def _fwd_bwd(device, shape):
    def setup():
        n = shape[-1]
        x, _, w, b, dy = _leaves(device, shape, n)
        ins = (x, w, b)
        return Setup(
            fastseq=lambda: _grad(layer_norm(x, (n,), w, b), ins, dy),
            peers={"torch": lambda: _grad(F.layer_norm(x, (n,), w, b), ins, dy),
                   "naive": lambda: _grad(layer_norm_ref(x, (n,), w, b), ins, dy)},
            bytes=5 * x.numel() * 4,              # fwd: x -> y; bwd: x, dy -> dx
            kernel=_cpu_kernels(x, None, w, b, dy, True, True) if device == "cpu" else None)
    return setup


def _add_fwd_bwd(device, shape):
    def setup():
        n = shape[-1]
        x, r, w, b, dy = _leaves(device, shape, n, residual=True)
        ins = (x, r, w, b)
        return Setup(
            fastseq=lambda: _grad(add_layer_norm(x, r, (n,), w, b), ins, dy),
            peers={"torch": lambda: _grad(F.layer_norm(x + r, (n,), w, b), ins, dy)},
            bytes=7 * x.numel() * 4,              # fwd: x, r -> y; bwd: x, r, dy -> dx
            kernel=_cpu_kernels(x, r, w, b, dy, True, True) if device == "cpu" else None)
    return setup


def _rms_fwd_bwd(device, shape):
    def setup():
        n = shape[-1]
        x, _, w, _, dy = _leaves(device, shape, n)
        ins = (x, w)
        return Setup(
            fastseq=lambda: _grad(rms_norm(x, (n,), w, 1e-6), ins, dy),
            peers={"torch": lambda: _grad(F.rms_norm(x, (n,), w, 1e-6), ins, dy)},
            bytes=5 * x.numel() * 4,
            kernel=_cpu_kernels(x, None, w, torch.zeros(n), dy, False, True) if device == "cpu" else None)
    return setup


for _device in ("cpu", "cuda"):
    _kern = _device == "cpu"                       # the kernel-alone timing calls the CPU kernels
    for _shape in SHAPES:
        register(Case("layer_norm", f"layer_norm fwd {_shape}", _device, _fwd(_device, _shape),
                      peers=("torch", "naive"), kernel=_kern))
        register(Case("layer_norm", f"layer_norm fwd+bwd {_shape}", _device, _fwd_bwd(_device, _shape),
                      peers=("torch", "naive"), kernel=_kern))
        register(Case("layer_norm", f"add_layer_norm fwd+bwd {_shape}", _device, _add_fwd_bwd(_device, _shape),
                      peers=("torch",), kernel=_kern))
        register(Case("layer_norm", f"rms_norm fwd+bwd {_shape}", _device, _rms_fwd_bwd(_device, _shape),
                      peers=("torch",), kernel=_kern, quick=_shape == SHAPES[1]))
