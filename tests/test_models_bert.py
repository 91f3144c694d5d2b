"""fastseq.models.bert.BERT against its torch.nn twin (TorchBERT), and mask_tokens' recipe."""
import pytest
import torch

import fastseq.functional as FF
from fastseq.models.bert import BERT, BERTConfig, example_batch, mask_tokens
from fastseq.models.reference.bert import TorchBERT

from _model_helpers import (assert_dropout_reproducible, assert_fp32_within, assert_loss_and_grads_match,
                            build_pair, loss_and_grads, train_steps)

SMALL = dict(vocab_size=61, max_positions=24, dim=32, layers=2, heads=4, ffn_dim=48)


def _pair(dtype=torch.float32, perturb=0.05, **kw):
    """The model and its twin with the same weights: BERT's init plus noise on every parameter
    (so norms, biases and the padding row are not at their initial values)."""
    torch.manual_seed(0)
    cfg = BERTConfig(**(SMALL | dict(dropout=0.0) | kw))
    return (cfg, *build_pair(BERT, TorchBERT, cfg, dtype, perturb=perturb))


def _batch(cfg, B=3, T=16, seed=1, segments=True):
    b = example_batch(cfg, B, T, torch.Generator().manual_seed(seed))
    if not segments:
        del b["segments"]
    return b


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("smoothing", [None, "torch", "fairseq"])
def test_loss_and_every_gradient_match_the_twin_fp64(smoothing, segments):
    cfg, fast, twin = _pair(torch.float64)
    kw = {} if smoothing is None else dict(label_smoothing=0.1, smoothing=smoothing)
    b = _batch(cfg, segments=segments)
    assert b["lengths"].min() < 16                           # the batch has padding
    gt = assert_loss_and_grads_match(fast, twin, b, rtol=1e-9, atol=1e-12, **kw)
    for k in gt:
        assert gt[k].abs().max() > 0, k                        # every parameter is reached


def test_fp32_error_is_within_a_small_multiple_of_torchs():
    cfg, fast, twin = _pair(torch.float32)
    _, _, ref = _pair(torch.float64)
    b = _batch(cfg, B=4, T=20)
    assert_fp32_within(*(loss_and_grads(net, b) for net in (fast, twin, ref)), factor=4, slack=1e-6)


def test_training_step_runs_the_layers_on_the_real_tokens_and_the_head_on_the_masked_rows_only(monkeypatch):
    from fastseq.models import packing
    cfg, fast, _ = _pair(torch.float32, dropout=0.1)
    b = _batch(cfg, B=3, T=16)
    layer_rows, head_rows = [], []
    real_layer, real_lce = packing.encoder_layer, FF.linear_cross_entropy

    def spy_layer(layer, x, *a, **k):
        layer_rows.append((layer, x.shape[0], layer.training))
        return real_layer(layer, x, *a, **k)

    def spy_lce(h, *a, **k):
        head_rows.append(h.shape[0])
        return real_lce(h, *a, **k)
    monkeypatch.setattr(packing, "encoder_layer", spy_layer)
    monkeypatch.setattr(FF, "linear_cross_entropy", spy_lce)
    fast.loss(b).backward()
    N = int(b["lengths"].sum())
    assert N < b["tokens"].numel()                           # the batch is padded
    assert layer_rows == [(layer, N, True) for layer in fast.layers]   # every layer, on the real tokens only
    assert head_rows == [int((b["targets"] != -100).sum())]
    assert 0 < head_rows[0] < 0.4 * b["tokens"].numel()


def test_logits_match_the_twin_in_eval_and_are_deterministic():
    cfg, fast, twin = _pair(torch.float64, dropout=0.1)
    fast.eval(), twin.eval()
    b = _batch(cfg)
    args = (b["tokens"], b["segments"], b["lengths"])
    a = fast(*args)
    assert a.shape == (3, 16, cfg.vocab_size)
    L = b["lengths"]
    live = torch.arange(16)[None, :] < L[:, None]           # torch's eval path leaves pads unspecified
    torch.testing.assert_close(a[live], twin(*args)[live], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, fast(*args), rtol=0, atol=0)
    torch.testing.assert_close(fast(b["tokens"]), twin(b["tokens"]), rtol=1e-10, atol=1e-12)


def test_padding_does_not_change_the_other_positions():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    b = _batch(cfg, B=3, T=12)
    tokens, segments, lengths = b["tokens"], b["segments"], b["lengths"]
    base = fast(tokens, segments, lengths)
    extra = 7                                                # more padding, with junk in it
    junk = torch.randint(cfg.vocab_size, (3, extra))
    longer = fast(torch.cat([tokens, junk], 1), torch.cat([segments, torch.ones(3, extra, dtype=torch.long)], 1),
                  lengths)
    changed = tokens.clone()
    for i, n in enumerate(lengths.tolist()):
        changed[i, n:] = (changed[i, n:] + 5) % cfg.vocab_size
    other = fast(changed, segments, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = fast(tokens[i:i + 1, :n], segments[i:i + 1, :n])                   # the row unpadded
        torch.testing.assert_close(longer[i, :n], base[i, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other[i, :n], base[i, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone[0], base[i, :n], rtol=1e-12, atol=1e-12)
    # and the loss (on the masked positions) does not see the padding either
    b2 = {"tokens": torch.cat([tokens, junk], 1), "segments": torch.cat([segments, segments[:, :extra]], 1),
          "lengths": lengths, "targets": torch.cat([b["targets"], torch.full((3, extra), -100)], 1)}
    torch.testing.assert_close(fast.loss(b2), fast.loss(b), rtol=1e-12, atol=0)


def test_segments_matter_and_default_to_zero_and_full_lengths_are_no_padding():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    t = _batch(cfg)["tokens"]
    zeros = torch.zeros_like(t)
    torch.testing.assert_close(fast(t), fast(t, zeros), rtol=0, atol=1e-13)
    torch.testing.assert_close(fast(t), fast(t, lengths=torch.full((3,), 16)), rtol=0, atol=1e-13)
    assert (fast(t) - fast(t, torch.ones_like(t))).abs().max() > 1e-4


def test_dropout_in_training_is_reproducible_from_the_seed_and_changes_the_loss():
    cfg, fast, _ = _pair(torch.float64, dropout=0.2)
    assert_dropout_reproducible(fast, _batch(cfg))


def test_initialization_follows_bert():
    cfg = BERTConfig(vocab_size=1000, max_positions=64, dim=256, layers=2, heads=4)
    torch.manual_seed(0)
    m = BERT(cfg)
    layer = m.layers[0]
    assert cfg.ffn_dim == 1024 and cfg.mask_id == 999 and cfg.layer_norm_eps == 1e-12
    for w in (m.embeddings.token.weight[1:], m.embeddings.position.weight, layer.self_attn.in_proj_weight,
              layer.linear1.weight, m.head.dense.weight):
        assert abs(w.std().item() - 0.02) < 1e-3
    assert m.embeddings.token.weight[cfg.pad_id].abs().max() == 0
    for bias in (layer.self_attn.in_proj_bias, layer.self_attn.out_proj.bias, layer.linear1.bias, m.head.bias,
                 m.head.dense.bias):
        assert bias.abs().max() == 0
    assert torch.all(layer.norm1.weight == 1) and torch.all(m.embeddings.norm.weight == 1)
    assert layer.norm1.eps == 1e-12 and not layer.norm_first and layer.self_attn.batch_first
    assert not any(k.startswith("head.") and k.endswith("weight") and v.shape[0] == cfg.vocab_size
                   for k, v in m.state_dict().items())                          # the output layer is tied


@pytest.mark.parametrize("field, value", [
    ("dim", 30), ("heads", 0), ("layers", 0), ("vocab_size", 1), ("dropout", 1.0), ("dropout", -0.1),
    ("pad_id", 61), ("mask_id", 0), ("mask_id", -1), ("max_positions", 0), ("type_vocab_size", True),
    ("layer_norm_eps", 0.0), ("ffn_dim", 0), ("init_std", -1.0)])
def test_bad_configs_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BERTConfig(**(SMALL | {field: value}))


def test_bad_inputs_are_rejected():
    cfg, fast, _ = _pair()
    t = torch.randint(2, 50, (2, 8))
    with pytest.raises(ValueError, match="lengths"):
        fast(t, lengths=torch.tensor([8, 9]))
    with pytest.raises(ValueError, match="lengths"):
        fast(t, lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="max_positions"):
        fast(torch.randint(2, 50, (1, 25)))
    with pytest.raises(ValueError, match="segments"):
        fast(t, segments=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fast.loss({"tokens": t, "targets": t[:, :4]})
    with pytest.raises(ValueError, match="tokens"):
        fast.loss({"targets": t})


def test_short_training_run_lowers_the_loss():
    cfg, fast, _ = _pair(torch.float32, perturb=0.0, dropout=0.1)
    b = _batch(cfg, B=4, T=16)
    first = fast.loss(b).item()
    train_steps(fast, b, lr=3e-3, steps=30)
    assert fast.eval().loss(b).item() < 0.5 * first


# ============================================================================ mask_tokens

def _corpus(B=256, T=128, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, V, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    tokens[:, 0] = 2                                          # [CLS]
    tokens[torch.arange(B), lengths - 1] = 3                  # [SEP]
    tokens[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # pad
    return tokens, lengths


def test_mask_tokens_follows_the_15_80_10_10_recipe():
    V, MASK = 1000, 4
    tokens, lengths = _corpus(V=V)
    keep = tokens.clone()
    g = torch.Generator().manual_seed(7)
    inputs, targets = mask_tokens(tokens, lengths, V, MASK, special_ids=(2, 3), generator=g)
    assert torch.equal(tokens, keep)                          # pure
    chosen = targets != -100
    live = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    eligible = live & (tokens != 2) & (tokens != 3)
    assert not (chosen & ~eligible).any()                     # no special, no pad
    assert torch.equal(targets[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    n = int(chosen.sum())
    assert abs(n / int(eligible.sum()) - 0.15) < 0.01          # ~25k eligible positions: sd 0.002
    masked = (inputs == MASK) & chosen
    same = (inputs == tokens) & chosen
    random = chosen & ~masked & ~same
    assert abs(int(masked.sum()) / n - 0.8) < 0.02
    assert abs(int(random.sum()) / n - 0.1) < 0.015
    assert abs(int(same.sum()) / n - 0.1) < 0.015
    assert len(set(inputs[random].tolist())) > 0.5 * min(V, int(random.sum()))   # spread over the vocabulary
    # per row the rate follows the row's eligible count (no row is starved or flooded on average)
    rows = chosen.sum(1).double() / eligible.sum(1).double()
    assert abs(rows.mean().item() - 0.15) < 0.01


def test_mask_tokens_is_deterministic_with_a_generator_and_varies_with_its_seed():
    tokens, lengths = _corpus(B=8, T=32)
    a = mask_tokens(tokens, lengths, 1000, 4, (2, 3), generator=torch.Generator().manual_seed(1))
    b = mask_tokens(tokens, lengths, 1000, 4, (2, 3), generator=torch.Generator().manual_seed(1))
    c = mask_tokens(tokens, lengths, 1000, 4, (2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_edge_cases_and_errors():
    t = torch.tensor([[7, 8, 9, 0, 0]])
    inputs, targets = mask_tokens(t, torch.tensor([3]), 10, 1, probability=1e-9, generator=torch.Generator())
    assert int((targets != -100).sum()) == 1 and (targets[0, 3:] == -100).all()   # never an empty batch
    _, none = mask_tokens(t, torch.tensor([3]), 10, 1, probability=0.0)
    assert (none == -100).all()
    _, every = mask_tokens(t, None, 10, 1, special_ids=(0,), probability=1.0)
    assert torch.equal(every, torch.tensor([[7, 8, 9, -100, -100]]))
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(t, None, 10, 1, probability=1.5)
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(t, None, 10, 10)
    with pytest.raises(ValueError, match="lengths"):
        mask_tokens(t, torch.tensor([6]), 10, 1)
    with pytest.raises(ValueError, match="tokens"):
        mask_tokens(t.float(), None, 10, 1)


def test_example_batch_has_the_documented_form():
    cfg = BERTConfig(**SMALL)
    b = example_batch(cfg, 4, 16, torch.Generator().manual_seed(0))
    assert set(b) == {"tokens", "targets", "segments", "lengths"}
    assert b["lengths"][0] == 16 and (b["lengths"] >= 8).all()
    pad = torch.arange(16)[None, :] >= b["lengths"][:, None]
    assert (b["tokens"][pad] == cfg.pad_id).all() and (b["targets"][pad] == -100).all()
    assert (b["targets"] != -100).any() and (b["segments"] <= 1).all() and (b["segments"][pad] == 0).all()
