"""The LSTM's packed-panel kernels (kernels/cpu/_panel.h, issue 13), on every instruction set this
CPU has (AVX-512, AVX2 + FMA, generic vectors), each forced in turn:
  - fastseq.nn.LSTM in fp32 against torch.nn.LSTM run in fp64: outputs, final states and every
    gradient, padded and packed, B = 1 (the one-row kernel), the input projection inside the loop
    (>= 8 rows a step) and outside, sizes that leave partial panels, two layers both ways;
  - the kernels against the BLAS-based loops they replace, argument for argument (saved gates,
    both xp layouts, one and two threads, one block and many);
  - saturated gates, inf and NaN;
  - which loop runs when (fp32 and T >= 2: panels; fp64 and T = 1: the BLAS loops).
Every output buffer and the reused scratch (panels, dG) start as NaN."""
import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq.recurrent import cpu
from fastseq.recurrent import rows as R
from fastseq.recurrent.cells import unit_block
from fastseq.recurrent.functions import gate_perm

ISAS = ["generic", "avx2", "avx512"]
TOL = dict(rtol=2e-4, atol=3e-5)


@pytest.fixture(params=ISAS)
def isa(request):
    """Force each instruction set the CPU has (skip the others); back to the best one after."""
    try:
        cpu.panel_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    cpu.panel_isa("best")


@pytest.fixture
def poison(poison, monkeypatch):
    """conftest's poison, plus the CPU loops' NumPy outputs and reused scratch start as NaN."""
    real = cpu.scratch

    def nan_scratch(n, dtype, zero=False, name=""):
        out = real(n, dtype, zero, name)
        if not zero:
            out.fill(np.nan)
        return out
    monkeypatch.setattr(cpu, "np_empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    monkeypatch.setattr(cpu, "scratch", nan_scratch)
    yield


def _pair(I, H, **kw):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, **kw).double()
    fast = fastseq.nn.LSTM(I, H, **kw)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, fast


def _run(module, x, hx, lengths):
    """Output (padded), final states and the gradients of x, hx and every parameter of a weighted loss."""
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, (h, c) = module(inp, hx)
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + (h * h.detach().sin()).sum() + (c * c.detach().cos()).sum()
    leaves = [x, *hx, *module.parameters()]
    return [out, h, c, *torch.autograd.grad(loss, leaves)]


CONFIGS = [  # T, B, I, H, layers, bidirectional, lengths
    (6, 1, 5, 20, 1, False, None),            # one row: the split-k kernel; 20 = a full and a partial panel
    (5, 9, 7, 37, 1, False, None),            # 9 rows a step: projection inside the loop; 37 units
    (4, 12, 16, 64, 2, True, None),           # several panels and unit blocks, two layers both ways
    (7, 10, 6, 24, 1, False, [7, 2, 5, 7, 1, 3, 6, 4, 7, 2]),    # packed: 4..10 rows a step
    (3, 2, 3, 8, 1, True, [3, 1]),            # tiny, packed
]


@pytest.mark.parametrize("T,B,I,H,layers,bidirectional,lengths", CONFIGS)
def test_lstm_matches_torch_on_every_isa(poison, isa, T, B, I, H, layers, bidirectional, lengths):
    ref, fast = _pair(I, H, num_layers=layers, bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(layers * dirs, B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(layers * dirs, B, H, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths) if lengths is not None else None
    leaves = lambda dt: [t.to(dt).requires_grad_() for t in (x, h0, c0)]    # noqa: E731
    x32, h32, c32 = leaves(torch.float32)
    x64, h64, c64 = leaves(torch.float64)
    got = _run(fast, x32, (h32, c32), lengths)
    exp = _run(ref, x64, (h64, c64), lengths)
    for i, (a, b) in enumerate(zip(got, exp)):
        torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m: f"item {i} on {isa}: {m}")
    with torch.no_grad():                                   # inference: the loop that keeps nothing
        inp = pack_padded_sequence(x32, lengths, enforce_sorted=False) if lengths is not None else x32
        out, (h, c) = fast(inp, (h32, c32))
        if lengths is not None:
            out = pad_packed_sequence(out, total_length=T)[0]
        for i, (a, b) in enumerate(zip((out, h, c), exp[:3])):
            torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m: f"inference item {i} on {isa}: {m}")


# ---------------------------------------------------------------------------- the kernels against the BLAS loops

def _layer(T, B, I, H, seed=0, scale=0.3):
    g = np.random.default_rng(seed)
    f = lambda *s: (g.standard_normal(s) * scale).astype(np.float32)      # noqa: E731
    return f(T * B, I), f(4 * H, I), f(4 * H), f(4 * H, H), f(B, H), f(B, H)


@pytest.mark.parametrize("T,B,I,H", [(5, 1, 8, 40), (4, 7, 12, 33), (3, 13, 5, 64),
                                     (3, 26, 300, 72)])         # the last: long k, more rows than 24
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("save", [True, False])
def test_panel_kernels_agree_with_the_blas_loops(isa, T, B, I, H, threads, save):
    """lstm_forward_panels (xp blocked, in torch's order, or the projection fused) and
    lstm_backward_panels give what lstm_forward / lstm_backward give on the same arguments."""
    K = cpu.kernels()
    x, w_ih, b, w_hh, h0, c0 = _layer(T, B, I, H)
    N, H4 = T * B, 4 * H
    offs = np.arange(T + 1, dtype=np.int64) * B
    per_thread = -(-H // threads)
    for ub in sorted({H, max(8, -(-per_thread // 8) * 8)}):                # one block; a block per thread
        perm = gate_perm(H, ub, 4)
        xp = x @ w_ih.T + b
        xpb = xp[:, perm.numpy()] if perm is not None else xp

        def outs():
            return (np.full(N * H, np.nan, np.float32), np.full(N * H if save else 2 * B * H, np.nan, np.float32),
                    np.full(N * H4, np.nan, np.float32))
        ref = outs()
        K.lstm_forward((xpb if save else xp).reshape(-1).copy(), w_hh.reshape(-1), h0.reshape(-1), c0.reshape(-1),
                       *ref, np.empty(B * H4, np.float32), offs, T, H, ub, threads, save, save)
        panels = np.full(K.lstm_panel_floats(H, I + H, ub, False), np.nan, np.float32)
        for fused in (False, True):
            got = outs()
            extra = (x.reshape(-1), I, w_ih.reshape(-1), b) if fused else ()
            K.lstm_forward_panels(None if fused else (xpb if save else xp).reshape(-1).copy(), w_hh.reshape(-1),
                                  h0.reshape(-1), c0.reshape(-1), *got, panels, offs, T, H, ub, threads, save,
                                  save, *extra)
            keep = 3 if save else 2
            for name, a, e in list(zip(("y", "c", "gates"), got, ref))[:keep]:
                np.testing.assert_allclose(a, e, rtol=1e-5, atol=2e-6, err_msg=f"{name}, fused={fused}, ub={ub}")
        if not save:
            continue
        y, cs, gates = ref
        dy = _layer(T, B, H, 1, seed=2)[0].reshape(-1)
        dh, dc = np.ones(B * H, np.float32), np.full(B * H, 0.5, np.float32)
        wb = (w_hh[perm.numpy()] if perm is not None else w_hh).reshape(-1).copy()
        res = {}
        for name in ("blas", "panels"):
            dg, dh_, dc_ = np.full(N * H4, np.nan, np.float32), dh.copy(), dc.copy()
            if name == "blas":
                K.lstm_backward(dy, wb, c0.reshape(-1), cs, gates, dg, dh_, dc_, offs, T, H, ub, threads)
            else:
                P = np.full(K.lstm_panel_floats(H, H, ub, True), np.nan, np.float32)
                K.lstm_backward_panels(dy, w_hh.reshape(-1), c0.reshape(-1), cs, gates, dg, dh_, dc_, P, offs, T, H,
                                       ub, threads)
            res[name] = (dg, dh_, dc_)
        for what, a, e in zip(("dG", "dh0", "dc0"), res["panels"], res["blas"]):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=2e-6, err_msg=f"{what}, ub={ub}")


def test_saturated_gates_inf_and_nan_as_torch(poison, isa):
    """Pre-activations far past the exp range saturate the gates exactly as torch's; an inf input
    and a NaN input give what torch gives, in the same rows."""
    ref, fast = _pair(4, 24)
    ref.float()
    for fill in (1e4, -1e4, float("inf"), float("nan")):
        for B in (1, 9):                                     # the one-row kernel; the fused projection
            x = torch.randn(5, B, 4)
            x[2, 0, 1] = fill
            x[4, B - 1] = -fill if fill == fill else fill
            with torch.no_grad():
                got, (h, c) = fast(x)
                exp, (eh, ec) = ref(x)
            for a, e in ((got, exp), (h, eh), (c, ec)):
                assert torch.equal(a.isnan(), e.isnan()), f"NaN positions differ for {fill} on {isa}"
                torch.testing.assert_close(a.nan_to_num(), e.nan_to_num(), **TOL)


# ---------------------------------------------------------------------------- which loop runs

def _spy(monkeypatch):
    K, calls = cpu.kernels(), []
    for name in ("lstm_forward", "lstm_forward_panels", "lstm_backward", "lstm_backward_panels"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, (lambda n, f: lambda *a, **k: calls.append(
            (n, a[15] if n == "lstm_forward_panels" and len(a) == 19 else None)) or f(*a, **k))(name, real))
    return calls                           # (lstm_forward_panels' 16th of 19 arguments: x, when fused)


@pytest.mark.parametrize("T,B,dtype,expect", [
    (6, 1, torch.float32, ["lstm_forward", "lstm_backward_panels"]),          # one row: BLAS's dot products
    (6, 2, torch.float32, ["lstm_forward_panels", "lstm_backward_panels"]),
    (6, 8, torch.float32, ["lstm_forward_panels:fused", "lstm_backward_panels"]),
    (1, 8, torch.float32, ["lstm_forward", "lstm_backward"]),            # T = 1: packing would cost more
    (6, 8, torch.float64, ["lstm_forward", "lstm_backward"]),            # the panels are fp32
])
def test_which_loop_runs(monkeypatch, T, B, dtype, expect):
    calls = _spy(monkeypatch)
    m = fastseq.nn.LSTM(5, 16).to(dtype)
    x = torch.randn(T, B, 5, dtype=dtype, requires_grad=True)
    m(x)[0].sum().backward()
    names = [n + (":fused" if n == "lstm_forward_panels" and calls[i][1] is not None else "")
             for i, (n, _) in enumerate(calls)]
    assert names == expect
    calls.clear()
    with torch.no_grad():
        m(x)
    assert [n for n, _ in calls] == [expect[0].split(":")[0]]
    assert cpu.fuses_projection(R.padded(T, B), dtype) == expect[0].endswith("fused")
    assert unit_block(16) >= 8


def test_panel_isa_names_what_it_was_given():
    with pytest.raises(ValueError, match="'sse9'"):
        cpu.panel_isa("sse9")
    assert cpu.panel_isa() in ISAS
    assert cpu.panel_isa("generic") == "generic"
    cpu.panel_isa("best")
    assert cpu.kernels().panel_width() in (4, 8, 16)


def test_reused_outputs_never_alias_a_live_tensor(monkeypatch):
    """fastseq._alloc.reused hands a buffer out again only once nothing holds it: not a view, not
    an array from .numpy(), not autograd's saved tensors; free buffers past the bound are let go."""
    from fastseq import _alloc
    monkeypatch.setattr(_alloc, "_POOL", [])
    shape, f32 = (512, 1024), torch.float32
    a = _alloc.reused(shape, f32)
    held = {"view": a[3:5]}
    b = _alloc.reused(shape, f32)
    held["numpy"] = b.numpy()
    c = _alloc.reused(shape, f32)
    w = torch.randn(shape, requires_grad=True)
    held["saved"] = (w * c).sum()                           # autograd saves c
    ptrs = {a.data_ptr(), b.data_ptr(), c.data_ptr()}
    del a, b, c
    d = _alloc.reused(shape, f32)
    assert d.data_ptr() not in ptrs and len(ptrs) == 3, "a buffer still held was handed out again"
    held.clear()
    e = _alloc.reused((1024, 512), f32)                     # the same bytes, free again now
    assert e.data_ptr() in ptrs
    del d, e
    monkeypatch.setattr(_alloc, "POOL_FREE_BYTES", 2 * 512 * 1024 * 4)
    keep = _alloc.reused((8, 8), f32)                       # any call trims the free ones past the bound
    assert sum(x[0].nbytes for x in _alloc._POOL if _alloc._free(x)) <= _alloc.POOL_FREE_BYTES
    del keep
    _alloc.release_pool()
    assert not [x for x in _alloc._POOL if _alloc._free(x)]


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request):
    """One thread (no team) and three (uneven splits of every block and column slice)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LayerNormLSTM", "LayerNormGRU"])
@pytest.mark.parametrize("bias", [True, False])
def test_thread_counts_bias_and_fused_packed_rows(poison, threads, monkeypatch, kind, bias):
    """Packed sequences of 8-10 rows a step (the LSTM's projection inside the loop with rows
    leaving), with and without biases, at one and three threads, against torch.nn / the reference
    in fp64."""
    import copy
    monkeypatch.setattr(cpu, "_BLOCK_FWD_MIN_H", 0)
    torch.manual_seed(0)
    lengths = torch.tensor([4, 4, 4, 2, 4, 4, 3, 4, 4, 4])
    T, B, I, H = 4, 10, 6, 40
    if kind.startswith("LayerNorm"):
        from _recurrent_helpers import ln_module
        fast = ln_module(kind, I, H, torch.float32, bias=bias)
        ref, backend = copy.deepcopy(fast).double(), "torch"
    else:
        ref = getattr(torch.nn, kind)(I, H, bias=bias).double()
        fast = getattr(fastseq.nn, kind)(I, H, bias=bias)
        fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        backend = None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)

    def run(mod, dt):
        xs = x.to(dt, copy=True).requires_grad_()
        out, st = mod(pack_padded_sequence(xs, lengths, enforce_sorted=False))
        out = pad_packed_sequence(out, total_length=T)[0]
        st = st if isinstance(st, tuple) else (st,)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dt).view_as(out)).sum() + sum(s.sum() for s in st)
        return [out, *st, *torch.autograd.grad(loss, [xs, *mod.parameters()])]
    got = run(fast, torch.float32)
    if backend:
        with fastseq.use_backend(backend):
            exp = run(ref, torch.float64)
    else:
        exp = run(ref, torch.float64)
    tol = dict(rtol=1e-3, atol=1e-4) if kind.startswith("LayerNorm") else TOL
    for i, (a, b) in enumerate(zip(got, exp)):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"item {i}, {threads} threads: {m}")


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
@pytest.mark.parametrize("T,B,C,H", [(6, 3, 11, 37), (4, 9, 16, 64), (5, 1, 7, 20)])
def test_layer_norm_cells_on_every_isa(poison, isa, kind, T, B, C, H):
    """The layer-normalized cells' per-step GEMM slices on the panels (forward h W_hh^T by rows of
    W_hh, backward dgh W_hh by its columns, the GRU's accumulating) against the reference in fp64."""
    import copy
    from _recurrent_helpers import ln_module
    torch.manual_seed(0)
    m = ln_module(kind, C, H, torch.float32)
    x = torch.randn(T, B, C, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    c0 = torch.randn(1, B, H, dtype=torch.float64)

    def hx(dt):
        leaf = lambda t: t.to(dt, copy=True).requires_grad_()     # noqa: E731
        return (leaf(h0), leaf(c0)) if kind == "LayerNormLSTM" else leaf(h0)

    def run(mod, dt):
        xs, hs = x.to(dt).requires_grad_(), hx(dt)
        out, st = mod(xs, hs)
        st = st if isinstance(st, tuple) else (st,)
        w = torch.linspace(-1, 1, out.numel(), dtype=dt).view_as(out)
        loss = (out * w).sum() + sum((s * s.detach().sin()).sum() for s in st)
        leaves = [xs, *(hs if isinstance(hs, tuple) else (hs,)), *mod.parameters()]
        return [out, *st, *torch.autograd.grad(loss, leaves)]
    got = run(m, torch.float32)
    with fastseq.use_backend("torch"):
        exp = run(copy.deepcopy(m).double(), torch.float64)
    for i, (a, b) in enumerate(zip(got, exp)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4, msg=lambda m_: f"item {i} on {isa}: {m_}")


@pytest.mark.parametrize("kind,kw", [("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})],
                         ids=["gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("T,B,I,H,lengths", [(6, 1, 5, 20, None), (5, 9, 7, 37, None), (4, 12, 16, 64, None),
                                             (7, 10, 6, 24, [7, 2, 5, 7, 1, 3, 6, 4, 7, 2])])
def test_gru_and_rnn_on_every_isa(poison, monkeypatch, isa, kind, kw, T, B, I, H, lengths):
    """The GRU's and RNN's unit blocks on the panels (forward gate rows, backward columns; the
    GRU's accumulating) against torch.nn in fp64: outputs, final state, every gradient.  The
    forwards' size thresholds are lowered so that these small layers take the panels too."""
    monkeypatch.setattr(cpu, "_BLOCK_FWD_MIN_ROWS", 0)
    monkeypatch.setattr(cpu, "_BLOCK_FWD_MIN_H", 0)
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H, **kw).double()
    fast = getattr(fastseq.nn, kind)(I, H, **kw)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, B, H, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths) if lengths is not None else None

    def run(mod, dt):
        xs, hs = x.to(dt, copy=True).requires_grad_(), h0.to(dt, copy=True).requires_grad_()
        inp = pack_padded_sequence(xs, lengths, enforce_sorted=False) if lengths is not None else xs
        out, h = mod(inp, hs)
        if lengths is not None:
            out = pad_packed_sequence(out, total_length=T)[0]
        w = torch.linspace(-1, 1, out.numel(), dtype=dt).view_as(out)
        loss = (out * w).sum() + (h * h.detach().sin()).sum()
        return [out, h, *torch.autograd.grad(loss, [xs, hs, *mod.parameters()])]
    for i, (a, b) in enumerate(zip(run(fast, torch.float32), run(ref, torch.float64))):
        torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m: f"item {i} on {isa}: {m}")


@pytest.mark.parametrize("kind,B,T,dtype,fwd,bwd", [
    ("GRU", 8, 6, torch.float32, False, True),     # H = 40 < 256: the forward keeps BLAS
    ("GRU", 1, 6, torch.float64, False, False),
    ("RNN", 8, 1, torch.float32, False, False),    # T = 1
    ("LayerNormLSTM", 3, 6, torch.float32, True, True),
    ("LayerNormGRU", 3, 6, torch.float64, False, False),
])
def test_which_loops_take_panels(monkeypatch, kind, B, T, dtype, fwd, bwd):
    """The panels argument the GRU / RNN / layer-normalized loops get: fp32 and T >= 2 (the GRU /
    RNN forwards from 8 rows a step and H = 256), else None (BLAS per step)."""
    K, seen = cpu.kernels(), {}
    prefix = {"GRU": "gru", "RNN": "rnn", "LayerNormLSTM": "ln_lstm", "LayerNormGRU": "ln_gru"}[kind]
    for part in ("forward", "backward"):
        name = f"{prefix}_{part}"
        real = getattr(K, name)
        spy = (lambda p, f: lambda *a: seen.__setitem__(p, a[-1] is not None) or f(*a))(part, real)
        monkeypatch.setattr(K, name, spy)
    m = getattr(fastseq.nn, kind)(5, 40).to(dtype)
    x = torch.randn(T, B, 5, dtype=dtype, requires_grad=True)
    m(x)[0].sum().backward()
    assert seen == {"forward": fwd, "backward": bwd}
