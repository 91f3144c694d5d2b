"""fastseq.models.gpt.GPT against its torch.nn twin (TorchGPT) and against Hugging Face's GPT-2."""
import pytest
import torch

import fastseq

from fastseq.models.gpt import GPT, GPTConfig, example_batch
from fastseq.models.reference.gpt import TorchGPT

from _model_helpers import (assert_dropout_reproducible, assert_example_batch_does_not_share_storage,
                            assert_fp32_within, assert_loss_and_grads_match, build_pair, loss_and_grads,
                            train_steps)

SMALL = dict(vocab_size=97, max_positions=24, dim=32, layers=2, heads=4)


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(**(SMALL | dict(dropout=0.0) | kw))
    return (cfg, *build_pair(GPT, TorchGPT, cfg, dtype))


def _batch(cfg, B=3, T=19, seed=1):
    b = example_batch(cfg, B, T, torch.Generator().manual_seed(seed))
    b["targets"][0, :5] = -100                               # some positions without a loss
    return b


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("smoothing", [None, "torch", "fairseq"])
def test_loss_and_every_gradient_match_the_twin_fp64(tie, smoothing):
    cfg, fast, twin = _pair(torch.float64, tie_weights=tie)
    kw = {} if smoothing is None else dict(label_smoothing=0.1, smoothing=smoothing)
    assert_loss_and_grads_match(fast, twin, _batch(cfg), rtol=1e-9, atol=1e-12, **kw)


def test_fp32_error_is_within_a_small_multiple_of_torchs():
    cfg, fast, twin = _pair(torch.float32, activation="gelu")
    _, _, ref = _pair(torch.float64, activation="gelu")
    b = _batch(cfg, B=4, T=24)
    assert_fp32_within(*(loss_and_grads(net, b) for net in (fast, twin, ref)), factor=4, slack=1e-6)


def test_logits_match_the_twin_in_eval_and_are_deterministic():
    cfg, fast, twin = _pair(torch.float64, dropout=0.1)
    fast.eval(), twin.eval()
    tokens = _batch(cfg)["tokens"]
    a = fast(tokens)
    assert a.shape == (3, 19, cfg.vocab_size)
    torch.testing.assert_close(a, twin(tokens), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, fast(tokens), rtol=0, atol=0)


def test_dropout_in_training_is_reproducible_from_the_seed_and_changes_the_loss():
    cfg, fast, _ = _pair(torch.float64, dropout=0.2)
    assert_dropout_reproducible(fast, _batch(cfg))


def test_causality_a_later_token_does_not_change_earlier_logits():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    t = _batch(cfg)["tokens"]
    u = t.clone()
    u[:, 10] = (u[:, 10] + 1) % cfg.vocab_size
    a, b = fast(t), fast(u)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-13)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-6


def test_initialization_follows_gpt2():
    cfg = GPTConfig(vocab_size=1000, max_positions=64, dim=256, layers=8, heads=4)
    torch.manual_seed(0)
    m = GPT(cfg)
    blk = m.blocks[0]
    assert abs(m.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(blk.mlp.fc.weight.std().item() - 0.02) < 1e-3
    assert abs(blk.mlp.proj.weight.std().item() - 0.02 / 4) < 3e-4           # 1 / sqrt(2 * 8)
    assert blk.attn.qkv.bias.abs().max() == 0 and torch.all(blk.ln_1.weight == 1)
    assert "head.weight" not in m.state_dict()                                # tied
    assert m.output_weight is m.tok_emb.weight


def test_short_training_run_lowers_the_loss():
    cfg, fast, _ = _pair(torch.float32, dropout=0.1)
    b = _batch(cfg, B=4, T=16)
    first = fast.loss(b).item()
    train_steps(fast, b, lr=3e-3, steps=30)
    assert fast.eval().loss(b).item() < 0.5 * first


@pytest.mark.parametrize("field, value", [("dim", 30), ("heads", 0), ("vocab_size", -1), ("dropout", 1.0),
                                          ("attention_dropout", -0.1), ("activation", "tanh"),
                                          ("layer_norm_eps", 0.0), ("ffn_dim", 0)])
def test_bad_configs_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "dim" else "divisible"):
        GPTConfig(**(SMALL | {field: value}))


def test_bad_input_is_rejected():
    cfg, fast, _ = _pair()
    with pytest.raises(ValueError, match="max_positions"):
        fast(torch.zeros(1, cfg.max_positions + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        fast(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(SMALL))
    b = _batch(cfg)
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(3, 19\), got \(3, 18\)"):
        fast.loss({"tokens": b["tokens"], "targets": b["targets"][:, :-1]})
    with pytest.raises(ValueError, match=r"'tokens' and 'targets', got \['tokens'\]"):
        fast.loss({"tokens": b["tokens"]})
    with pytest.raises(ValueError, match="got Tensor"):
        fast.loss(b["tokens"])


@pytest.mark.parametrize("B", [1, 3])
def test_example_batch_tokens_and_targets_do_not_share_storage(B):
    b = example_batch(GPTConfig(**SMALL), B, 7, torch.Generator().manual_seed(0))
    assert_example_batch_does_not_share_storage(b)


# ---------------------------------------------------------------------------- Hugging Face GPT-2

def _hf_config(tie=True, act="gelu_new"):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, n_inner=None,
                                   activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   tie_word_embeddings=tie)


def _hf(tie=True, act="gelu_new"):
    hc = _hf_config(tie, act)
    import transformers
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():                 # HF zero-initializes biases and sets norms to 1: randomize all
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.mark.parametrize("tie, act", [(True, "gelu_new"), (False, "relu")])
def test_from_hf_gives_hugging_faces_logits_and_loss(tie, act):
    hf = _hf(tie, act)
    fast = GPT.from_hf(hf).eval()
    assert fast.config.tie_weights is tie and fast.config.dim == 48
    tokens = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(tokens, labels=tokens)
        got = fast(tokens)
        loss = fast.loss({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
    torch.testing.assert_close(got, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-5)


def test_from_hf_overrides_and_rejects_other_attention():
    hf = _hf()
    assert GPT.from_hf(hf, dropout=0.3).config.dropout == 0.3
    hf.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_hf(hf)


def test_from_hf_needs_the_output_layer_when_untied():
    config_tied, config_untied = _hf_config(tie=True), _hf_config(tie=False)
    import transformers
    tied = transformers.GPT2Model(config_tied)                      # bare: no lm_head, the embedding is the head
    assert GPT.from_hf(tied).config.tie_weights
    bare = transformers.GPT2Model(config_untied)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False.*'lm_head.weight'"):
        GPT.from_hf(bare)


# ---------------------------------------------------------------------------- the KV cache (DESIGN §8)

def _decode_in_steps(model, tokens, mask=None, prefill=5, max_length=None):
    """Logits of tokens (B, T): the first `prefill` in one call, then one token a call."""
    B, T = tokens.shape
    cache = model.new_cache(B, max_length or T)
    out, cache = model(tokens[:, :prefill], cache=cache,
                       attention_mask=None if mask is None else mask[:, :prefill])
    outs = [out]
    for t in range(prefill, T):
        out, cache = model(tokens[:, t:t + 1], cache=cache, attention_mask=None if mask is None else mask[:, :t + 1])
        outs.append(out)
    assert cache.length == T
    return torch.cat(outs, 1), cache


def test_cached_decoding_equals_the_full_forward():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    tokens = _batch(cfg, B=3, T=14)["tokens"]
    steps, _ = _decode_in_steps(fast, tokens, max_length=20)
    torch.testing.assert_close(steps, fast(tokens), rtol=1e-10, atol=1e-12)


def test_left_padded_rows_decode_as_if_alone():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    tokens = _batch(cfg, B=3, T=14)["tokens"]
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, :4] = 0                                          # row 1: 4 pads on the left
    mask[2, :1] = 0
    steps, _ = _decode_in_steps(fast, tokens, mask)
    for b, pads in ((0, 0), (1, 4), (2, 1)):
        torch.testing.assert_close(steps[b, pads:], fast(tokens[b:b + 1, pads:])[0], rtol=1e-10, atol=1e-12)


def test_reorder_moves_the_rows():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    tokens = _batch(cfg, B=3, T=10)["tokens"]
    _, cache = _decode_in_steps(fast, tokens[:, :9], max_length=10)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    last, _ = fast(tokens[index, 9:], cache=cache)
    torch.testing.assert_close(last[:, 0], fast(tokens[index])[:, -1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="int64 index"):
        cache.reorder(torch.tensor([0, 1, 2, 0]))              # more rows than the cache holds
    with pytest.raises(ValueError, match="int64 index"):
        cache.reorder(torch.tensor([0, 1], dtype=torch.int32))


def test_reorder_with_fewer_rows_drops_the_others():
    """An index shorter than the batch keeps the rows it names (rows that finished leave)."""
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    tokens = _batch(cfg, B=3, T=10)["tokens"]
    _, cache = _decode_in_steps(fast, tokens[:, :9], max_length=10)
    keep = torch.tensor([2, 0])
    cache.reorder(keep)
    assert cache.batch_size == 2
    with torch.no_grad():
        last, _ = fast(tokens[keep, 9:], cache=cache)
    torch.testing.assert_close(last[:, 0], fast(tokens[keep])[:, -1], rtol=1e-10, atol=1e-12)


def test_cache_bounds_and_masks_are_checked():
    cfg, fast, _ = _pair()
    fast.eval()
    cache = fast.new_cache(2, 4)
    with pytest.raises(ValueError, match="max_length 4"):
        fast(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        fast(torch.zeros(2, 3, dtype=torch.long), cache=cache, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_length"):
        fast.new_cache(2, cfg.max_positions + 1)


def test_a_cached_continuation_of_several_tokens_is_causal():
    """Tokens appended to a cache in chunks give the logits of one full forward (each chunk is
    causal among its own positions, aligned to the cache's end), on both backends."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=97, max_positions=64, dim=64, layers=2, heads=4, dropout=0.0)).double().eval()
    ids = torch.randint(0, 97, (2, 9))
    for backend in ("cpu", "torch"):
        with torch.no_grad(), fastseq.use_backend(backend):
            full = m(ids)
            cache = m.new_cache(2, 12)
            parts = [m(ids[:, a:b], cache=cache)[0] for a, b in ((0, 4), (4, 7), (7, 8), (8, 9))]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)
