"""fastseq.models.seq2seq: TransformerSeq2Seq and LSTMSeq2Seq against their torch.nn twins
(fastseq.models.reference.seq2seq) -- loss and every gradient, logits, greedy decoding -- plus
padding invariance, config and input checks, determinism and a short training run."""
import pytest
import torch

from fastseq.models.reference.seq2seq import TorchLSTMSeq2Seq, TorchTransformerSeq2Seq
from fastseq.models.seq2seq import (LSTMSeq2Seq, LSTMSeq2SeqConfig, TransformerSeq2Seq, TransformerSeq2SeqConfig,
                                    example_batch)

from _model_helpers import assert_fp32_within, build_pair, loss_and_grads, train_steps

TWIN = {TransformerSeq2Seq: TorchTransformerSeq2Seq, LSTMSeq2Seq: TorchLSTMSeq2Seq}


def transformer_config(**kw):
    base = dict(vocab_size=13, dim=16, layers=1, heads=2, ffn_dim=32, dropout=0.0, max_positions=24)
    return TransformerSeq2SeqConfig(**{**base, **kw})


def lstm_config(**kw):
    base = dict(vocab_size=13, dim=16, hidden=16, layers=1, dropout=0.0)
    return LSTMSeq2SeqConfig(**{**base, **kw})


def build(cls, config, dtype=torch.float32):
    """The fastseq model and its twin, with the same weights (loaded strictly)."""
    return build_pair(cls, TWIN[cls], config, dtype)


def assert_matches_twin(cls, config, dtype, B=3, T=8, **kw):
    """Loss and every gradient: fp64 tight; fp32 within a small multiple of the fp32 twin's own
    error, both measured against the twin run in fp64."""
    batch = example_batch(config, B, T, torch.Generator().manual_seed(3))
    model, twin = build(cls, config, dtype)
    ref = TWIN[cls](config).double()
    ref.load_state_dict(model.state_dict(), strict=True)
    got, mine, exact = (loss_and_grads(net, batch, **kw) for net in (model, twin, ref))
    assert got[1].keys() == exact[1].keys()
    assert all(g.abs().sum() > 0 for g in exact[1].values()), "a parameter without gradient"
    if dtype == torch.float64:
        for name, g, r in [("loss", got[0], exact[0])] + [(n, got[1][n], exact[1][n]) for n in exact[1]]:
            scale, err = r.abs().max().item(), (g.double() - r).abs().max().item()
            assert err <= 1e-10 * max(scale, 1e-3), (name, err, scale)
    else:                                                  # the loss's slack is relative to it, as a gradient's
        assert_fp32_within(got, mine, exact, factor=8, slack=2e-6, loss_slack=2e-6 * exact[0].abs().item())


# ---------------------------------------------------------------------------- against the twins

# every combination of sharing the source/target embeddings and tying the output layer
SHARE_TIE = pytest.mark.parametrize("shared, tied", [(False, False), (True, True), (True, False), (False, True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@SHARE_TIE
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_loss_and_grads_match_twin(norm_first, shared, tied, dtype):
    config = transformer_config(norm_first=norm_first, share_embeddings=shared, tie_weights=tied,
                                encoder_layers=2)
    assert_matches_twin(TransformerSeq2Seq, config, dtype)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_transformer_activations_match_twin(activation):
    assert_matches_twin(TransformerSeq2Seq, transformer_config(activation=activation, norm_first=True), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@SHARE_TIE
@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_loss_and_grads_match_twin(layers, shared, tied, dtype):
    config = lstm_config(layers=layers, hidden=24, share_embeddings=shared, tie_weights=tied)
    assert_matches_twin(LSTMSeq2Seq, config, dtype)


@pytest.mark.parametrize("smoothing", ["torch", "fairseq"])
@pytest.mark.parametrize("cls,config", [(TransformerSeq2Seq, transformer_config()), (LSTMSeq2Seq, lstm_config())])
def test_label_smoothing_matches_twin(cls, config, smoothing):
    assert_matches_twin(cls, config, torch.float64, label_smoothing=0.1, smoothing=smoothing)


@pytest.mark.parametrize("cls,config", [(TransformerSeq2Seq, transformer_config(dropout=0.2, tie_weights=True)),
                                        (LSTMSeq2Seq, lstm_config(dropout=0.2, layers=2))])
def test_eval_logits_match_twin_and_are_deterministic(cls, config):
    batch = example_batch(config, 3, 9, torch.Generator().manual_seed(5))
    model, twin = build(cls, config, torch.float64)
    model.eval(), twin.eval()
    args = batch["src"], batch["src_lengths"], batch["tgt_in"]
    with torch.no_grad():
        logits = model(*args)
        assert logits.shape == (3, 9, config.vocab_size)
        torch.testing.assert_close(logits, twin(*args), rtol=1e-10, atol=1e-10)
        assert torch.equal(model(*args), logits)                       # eval: no dropout
    model.train()                                                       # training: dropout is on, seeded by torch
    torch.manual_seed(7)
    a = model.loss(batch)
    b = model.loss(batch)
    torch.manual_seed(7)
    assert a != b and torch.equal(model.loss(batch), a)


def test_transformer_layers_run_on_the_real_tokens_only(monkeypatch):
    from fastseq.models import packing
    calls = []
    for name in ("encoder_layer", "decoder_layer"):
        real = getattr(packing, name)
        monkeypatch.setattr(packing, name, lambda layer, x, *a, _real=real, _n=name:
                            calls.append((_n, x.shape[0], layer.training)) or _real(layer, x, *a))
    for norm_first in (False, True):
        config = transformer_config(dropout=0.1, norm_first=norm_first, layers=2)
        batch = example_batch(config, 3, 8, torch.Generator().manual_seed(2))
        TransformerSeq2Seq(config).loss(batch).backward()
        M = int(batch["src_lengths"].sum())
        N = int(((batch["tgt_out"] != -100).sum(1)).clamp(min=1).sum())       # targets end with eos: no gaps
        assert M < 3 * 8 and N < 3 * 8                                        # both sides padded
        assert calls == [("encoder_layer", M, True)] * 2 + [("decoder_layer", N, True)] * 2
        calls.clear()


def test_positions_are_a_buffer_outside_the_state_dict():
    model = TransformerSeq2Seq(transformer_config())
    assert "positions" not in model.state_dict() and "positions" in dict(model.named_buffers())
    assert not any(p is model.positions for p in model.parameters())
    assert model.double().positions.dtype == torch.float64


# ---------------------------------------------------------------------------- padding

@pytest.mark.parametrize("cls,config", [(TransformerSeq2Seq, transformer_config(layers=2)),
                                        (TransformerSeq2Seq, transformer_config(norm_first=True)),
                                        (LSTMSeq2Seq, lstm_config(layers=2))])
def test_source_padding_changes_nothing(cls, config):
    batch = example_batch(config, 3, 8, torch.Generator().manual_seed(11))
    src, lengths, tgt_in = batch["src"], batch["src_lengths"], batch["tgt_in"]
    wide = torch.cat([src, torch.full((3, 5), config.pad_id)], 1)                 # 5 more pad columns
    model = cls(config).double()
    # training mode (the fused paths), dropout 0: the loss
    torch.testing.assert_close(model.loss({**batch, "src": wide}), model.loss(batch), rtol=1e-12, atol=0)
    model.eval()
    with torch.no_grad():
        logits = model(src, lengths, tgt_in)
        torch.testing.assert_close(model(wide, lengths, tgt_in), logits, rtol=1e-11, atol=1e-11)
        for i in range(3):                                                        # each row alone, unpadded
            n = int(lengths[i])
            torch.testing.assert_close(model(src[i:i + 1, :n], lengths[i:i + 1], tgt_in[i:i + 1]), logits[i:i + 1],
                                       rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------- greedy decoding

def assert_decoded_form(out, config, max_len):
    """Each row: tokens up to its first eos, pad after it; the loop stops once every row ended."""
    assert out.dtype == torch.int64 and 1 <= out.shape[1] <= max_len
    ended_rows = 0
    for row in out.tolist():
        if config.eos_id in row:
            k = row.index(config.eos_id)
            assert all(t == config.pad_id for t in row[k + 1:]), row
            ended_rows += 1
    if ended_rows == out.shape[0]:
        assert any(row[-1] == config.eos_id for row in out.tolist())            # stopped at the last eos
    else:
        assert out.shape[1] == max_len
    return ended_rows


@pytest.mark.parametrize("cls,make", [(TransformerSeq2Seq, transformer_config), (LSTMSeq2Seq, lstm_config)])
def test_greedy_decode_equals_the_twins(cls, make):
    config = make(vocab_size=5, dropout=0.1)                  # few tokens: rows meet eos early
    ended = 0
    for seed in range(6):                                     # at random init some seeds never say eos
        torch.manual_seed(seed)
        model, twin = build(cls, config, torch.float64)
        twin.eval()
        batch = example_batch(config, 4, 7, torch.Generator().manual_seed(seed))
        out = model.greedy_decode(batch["src"], batch["src_lengths"], 12)
        assert model.training                                  # the mode is restored
        assert torch.equal(out, twin.greedy_decode(batch["src"], batch["src_lengths"], 12)), seed
        ended += assert_decoded_form(out, config, 12)
    assert ended > 0


@pytest.mark.parametrize("cls,make", [(TransformerSeq2Seq, transformer_config), (LSTMSeq2Seq, lstm_config)])
def test_greedy_decode_stops_at_eos(cls, make):
    config = make(pad_id=3, bos_id=1, eos_id=0)
    model = cls(config)
    with torch.no_grad():
        model.output_proj.weight.zero_()                       # every logit 0: argmax is token 0, eos
    batch = example_batch(config, 3, 6)
    out = model.greedy_decode(batch["src"], batch["src_lengths"], 10)
    assert torch.equal(out, torch.zeros(3, 1, dtype=torch.long))


# ---------------------------------------------------------------------------- checks

@pytest.mark.parametrize("make,kw,field", [
    (TransformerSeq2SeqConfig, dict(dim=30, heads=4), "heads"),
    (TransformerSeq2SeqConfig, dict(dim=15, heads=5), "even"),
    (TransformerSeq2SeqConfig, dict(pad_id=13), "pad_id"),
    (TransformerSeq2SeqConfig, dict(eos_id=-1), "eos_id"),
    (TransformerSeq2SeqConfig, dict(pad_id=2, eos_id=2), "pad_id"),
    (TransformerSeq2SeqConfig, dict(dropout=1.0), "dropout"),
    (TransformerSeq2SeqConfig, dict(activation="tanh"), "activation"),
    (TransformerSeq2SeqConfig, dict(encoder_layers=0), "encoder_layers"),
    (TransformerSeq2SeqConfig, dict(max_positions=0), "max_positions"),
    (TransformerSeq2SeqConfig, dict(vocab_size=0), "vocab_size"),
    (LSTMSeq2SeqConfig, dict(hidden=31), "hidden"),
    (LSTMSeq2SeqConfig, dict(layers=0), "layers"),
    (LSTMSeq2SeqConfig, dict(bos_id=20), "bos_id"),
    (LSTMSeq2SeqConfig, dict(dropout=-0.1), "dropout"),
])
def test_bad_configs_raise(make, kw, field):
    with pytest.raises(ValueError, match=field):
        make(**{"vocab_size": 13, "dim": 16, **kw})


@pytest.mark.parametrize("cls,config", [(TransformerSeq2Seq, transformer_config()), (LSTMSeq2Seq, lstm_config())])
def test_bad_inputs_raise(cls, config):
    model = cls(config)
    b = example_batch(config, 2, 6)
    src, lengths, tgt = b["src"], b["src_lengths"], b["tgt_in"]
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, torch.tensor([0, 3]), tgt)
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, torch.tensor([7, 3]), tgt)
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, lengths[:1], tgt)
    with pytest.raises(ValueError, match="src"):
        model(src.float(), lengths, tgt)
    with pytest.raises(ValueError, match="tgt_in"):
        model(src, lengths, tgt[:1])
    with pytest.raises(ValueError, match="tgt_out"):
        model.loss({**b, "tgt_out": b["tgt_out"][:, :3]})
    with pytest.raises(ValueError, match="max_len"):
        model.greedy_decode(src, lengths, 0)
    if cls is TransformerSeq2Seq:
        with pytest.raises(ValueError, match="max_positions"):
            model(src, lengths, torch.ones(2, 25, dtype=torch.long))
        with pytest.raises(ValueError, match="max_len"):
            model.greedy_decode(src, lengths, 25)


def test_example_batch_form():
    config = transformer_config()
    b = example_batch(config, 4, 7, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in b.items()} == {"src": (4, 7), "src_lengths": (4,), "tgt_in": (4, 7),
                                                         "tgt_out": (4, 7)}
    for i in range(4):
        n = int(b["src_lengths"][i])
        assert (b["src"][i, n:] == config.pad_id).all() and (b["src"][i, :n] > 2).all()
        out = b["tgt_out"][i]
        k = int((out == config.eos_id).nonzero())                                 # target length
        assert (out[k + 1:] == -100).all() and b["tgt_in"][i, 0] == config.bos_id
        assert torch.equal(b["tgt_in"][i, 1:k + 1], out[:k]) and (b["tgt_in"][i, k + 1:] == config.pad_id).all()


# ---------------------------------------------------------------------------- training

def copy_task(config, B=16, n=6, seed=0):
    """Sources of 3..n random tokens, the target the source itself."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, n + 1, (B,), generator=g)
    pos = torch.arange(n).view(1, n)
    src = torch.randint(3, config.vocab_size, (B, n), generator=g).masked_fill_(pos >= lengths.view(-1, 1), 0)
    tgt_out = torch.cat([src, torch.zeros(B, 1, dtype=torch.long)], 1)                 # (B, n + 1)
    tgt_out[torch.arange(B), lengths] = config.eos_id
    tgt_out.masked_fill_(torch.arange(n + 1).view(1, -1) > lengths.view(-1, 1), -100)
    tgt_in = torch.cat([torch.full((B, 1), config.bos_id), src], 1)                    # pad (0) after the end
    return {"src": src, "src_lengths": lengths, "tgt_in": tgt_in, "tgt_out": tgt_out}


@pytest.mark.parametrize("cls,config,lr", [
    (TransformerSeq2Seq, transformer_config(dim=32, ffn_dim=64, heads=4, dropout=0.1, share_embeddings=True,
                                            tie_weights=True), 1e-2),
    (LSTMSeq2Seq, lstm_config(dim=32, hidden=32, dropout=0.1), 3e-2),
])
def test_training_on_a_copy_task_lowers_the_loss(cls, config, lr):
    model = cls(config)
    losses = train_steps(model, copy_task(config), lr=lr, steps=30, label_smoothing=0.05)
    assert losses[-1] < 0.5 * losses[0], losses
