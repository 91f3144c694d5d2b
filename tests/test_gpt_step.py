"""GPT's fused decode step (kernels/cpu/decode.pyx via fastseq/generation/gpt_step.py) against
GPT's own module-by-module path (its reference, forced with use_backend("torch")): logits and
cache contents over several steps, left padding, every activation, tied and untied heads, fp64
and fp32, one and two threads; when it is taken and when not; bad input."""

import pytest
import torch

import fastseq
from fastseq.generation import gpt_step
from fastseq.models.gpt import GPT, GPTConfig

V = 97


def _model(dtype=torch.float64, **kw):
    torch.manual_seed(11)
    cfg = dict(vocab_size=V, max_positions=64, dim=64, layers=2, heads=4, dropout=0.0)
    m = GPT(GPTConfig(**(cfg | kw))).to(dtype).eval()
    with torch.no_grad():                    # biases and norms away from 0 and 1
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _prompt(B=3, P=7, padded=True):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.int64)
    if padded:
        mask[1, :3] = 0
        if B > 2:
            mask[2, :1] = 0
    return ids, mask


def _decode(m, ids, mask, steps, backend):
    """Prefill then `steps` one-token steps on the given backend: (step logits (B, steps, V), cache)."""
    B = ids.shape[0]
    ctx = fastseq.use_backend("torch") if backend == "torch" else torch.no_grad()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), ctx:
        cache = m.new_cache(B, ids.shape[1] + steps + 1)
        logits, cache = m(ids, cache=cache, attention_mask=mask)
        out = []
        for _ in range(steps):
            tok = torch.randint(0, V, (B, 1), generator=g)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits, cache = m(tok, cache=cache, attention_mask=mask)
            out.append(logits)
    return torch.cat(out, 1), cache


def _close(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "silu"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_step_matches_the_module_path(activation, padded):
    m = _model(activation=activation)
    ids, mask = _prompt(padded=padded)
    mask = mask if padded else None
    fused, cf = _decode(m, ids, mask, 5, "cpu")
    ref, cr = _decode(m, ids, mask, 5, "torch")
    _close(fused, ref, torch.float64)
    n = cr.length
    assert cf.length == n
    if mask is None:                          # every cached key and value (the pads' are never read)
        _close(cf.kv[:, :, :, :, :n], cr.kv[:, :, :, :, :n], torch.float64)


def test_fused_step_fp32_untied_head_and_ffn_size():
    m = _model(torch.float32, tie_weights=False, ffn_dim=80)
    ids, mask = _prompt()
    fused, _ = _decode(m, ids, mask, 4, "cpu")
    ref, _ = _decode(m, ids, mask, 4, "torch")
    _close(fused, ref, torch.float32)


def test_fused_step_is_taken_and_does_not_depend_on_the_thread_count(monkeypatch):
    m = _model()
    ids, mask = _prompt()
    calls = []
    real = gpt_step.decode_step
    monkeypatch.setattr(gpt_step, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _decode(m, ids, mask, 3, "cpu")
        torch.set_num_threads(2)
        two, _ = _decode(m, ids, mask, 3, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 6
    _close(one, two, torch.float64)


def test_fused_step_is_not_taken_for_training_gradients_or_several_tokens():
    m = _model(dropout=0.1)
    tok = torch.zeros(2, 1, dtype=torch.int64)
    cache = m.new_cache(2, 8)
    m.train()
    assert gpt_step.backend(m, tok, cache) == "torch"                    # dropout in training
    m.eval()
    assert gpt_step.backend(m, tok, cache) == "torch"                    # gradients wanted
    with torch.no_grad():
        assert gpt_step.backend(m, tok, cache) == "cpu"
    assert "gradients" in fastseq.explain(gpt_step.OP, m, tok, cache)
    with torch.no_grad():
        assert gpt_step.backend(m.to(torch.bfloat16), tok, m.new_cache(2, 8)) == "torch"


def test_fused_step_keeps_the_cache_in_step_with_a_multi_token_continuation():
    """A prompt prefilled in two chunks, then fused steps, equals one prefill then fused steps."""
    m = _model()
    ids, _ = _prompt(B=2, padded=False)
    with torch.no_grad():
        c1 = m.new_cache(2, 12)
        m(ids[:, :4], cache=c1)
        m(ids[:, 4:], cache=c1)
        a, _ = m(ids[:, :1], cache=c1)
        c2 = m.new_cache(2, 12)
        m(ids, cache=c2)
        b, _ = m(ids[:, :1], cache=c2)
    _close(a, b, torch.float64)


def test_fused_step_rejects_bad_input():
    m = _model()
    with torch.no_grad():
        cache = m.new_cache(2, 3)
        m(torch.zeros(2, 2, dtype=torch.int64), cache=cache)
        with pytest.raises(ValueError, match="vocab_size"):
            m(torch.tensor([[0], [V]]), cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, cached \+ new\) = \(2, 3\)"):
            m(torch.zeros(2, 1, dtype=torch.int64), cache=cache, attention_mask=torch.ones(2, 2))
        with pytest.raises(ValueError, match="rows"):
            m(torch.zeros(3, 1, dtype=torch.int64), cache=cache)
        m(torch.zeros(2, 1, dtype=torch.int64), cache=cache)
        with pytest.raises(ValueError, match="max_length"):
            m(torch.zeros(2, 1, dtype=torch.int64), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_batch_dot_path_and_blas_path_agree(dtype):
    """Batches up to set_small_rows' size take _dot_rows.h (fp32) / plain loops (fp64), larger ones
    BLAS: both against the module path, with a K not a multiple of 8 and N not of 4."""
    from fastseq import _blas
    k = _blas.cpu_kernels("decode")
    m = _model(dtype, dim=36, heads=3, ffn_dim=70, vocab_size=V)
    ids, mask = _prompt(B=5)
    ref, _ = _decode(m, ids, mask, 3, "torch")
    try:
        for small in (0, 8):
            k.set_small_rows(small)
            fused, _ = _decode(m, ids, mask, 3, "cpu")
            _close(fused, ref, dtype)
    finally:
        k.set_small_rows(8)


def test_fused_step_sees_replaced_and_strided_weights():
    """The weight table is reused between steps only while every slot holds the same tensor at
    the same address: a replaced Parameter, new .data and a transposed (strided) weight are seen."""
    m = _model()
    ids, mask = _prompt()
    _decode(m, ids, mask, 1, "cpu")                                   # builds and keeps the table
    with torch.no_grad():
        m.ln_f.weight = torch.nn.Parameter(m.ln_f.weight * 1.5)
        m.blocks[1].mlp.fc.bias.data = m.blocks[1].mlp.fc.bias.data + 0.3
        w = m.blocks[0].attn.proj.weight
        m.blocks[0].attn.proj.weight = torch.nn.Parameter(w.t().contiguous().t())   # same values, strided
    assert not m.blocks[0].attn.proj.weight.is_contiguous()
    fused, _ = _decode(m, ids, mask, 3, "cpu")
    ref, _ = _decode(m, ids, mask, 3, "torch")
    _close(fused, ref, torch.float64)


def _decode_with_reorders(m, ids, mask, backend, small_rows):
    """Prefill, then steps with beam-style reorders (duplicates, then a shrinking index that is
    not increasing) and a padded mask, on a cache whose unwritten storage is NaN (a read of a
    position not held, or of another row's, would show)."""
    from fastseq import _blas
    k = _blas.cpu_kernels("decode")
    B = ids.shape[0]
    g = torch.Generator().manual_seed(4)
    ctx = fastseq.use_backend("torch") if backend == "torch" else torch.no_grad()
    out = []
    try:
        k.set_small_rows(small_rows)
        with torch.no_grad(), ctx:
            cache = m.new_cache(B, ids.shape[1] + 6)
            cache.kv.fill_(float("nan"))
            logits, cache = m(ids, cache=cache, attention_mask=mask)
            for index in (None, torch.tensor([2, 2, 0, 1]), None, torch.tensor([3, 0, 1]), None):
                if index is not None:
                    cache.reorder(index)
                    mask = mask.index_select(0, index)
                b = mask.shape[0]
                tok = torch.randint(0, V, (b, 1), generator=g)
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                logits, cache = m(tok, cache=cache, attention_mask=mask)
                out.append(logits)
    finally:
        k.set_small_rows(8)
    return out


@pytest.mark.parametrize("small_rows", [8, 0])
def test_fused_step_through_the_origin_table_with_a_mask(small_rows):
    """Beam search's reorders move a table of cache rows, not the keys: the fused step (dot path
    and BLAS path) reads through it with a padded mask, fp64, as the module path reads the
    gathered keys; nothing outside the held positions is read (the rest of the cache is NaN)."""
    m = _model()
    ids, mask = _prompt(B=4)
    got = _decode_with_reorders(m, ids, mask, "cpu", small_rows)
    want = _decode_with_reorders(m, ids, mask, "torch", small_rows)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        _close(a, b, torch.float64)


def test_int32_tokens_and_more_threads_than_heads():
    m = _model(heads=2)
    ids, mask = _prompt()
    ref, _ = _decode(m, ids, mask, 3, "torch")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)                                    # a thread with no head, few columns
        fused, _ = _decode(m, ids, mask, 3, "cpu")
    finally:
        torch.set_num_threads(threads)
    _close(fused, ref, torch.float64)
    with torch.no_grad():
        c64, c32 = m.new_cache(3, 9), m.new_cache(3, 9)
        m(ids, cache=c64, attention_mask=mask)
        m(ids, cache=c32, attention_mask=mask)
        step_mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
        a, _ = m(torch.tensor([[1], [2], [3]]), cache=c64, attention_mask=step_mask)
        b, _ = m(torch.tensor([[1], [2], [3]], dtype=torch.int32), cache=c32, attention_mask=step_mask)
    assert torch.equal(a, b)
