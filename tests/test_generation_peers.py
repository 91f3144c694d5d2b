"""The generation benchmarks' peers (fastseq/bench/peers.py) compute what fastseq computes, on
identical weights, token for token:

- CTranslate2's Generator (a GPT2LMHeadModel saved and converted) and the plain torch KV-cache
  loop choose fastseq.generate's greedy tokens; CTranslate2's beam search (beam 4) chooses
  fastseq.generate(num_beams=4)'s, without an EOS: with one the two differ by convention
  (CTranslate2 bans tokens before the log-softmax and stops an item once num_beams hypotheses
  finished; see peers.py), so only the EOS-free search is compared;
- CTranslate2's Translator holding a TransformerSeq2Seq's weights (and its position table)
  chooses model.greedy_decode's tokens, EOS and padding included, post- and pre-norm; without an
  end token (stop_at_eos=False) its greedy and beam-4 searches choose fastseq.generate's
  (eos_token_id=None), every row running to max_len;
- the torch.nn.LSTM / LSTMCell loop on an LSTMSeq2Seq's weights chooses fastseq.generate's
  greedy tokens (1 and 2 layers, padded sources);
- a missing optional package gives registry.Skipped (the translation case, whose only peer is
  CTranslate2's, is skipped as a whole), and check_setup accepts a skipped peer.

Skipped without transformers / ctranslate2 (optional extras).  fp32, eval mode, no timings.
"""
import importlib.util
import sys

import pytest
import torch

from fastseq.bench import peers
from fastseq.bench.registry import Case, Setup, Skipped, check_setup

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
needs_ct2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None or
                               importlib.util.find_spec("tokenizers") is None,
                               reason="ctranslate2 / tokenizers is not installed")
V, P, NEW = 256, 8, 20


def _hf_gpt(seed=0):
    import transformers

    hc = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(hc).eval()


@pytest.fixture(scope="module")
def gpt():
    from fastseq.models.gpt import GPT

    hf = _hf_gpt()
    return hf, GPT.from_hf(hf).eval()


def _prompts(B):
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(B))   # (B, P)


def _fastseq(model, prompts, **kw):
    from fastseq.generation import generate

    return generate(model, prompts, max_new_tokens=NEW, **kw)[:, P:]                 # (B, NEW)


# ---------------------------------------------------------------------------- GPT-2

@needs_hf
@needs_ct2
@pytest.mark.parametrize("B", [1, 3])
def test_greedy_ct2_torch_loop_and_fastseq_agree(gpt, B):
    hf, model = gpt
    x = _prompts(B)
    want = _fastseq(model, x)
    assert want.shape == (B, NEW)
    assert torch.equal(peers.ct2_generate(hf, x, NEW), want)
    assert torch.equal(peers.TorchLoopGPT2(hf).generate(x, NEW), want)


@needs_hf
@needs_ct2
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam4_ct2_matches_fastseq_without_eos(gpt, B, length_penalty):
    """Without an EOS every hypothesis runs to NEW tokens: both keep the best 4 of 4 V
    continuations each step and return the best sum of log-probabilities."""
    hf, model = gpt
    x = _prompts(B)
    want = _fastseq(model, x, num_beams=4, length_penalty=length_penalty)
    got = peers.ct2_generate(hf, x, NEW, num_beams=4, length_penalty=length_penalty)
    assert torch.equal(got, want)
    assert not torch.equal(want, _fastseq(model, x))       # beam search found other tokens than greedy


@needs_hf
def test_torch_loop_sampling(gpt):
    hf, _ = gpt
    loop, x = peers.TorchLoopGPT2(hf), _prompts(3)
    assert torch.equal(loop.generate(x, NEW, top_k=1), loop.generate(x, NEW))        # top-1 sampling is greedy
    draw = [loop.generate(x, NEW, top_k=50, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draw[0].shape == (3, NEW) and torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert int(draw[0].min()) >= 0 and int(draw[0].max()) < V


@needs_hf
@needs_ct2
def test_ct2_sampling_and_eos(gpt):
    hf, model = gpt
    x = _prompts(3)
    a = peers.ct2_generate(hf, x, NEW, top_k=50)
    assert a.shape == (3, NEW) and int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(peers.ct2_generate(hf, x, NEW, top_k=1), _fastseq(model, x))   # top-1 is greedy
    # an EOS: a token greedy search chooses in row 0 ends that row where it first appears (the EOS
    # kept, padding after it), as fastseq's
    greedy = _fastseq(model, x)
    eos = int(greedy[0, 3])
    end = greedy[0].tolist().index(eos)
    want = _fastseq(model, x, eos_token_id=eos, pad_token_id=0)
    got = peers.ct2_generate(hf, x, NEW, eos_token_id=eos, pad_token_id=0)
    assert got[0, end] == eos and not got[0, end + 1:].any() and torch.equal(got, want)
    assert torch.equal(peers.ct2_generate(hf, x, NEW, eos_token_id=eos, min_new_tokens=NEW),
                       _fastseq(model, x, eos_token_id=eos, min_new_tokens=NEW))


def test_translation_case_without_ctranslate2_is_skipped(monkeypatch):
    from fastseq.bench.registry import cases, load

    load(["generation"])                                                        # registers the decode cases

    monkeypatch.setitem(sys.modules, "ctranslate2", None)                      # import ctranslate2 fails
    case, = [c for c in cases("cpu", ["generation"]) if c.name.startswith("translate seq2seq Transformer")]
    with pytest.raises(Skipped, match=r"^skipped: ctranslate2 is not installed"):
        case.setup()


@needs_hf
def test_missing_ctranslate2_is_a_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)                      # import ctranslate2 fails
    with pytest.raises(Skipped, match=r"^skipped: ctranslate2 is not installed"):
        peers.ct2_generate(_hf_gpt(seed=1), _prompts(1), NEW)                 # a model not converted before


def test_check_setup_accepts_skipped_peers(capsys):
    case = Case("decode", "a case", "cpu", setup=None, peers=("A", "B", "C"))
    fn = lambda: None                                                          # noqa: E731
    check_setup(case, Setup(fastseq=fn, peers={"A": fn, "C": fn}, skipped={"B": "skipped: b is not installed"}))
    assert "peer 'B': skipped: b is not installed" in capsys.readouterr().err
    for bad in (Setup(fastseq=fn, peers={"A": fn}, skipped={"B": "why"}),                 # C neither run nor skipped
                Setup(fastseq=fn, peers={"A": fn, "B": fn, "C": fn}, skipped={"D": "why"})):   # D not declared
        with pytest.raises(RuntimeError, match="declares peers"):
            check_setup(case, bad)
    with pytest.raises(Skipped, match="skipped: no_such_package_xyz is not installed"):
        peers.require("no_such_package_xyz")


# ---------------------------------------------------------------------------- seq2seq Transformer

@needs_ct2
@pytest.mark.parametrize("norm_first,share,tie,activation", [(False, False, False, "relu"), (True, True, True, "gelu"),
                                                             (False, True, False, "gelu_tanh"),
                                                             (True, False, True, "silu")])
def test_ct2_translator_greedy_matches_greedy_decode(norm_first, share, tie, activation):
    from fastseq.models.seq2seq import example_batch
    from fastseq.models.seq2seq_transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig

    torch.manual_seed(0)
    c = TransformerSeq2SeqConfig(vocab_size=64, dim=32, layers=2, heads=4, ffn_dim=64, dropout=0.1, norm_first=norm_first,
                                 share_embeddings=share, tie_weights=tie, activation=activation, max_positions=64)
    model = TransformerSeq2Seq(c).eval()
    b = example_batch(c, 5, 12, torch.Generator().manual_seed(1))             # sources of 6..12 tokens
    first = model.greedy_decode(b["src"], b["src_lengths"], 30)
    with torch.no_grad():                   # make the EOS win where row 0's third token did: rows end early
        model.output_weight[c.eos_id] = 1.01 * model.output_weight[first[0, 2]]
    want = model.greedy_decode(b["src"], b["src_lengths"], 30)
    assert (want == c.eos_id).any()
    got = peers.ct2_translate(model, b["src"], b["src_lengths"], 30)
    assert torch.equal(got, want)

    beam = peers.ct2_translate(model, b["src"], b["src_lengths"], 30, num_beams=4)
    assert beam.shape[0] == 5 and beam.shape[1] <= 30
    for row in beam.tolist():               # greedy_decode's form: up to one EOS, padding after it only
        end = row.index(c.eos_id) + 1 if c.eos_id in row else len(row)
        assert all(t == c.pad_id for t in row[end:])


def _seq2seq_sources(B, V, seed=0):
    """Right-padded sources of 5..12 tokens (ids 3..V-1), their lengths and attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 13, (B,), generator=g)                                  # (B,)
    S = int(lengths.max())
    mask = (torch.arange(S).view(1, S) < lengths.view(B, 1)).long()                   # (B, S)
    return torch.randint(3, V, (B, S), generator=g).masked_fill_(mask == 0, 0), lengths, mask


@needs_ct2
@pytest.mark.parametrize("norm_first,share", [(False, True), (True, False)])
def test_ct2_translator_without_eos_matches_generate(norm_first, share):
    """No end token: every row runs to max_len with EOS a token like any other, and the
    Translator's greedy and beam-4 searches choose fastseq.generate's (eos_token_id=None)."""
    from fastseq.generation import generate
    from fastseq.models.seq2seq_transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig

    torch.manual_seed(0)
    c = TransformerSeq2SeqConfig(vocab_size=64, dim=32, layers=2, heads=4, ffn_dim=64, dropout=0.0,
                                 norm_first=norm_first, share_embeddings=share, max_positions=64)
    model = TransformerSeq2Seq(c).eval()
    src, lengths, mask = _seq2seq_sources(5, c.vocab_size)
    greedy = generate(model, src, mask, decoder_start_token_id=c.bos_id, max_new_tokens=NEW)[:, 1:]
    with torch.no_grad():                   # make the EOS win where row 0's third token did
        model.output_weight[c.eos_id] = 1.01 * model.output_weight[greedy[0, 2]]
    peers.ct2_seq2seq(model, cache=False)   # the weights changed: convert again
    for beams in (1, 4):
        want = generate(model, src, mask, decoder_start_token_id=c.bos_id, num_beams=beams, max_new_tokens=NEW)[:, 1:]
        got = peers.ct2_translate(model, src, lengths, NEW, num_beams=beams, stop_at_eos=False)
        assert want.shape == (5, NEW) and torch.equal(got, want)
        if beams == 1:
            assert (want[:, :-1] == c.eos_id).any()          # EOS chosen before the end, and the rows went on
            greedy = want
    assert not torch.equal(want, greedy)                      # beam search found other tokens than greedy


@pytest.mark.parametrize("layers,B", [(1, 1), (2, 4)])
def test_torch_lstmcell_loop_matches_generate(layers, B):
    from fastseq.generation import generate
    from fastseq.models.seq2seq_lstm import LSTMSeq2Seq, LSTMSeq2SeqConfig

    torch.manual_seed(0)
    c = LSTMSeq2SeqConfig(vocab_size=64, dim=16, hidden=32, layers=layers, dropout=0.0)
    model = LSTMSeq2Seq(c).eval()
    with torch.no_grad():                   # U(-1, 1): at its U(-0.1, 0.1) a model this small repeats one token
        for p in model.parameters():
            p.uniform_(-1.0, 1.0)
    src, lengths, mask = _seq2seq_sources(B, c.vocab_size, seed=layers)
    want = generate(model, src, mask, decoder_start_token_id=c.bos_id, max_new_tokens=NEW)[:, 1:]
    got = peers.TorchLoopLSTMSeq2Seq(model).generate(src, lengths, NEW)
    assert want.shape == (B, NEW) and torch.equal(got, want)
    assert len(set(want.flatten().tolist())) > 3             # not one token repeated
    if B > 1:                                                 # the pads are masked: a row alone decodes the same
        assert torch.equal(peers.TorchLoopLSTMSeq2Seq(model).generate(src[1:2, :int(lengths[1])], lengths[1:2], NEW),
                           got[1:2])
