"""fastseq.models.elmo.ELMo against its torch.nn twin (TorchELMo: nn.LSTM with proj_size, or the
step-by-step layer-normalized LSTM), padding, the two directions' semantics, and ScalarMix."""
import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

from fastseq.models.elmo import ELMo, ELMoConfig, ScalarMix, example_batch
from fastseq.models.reference.elmo import TorchELMo

from _model_helpers import (assert_dropout_reproducible, assert_fp32_within, assert_loss_and_grads_match,
                            build_pair, loss_and_grads, train_steps)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

SMALL = dict(vocab_size=37, dim=16, hidden=32, layers=2)


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(SMALL | dict(dropout=0.0) | kw)
    if cfg.get("layer_norm"):
        cfg["hidden"] = cfg["dim"]
    cfg = ELMoConfig(**cfg)
    return (cfg, *build_pair(ELMo, TorchELMo, cfg, dtype))


def _batch(cfg, B=3, T=10, seed=1, padded=True):
    b = example_batch(cfg, B, T, torch.Generator().manual_seed(seed))
    if padded:
        b["lengths"] = torch.tensor([T, 6, 3][:B])
        b["tokens"][1, 6:] = 5                                # pads hold any token id
        b["tokens"][2, 3:] = 0
    else:
        del b["lengths"]
    return b


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("smoothing", [None, "torch", "fairseq"])
def test_loss_and_every_gradient_match_the_twin_fp64(layer_norm, tie, smoothing):
    cfg, fast, twin = _pair(torch.float64, layer_norm=layer_norm, tie_weights=tie)
    kw = {} if smoothing is None else dict(label_smoothing=0.1, smoothing=smoothing)
    for b in (_batch(cfg), _batch(cfg, padded=False)):
        assert_loss_and_grads_match(fast, twin, b, rtol=1e-9, atol=1e-12, **kw)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_fp32_error_is_within_a_small_multiple_of_torchs(layer_norm):
    cfg, fast, twin = _pair(torch.float32, layer_norm=layer_norm)
    _, _, ref = _pair(torch.float64, layer_norm=layer_norm)
    b = _batch(cfg, T=14)
    assert_fp32_within(*(loss_and_grads(net, b) for net in (fast, twin, ref)), factor=4, slack=1e-6,
                       twin_error="worst")


@pytest.mark.parametrize("layer_norm", [False, True])
def test_logits_and_representations_match_the_twin_in_eval_and_are_deterministic(layer_norm):
    cfg, fast, twin = _pair(torch.float64, layer_norm=layer_norm, dropout=0.3)
    fast.eval(), twin.eval()
    b = _batch(cfg)
    got, want = fast(b["tokens"], b["lengths"]), twin(b["tokens"], b["lengths"])
    for g, w in zip(got, want):
        assert g.shape == (3, 10, cfg.vocab_size)
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    reps = fast.representations(b["tokens"], b["lengths"])
    assert len(reps) == cfg.layers + 1
    for g, w in zip(reps, twin.representations(b["tokens"], b["lengths"])):
        assert g.shape == (3, 10, 2 * cfg.dim)
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for g, w in zip(fast(b["tokens"], b["lengths"]), got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_a_padded_row_gives_the_outputs_of_the_row_alone(layer_norm):
    cfg, fast, _ = _pair(torch.float64, layer_norm=layer_norm)
    b = _batch(cfg)
    tokens, lengths = b["tokens"], b["lengths"]
    logits_f, logits_b = fast(tokens, lengths)
    reps = fast.representations(tokens, lengths)
    for i, L in enumerate(lengths.tolist()):
        alone = tokens[i:i + 1, :L]
        f, bw = fast(alone)
        torch.testing.assert_close(logits_f[i, :L], f[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logits_b[i, :L], bw[0], rtol=1e-10, atol=1e-12)
        for r, ra in zip(reps, fast.representations(alone)):
            torch.testing.assert_close(r[i, :L], ra[0], rtol=1e-10, atol=1e-12)
            assert r[i, L:].abs().max() == 0 if L < tokens.shape[1] else True      # zero at pads
    # the layer-0 representation is the token embedding, once per direction
    emb = fast.embedding(tokens)
    torch.testing.assert_close(reps[0][0], torch.cat([emb[0], emb[0]], -1), rtol=0, atol=0)
    # the pad tokens' values do not matter to the loss
    other = dict(b, tokens=tokens.masked_fill(torch.arange(10)[None, :] >= lengths[:, None], 7))
    torch.testing.assert_close(fast.loss(b), fast.loss(other), rtol=1e-13, atol=0)


def test_each_direction_sees_only_its_own_side():
    """Changing token j moves the forward LM's logits only at positions >= j and the backward
    LM's only at positions <= j (position t predicts token t + 1, resp. t - 1)."""
    cfg, fast, _ = _pair(torch.float64)
    t = _batch(cfg, padded=False)["tokens"]
    u = t.clone()
    j = 4
    u[:, j] = (u[:, j] + 1) % cfg.vocab_size
    (fa, ba), (fb, bb) = fast(t), fast(u)
    torch.testing.assert_close(fa[:, :j], fb[:, :j], rtol=0, atol=1e-13)
    torch.testing.assert_close(ba[:, j + 1:], bb[:, j + 1:], rtol=0, atol=1e-13)
    assert (fa[:, j:] - fb[:, j:]).abs().amin(-1).amax() > 1e-8
    assert (ba[:, :j + 1] - bb[:, :j + 1]).abs().amin(-1).amax() > 1e-8


def test_loss_is_the_mean_of_both_directions_cross_entropies_of_the_logits():
    cfg, fast, _ = _pair(torch.float64)
    b = _batch(cfg)
    tokens, lengths = b["tokens"], b["lengths"]
    lf, lb = fast(tokens, lengths)
    fwd, bwd = [], []
    for i, L in enumerate(lengths.tolist()):
        fwd.append(F.cross_entropy(lf[i, :L - 1], tokens[i, 1:L], reduction="sum"))
        bwd.append(F.cross_entropy(lb[i, 1:L], tokens[i, :L - 1], reduction="sum"))
    n = (lengths - 1).sum()
    want = 0.5 * (sum(fwd) / n + sum(bwd) / n)
    torch.testing.assert_close(fast.loss(b), want, rtol=1e-12, atol=0)


def test_dropout_in_training_is_reproducible_from_the_seed_and_changes_the_loss():
    cfg, fast, _ = _pair(torch.float64, dropout=0.2)
    assert_dropout_reproducible(fast, _batch(cfg))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_the_twins_layers_are_its_own(layer_norm):
    cfg, fast, twin = _pair(layer_norm=layer_norm)
    for fl, tl in zip(fast.forward_layers, twin.forward_layers):
        assert tl.batch_first and type(tl).__module__ != type(fl).__module__
        if not layer_norm:
            assert type(tl) is torch.nn.LSTM and tl.proj_size == cfg.dim


def test_structure_projection_and_tying():
    torch.manual_seed(0)
    m = ELMo(ELMoConfig(vocab_size=100, dim=16, hidden=64, layers=3, tie_weights=True))
    assert len(m.forward_layers) == len(m.backward_layers) == 3
    lstm = m.forward_layers[0]
    assert type(lstm).__name__ == "LSTM" and lstm.proj_size == 16 and lstm.hidden_size == 64
    assert m.forward_layers[0].weight_hr_l0.shape == (16, 64)
    assert m.forward_layers[0].weight_ih_l0 is not m.backward_layers[0].weight_ih_l0
    assert m.output.weight is m.embedding.weight and m.output.bias.abs().max() == 0
    ln = ELMo(ELMoConfig(vocab_size=100, dim=16, hidden=16, layer_norm=True))
    assert type(ln.forward_layers[1]).__name__ == "LayerNormLSTM"
    assert ln.output.weight is not ln.embedding.weight                         # untied by default
    same = ELMo(ELMoConfig(vocab_size=100, dim=16, hidden=16))                 # nothing to project
    assert same.forward_layers[0].proj_size == 0


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("dim", 0), ("hidden", 1.5), ("layers", 0),
                                          ("dropout", 1.0), ("layer_norm_eps", -1.0)])
def test_bad_configs_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ELMoConfig(**{field: value})


def test_hidden_must_suit_the_projection():
    with pytest.raises(ValueError, match=r"hidden.*layer_norm.*hidden=64, dim=16"):
        ELMoConfig(dim=16, hidden=64, layer_norm=True)
    with pytest.raises(ValueError, match=r"hidden must be >= dim.*hidden=8, dim=16"):
        ELMoConfig(dim=16, hidden=8)


def test_bad_inputs_are_rejected():
    cfg, fast, _ = _pair()
    t = _batch(cfg, padded=False)["tokens"]
    with pytest.raises(ValueError, match="lengths must lie in"):
        fast(t, torch.tensor([10, 11, 3]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        fast(t, torch.tensor([10, 0, 3]))
    with pytest.raises(ValueError, match=r"lengths must be a \(3,\) integer tensor"):
        fast(t, torch.tensor([10.0, 5.0, 3.0]))
    with pytest.raises(ValueError, match=r"lengths must be a \(3,\) integer tensor"):
        fast(t, torch.tensor([10, 5]))
    with pytest.raises(ValueError, match="tokens"):
        fast(t[0])
    with pytest.raises(ValueError, match="T >= 2"):
        fast.loss({"tokens": t[:, :1]})
    with pytest.raises(ValueError, match=r"'tokens'.*got \['lengths'\]"):
        fast.loss({"lengths": torch.tensor([10, 5, 3])})
    with pytest.raises(ValueError, match="got Tensor"):
        fast.loss(t)
    with pytest.raises(TypeError, match="ELMoConfig"):
        ELMo(dict(SMALL))


# ---------------------------------------------------------------------------- ScalarMix

@pytest.mark.parametrize("do_layer_norm", [False, True])
def test_scalar_mix_is_its_formula(do_layer_norm):
    mix = ScalarMix(3, do_layer_norm=do_layer_norm).double()
    assert torch.all(mix.scalars == 0) and mix.gamma.item() == 1.0               # an even mix at init
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
        mix.gamma.fill_(1.7)
    hs = [torch.randn(2, 5, 8, dtype=torch.float64) * (k + 1) + k for k in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    e = torch.exp(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    w = e / e.sum()

    def norm(h):
        if not do_layer_norm:
            return h
        vals = h[mask.bool()]                                                    # (valid positions, 8)
        return (h - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-12)

    want = 1.7 * (w[0] * norm(hs[0]) + w[1] * norm(hs[1]) + w[2] * norm(hs[2]))
    got = mix(hs, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert mix.scalars.grad.abs().max() > 0 and mix.gamma.grad.abs().max() > 0
    with pytest.raises(ValueError, match="expected 3 tensors, got 2"):
        mix(hs[:2])


def test_scalar_mix_over_elmo_representations():
    cfg, fast, _ = _pair(torch.float64)
    fast.eval()
    b = _batch(cfg)
    reps = fast.representations(b["tokens"], b["lengths"])
    mix = ScalarMix(cfg.layers + 1).double()
    out = mix(reps)
    assert out.shape == (3, 10, 2 * cfg.dim)
    torch.testing.assert_close(out, sum(reps) / 3, rtol=1e-12, atol=1e-12)      # s = 0, gamma = 1


# ---------------------------------------------------------------------------- training

def test_short_training_run_on_text_lowers_the_loss():
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()
    B, T = 4, 24
    tokens = torch.tensor(list(text[2000:2000 + B * T]), dtype=torch.long).view(B, T)
    lengths = torch.tensor([24, 20, 24, 16])
    batch = {"tokens": tokens, "lengths": lengths}
    torch.manual_seed(0)
    model = ELMo(ELMoConfig(vocab_size=256, dim=32, hidden=64, layers=2, dropout=0.1, tie_weights=True))
    first = model.eval().loss(batch).item()
    train_steps(model.train(), batch, lr=2e-2, steps=30)
    last = model.eval().loss(batch).item()
    assert last < 0.6 * first, (first, last)
