"""Drop-in MultiheadAttention and Transformer modules: state_dicts load from torch's, outputs
and gradients match, masks of every kind, convert() on whole models."""
import pytest
import torch

import fastseq


def twins(torch_cls, fast_cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = torch_cls(*args, **kwargs)
    fast = fast_cls(*args, **kwargs)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_grads_match(ref, fast, out_ref, out_fast, inputs_ref=(), inputs_fast=()):
    g = torch.randn_like(out_ref)
    pr = [p for p in ref.parameters()] + list(inputs_ref)
    pf = [p for p in fast.parameters()] + list(inputs_fast)
    gr = torch.autograd.grad(out_ref, pr, g, allow_unused=True)
    gf = torch.autograd.grad(out_fast, pf, g, allow_unused=True)
    for a, b in zip(gr, gf):
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "kpm_suffix", "kpm_holes", "attn_bool", "attn_float", "both", "per_head"])
def test_mha_matches_torch(batch_first, masks):
    ref, fast = twins(torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention, 48, 4, batch_first=batch_first)
    B, T, S = 3, 13, 17
    q = torch.randn(B, T, 48) if batch_first else torch.randn(T, B, 48)
    kv = torch.randn(B, S, 48) if batch_first else torch.randn(S, B, 48)
    kw = {}
    if masks in ("kpm_suffix", "both"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, 10:] = True
        kw["key_padding_mask"] = kpm
    if masks == "kpm_holes":
        kw["key_padding_mask"] = torch.rand(B, S) > 0.7
    if masks in ("attn_bool", "both"):
        kw["attn_mask"] = torch.rand(T, S) > 0.8
    if masks == "attn_float":
        kw["attn_mask"] = torch.randn(T, S)
    if masks == "per_head":
        kw["attn_mask"] = torch.randn(B * 4, T, S)
    qr, qf = q.clone().requires_grad_(), q.clone().requires_grad_()
    o_ref, w_ref = ref(qr, kv, kv, **kw)
    o_fast, w_fast = fast(qf, kv, kv, **kw)
    torch.testing.assert_close(o_fast, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-4, atol=1e-5)
    assert_grads_match(ref, fast, o_ref, o_fast, [qr], [qf])


def test_mha_self_attention_causal_per_head_weights_and_unbatched():
    ref, fast = twins(torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention, 32, 2)
    x = torch.randn(9, 2, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    a = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=True, average_attn_weights=False)
    b = fast(x, x, x, attn_mask=causal, is_causal=True, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-5)
    u = torch.randn(9, 32)                                   # unbatched (L, E)
    a, b = ref(u, u, u, need_weights=False), fast(u, u, u, need_weights=False)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    assert a[1] is None and b[1] is None


def test_mha_kdim_vdim_and_no_bias():
    ref, fast = twins(torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention, 32, 4, bias=False,
                      kdim=20, vdim=12, batch_first=True)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 20), torch.randn(2, 7, 12)
    torch.testing.assert_close(fast(q, k, v)[0], ref(q, k, v)[0], rtol=1e-4, atol=1e-5)


def test_mha_dropout_in_training():
    ref, fast = twins(torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention, 16, 2, dropout=0.5)
    x = torch.randn(4, 2, 16)
    torch.manual_seed(5)                       # need_weights=True: torch's forward, torch's masks
    a = ref(x, x, x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(fast(x, x, x)[0], a)
    torch.manual_seed(5)                       # need_weights=False: the fused kernel's own dropout
    b = fast(x, x, x, need_weights=False)[0]
    torch.manual_seed(5)
    assert torch.equal(b, fast(x, x, x, need_weights=False)[0])
    assert not torch.allclose(b, fast.eval()(x, x, x, need_weights=False)[0])


def test_mha_is_causal_needs_a_mask_as_in_torch():
    ref, fast = twins(torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention, 8, 2)
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="is_causal hint"):
        ref(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal=True is a hint"):
        fast(x, x, x, is_causal=True)
    # torch's native fast path (eval, batch_first self-attention, no grad) ignores the hint and
    # attends to every key; fastseq raises there too rather than return a non-causal result
    fast = fastseq.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="is_causal=True is a hint"):
        fast(x, x, x, is_causal=True)


LAYER_KW = dict(d_model=32, nhead=4, dim_feedforward=48, dropout=0.0)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer(norm_first, batch_first, activation):
    ref, fast = twins(torch.nn.TransformerEncoderLayer, fastseq.nn.TransformerEncoderLayer, **LAYER_KW,
                      norm_first=norm_first, batch_first=batch_first, activation=activation)
    x = torch.randn(3, 10, 32) if batch_first else torch.randn(10, 3, 32)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[2, 6:] = True
    a, b = ref(x, src_key_padding_mask=kpm), fast(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert_grads_match(ref, fast, a, b)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer(norm_first):
    ref, fast = twins(torch.nn.TransformerDecoderLayer, fastseq.nn.TransformerDecoderLayer, **LAYER_KW,
                      norm_first=norm_first, batch_first=True)
    tgt, mem = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    a = ref(tgt, mem, tgt_mask=mask, tgt_is_causal=True)
    b = fast(tgt, mem, tgt_mask=mask, tgt_is_causal=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert_grads_match(ref, fast, a, b)


def test_encoder_decoder_and_transformer_containers():
    torch.manual_seed(0)
    enc = fastseq.nn.TransformerEncoder(fastseq.nn.TransformerEncoderLayer(**LAYER_KW, batch_first=True), 2,
                                        norm=fastseq.nn.LayerNorm(32))
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**LAYER_KW, batch_first=True), 2,
                                      norm=torch.nn.LayerNorm(32), enable_nested_tensor=False)
    assert enc.state_dict().keys() == ref.state_dict().keys()
    enc.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    torch.testing.assert_close(enc.eval()(x, src_key_padding_mask=kpm), ref.eval()(x, src_key_padding_mask=kpm),
                               rtol=1e-4, atol=1e-5)
    ref_t, fast_t = twins(torch.nn.Transformer, fastseq.nn.Transformer, d_model=32, nhead=4, num_encoder_layers=2,
                          num_decoder_layers=2, dim_feedforward=48, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 11, 32), torch.randn(2, 7, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    a = ref_t(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    b = fast_t(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert_grads_match(ref_t, fast_t, a, b)
    assert type(fast_t.encoder.layers[1].self_attn) is fastseq.nn.MultiheadAttention
    assert type(fast_t.decoder.norm) is fastseq.nn.LayerNorm


def test_convert_a_torch_transformer_model():
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=48, dropout=0.0).eval()
    src, tgt = torch.randn(11, 2, 32), torch.randn(7, 2, 32)
    expected = model(src, tgt)
    params = [id(p) for p in model.parameters()]
    model = fastseq.convert(model)        # the root itself is replaced: use the return value
    assert type(model) is fastseq.nn.Transformer
    assert type(model.encoder.layers[0]) is fastseq.nn.TransformerEncoderLayer
    assert type(model.decoder.layers[0].multihead_attn) is fastseq.nn.MultiheadAttention
    assert [id(p) for p in model.parameters()] == params and not model.training
    torch.testing.assert_close(model(src, tgt), expected, rtol=1e-4, atol=1e-5)
