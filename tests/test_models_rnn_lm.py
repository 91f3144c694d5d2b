"""fastseq.models.rnn_lm.RNNLM against its torch.nn twin (TorchRNNLM: nn.LSTM / nn.GRU, and a
step-by-step loop for the layer-normalized cells), for every cell type."""
import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

from fastseq.models.reference.rnn_lm import TorchRNNLM
from fastseq.models.rnn_lm import CELLS, RNNLM, RNNLMConfig, example_batch

from _model_helpers import (assert_dropout_reproducible, assert_example_batch_does_not_share_storage,
                            assert_fp32_within, assert_loss_and_grads_match, build_pair, loss_and_grads,
                            train_steps)

SMALL = dict(vocab_size=41, dim=24, hidden=24, layers=2)


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = RNNLMConfig(**(SMALL | dict(dropout=0.0) | kw))
    return (cfg, *build_pair(RNNLM, TorchRNNLM, cfg, dtype))


def _batch(cfg, B=3, T=11, seed=1):
    b = example_batch(cfg, B, T, torch.Generator().manual_seed(seed))
    b["targets"][0, :4] = -100                               # some positions without a loss
    return b


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("smoothing", [None, "torch", "fairseq"])
def test_loss_and_every_gradient_match_the_twin_fp64(cell, smoothing):
    cfg, fast, twin = _pair(torch.float64, cell=cell)
    kw = {} if smoothing is None else dict(label_smoothing=0.1, smoothing=smoothing)
    assert_loss_and_grads_match(fast, twin, _batch(cfg), rtol=1e-9, atol=1e-12, **kw)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_untied_with_hidden_unlike_dim_matches_the_twin(cell):
    cfg, fast, twin = _pair(torch.float64, cell=cell, hidden=16, tie_weights=False, layers=1)
    assert fast.decoder.weight.shape == (41, 16) and fast.decoder.weight is not fast.encoder.weight
    assert_loss_and_grads_match(fast, twin, _batch(cfg), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cell", list(CELLS))
def test_fp32_error_is_within_a_small_multiple_of_torchs(cell):
    cfg, fast, twin = _pair(torch.float32, cell=cell)
    _, _, ref = _pair(torch.float64, cell=cell)
    b = _batch(cfg, B=3, T=16)
    assert_fp32_within(*(loss_and_grads(net, b) for net in (fast, twin, ref)), factor=4, slack=1e-6,
                       twin_error="worst")


@pytest.mark.parametrize("cell", list(CELLS))
def test_logits_and_state_match_the_twin_in_eval_and_are_deterministic(cell):
    cfg, fast, twin = _pair(torch.float64, cell=cell, dropout=0.3)
    fast.eval(), twin.eval()
    tokens = _batch(cfg)["tokens"]
    a, sa = fast(tokens, return_state=True)
    t, st = twin(tokens, return_state=True)
    assert a.shape == (3, 11, cfg.vocab_size)
    torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
    for x, y in zip(sa if cfg.has_cell_state else [sa], st if cfg.has_cell_state else [st]):
        assert x.shape == (cfg.layers, 3, cfg.hidden)
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, fast(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "layer_norm_gru"])
def test_state_carries_across_calls_as_in_one_call(cell):
    cfg, fast, twin = _pair(torch.float64, cell=cell)
    b = _batch(cfg, T=12)
    tokens = b["tokens"]
    whole = fast(tokens)
    first, state = fast(tokens[:, :5], return_state=True)
    second = fast(tokens[:, 5:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-12)
    # the loss starts from batch["state"] when given (truncated BPTT), as the twin's does
    rest = {"tokens": tokens[:, 5:], "targets": b["targets"][:, 5:], "state": state}
    torch.testing.assert_close(fast.loss(rest), twin.loss(rest), rtol=1e-12, atol=0)
    assert abs(fast.loss(rest).item() - fast.loss({k: rest[k] for k in ("tokens", "targets")}).item()) > 1e-6


def test_loss_is_the_cross_entropy_of_the_forward_logits():
    cfg, fast, _ = _pair(torch.float64, cell="gru")
    b = _batch(cfg)
    logits = fast(b["tokens"])
    torch.testing.assert_close(fast.loss(b), F.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                             b["targets"].reshape(-1)), rtol=1e-12, atol=0)


def test_dropout_in_training_is_reproducible_from_the_seed_and_changes_the_loss():
    cfg, fast, _ = _pair(torch.float64, dropout=0.2)
    assert_dropout_reproducible(fast, _batch(cfg))


@pytest.mark.parametrize("B", [1, 3])
def test_example_batch_tokens_and_targets_do_not_share_storage(B):
    b = example_batch(RNNLMConfig(**SMALL), B, 7, torch.Generator().manual_seed(0))
    assert_example_batch_does_not_share_storage(b)


@pytest.mark.parametrize("cell", list(CELLS))
def test_the_twin_is_time_major_as_word_language_model(cell):
    _, _, twin = _pair(torch.float64, cell=cell)
    assert not twin.rnn.batch_first
    if cell in ("lstm", "gru"):
        assert type(twin.rnn) is {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]


def test_initialization_and_tying_follow_word_language_model():
    torch.manual_seed(0)
    m = RNNLM(RNNLMConfig(vocab_size=500, dim=64, hidden=64, cell="layer_norm_lstm"))
    assert m.decoder.weight is m.encoder.weight
    assert m.encoder.weight.abs().max() <= 0.1 and m.encoder.weight.abs().max() > 0.09
    assert m.decoder.bias.abs().max() == 0
    assert m.rnn.dropout == 0.2 and m.rnn.num_layers == 2 and type(m.rnn).__name__ == "LayerNormLSTM"
    assert torch.all(m.rnn.norm_c_weight_l1 == 1)
    keys = set(m.state_dict())
    assert {"encoder.weight", "decoder.weight", "decoder.bias", "rnn.weight_ih_l0", "rnn.norm_ih_weight_l1"} <= keys


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("dim", -1), ("hidden", 2.5), ("layers", 0),
                                          ("cell", "rnn"), ("dropout", 1.0), ("dropout", -0.1),
                                          ("layer_norm_eps", 0.0)])
def test_bad_configs_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RNNLMConfig(**{field: value})


def test_tied_weights_need_hidden_equal_to_dim():
    with pytest.raises(ValueError, match=r"tie_weights.*hidden=32, dim=24"):
        RNNLMConfig(dim=24, hidden=32, tie_weights=True)
    RNNLMConfig(dim=24, hidden=32, tie_weights=False)


def test_bad_inputs_are_rejected():
    cfg, fast, _ = _pair()
    with pytest.raises(ValueError, match="tokens"):
        fast(torch.zeros(5, dtype=torch.long))
    b = _batch(cfg)
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(3, 11\), got \(3, 10\)"):
        fast.loss({"tokens": b["tokens"], "targets": b["targets"][:, :-1]})
    with pytest.raises(ValueError, match=r"'tokens' and 'targets', got \['tokens'\]"):
        fast.loss({"tokens": b["tokens"]})
    with pytest.raises(ValueError, match="got Tensor"):
        fast.loss(b["tokens"])
    with pytest.raises(TypeError, match="RNNLMConfig"):
        RNNLM(dict(SMALL))


def _text_batch(B, T, offset=0):
    """A fixed batch of real English text (Python's own help topics), byte-level."""
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()
    seq = torch.tensor(list(text[offset:offset + B * (T + 1)]), dtype=torch.long).view(B, T + 1)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}


@pytest.mark.parametrize("cell", ["lstm", "gru", "layer_norm_lstm"])
def test_short_training_run_on_text_lowers_the_loss(cell):
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(vocab_size=256, dim=32, hidden=32, layers=1, cell=cell, dropout=0.1))
    b = _text_batch(4, 24, offset=1000)
    first = model.eval().loss(b).item()
    train_steps(model.train(), b, lr=2e-2, steps=30)
    last = model.eval().loss(b).item()
    assert last < 0.6 * first, (first, last)


# ---------------------------------------------------------------------------- the recurrent cache (DESIGN §8)

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cached_decoding_equals_the_full_forward_and_reorders(cell):
    import torch
    from fastseq.models.rnn_lm import RNNLM, RNNLMConfig
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(vocab_size=37, dim=16, hidden=16, layers=2, cell=cell, dropout=0.0)).double().eval()
    tokens = torch.randint(0, 37, (3, 9))
    cache = model.new_cache(3, 9)
    out, cache = model(tokens[:, :4], cache=cache)
    outs = [out]
    for t in range(4, 8):
        out, cache = model(tokens[:, t:t + 1], cache=cache, attention_mask=torch.ones(3, t + 1))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), model(tokens[:, :8]), rtol=1e-10, atol=1e-12)
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    last, cache = model(tokens[index, 8:], cache=cache)
    torch.testing.assert_close(last[:, 0], model(tokens[index])[:, -1], rtol=1e-10, atol=1e-12)
    assert cache.length == 9
    with pytest.raises(ValueError, match="max_length"):
        model(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="left padding"):
        model(tokens[:, :1], cache=model.new_cache(3), attention_mask=torch.tensor([[0, 1], [1, 1], [1, 1]]))
