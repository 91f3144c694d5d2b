"""fastseq.generate: greedy search, beam search and the processors against Hugging Face's generate on
the same GPT-2 weights (fp32), sampling against the filtered distribution, a stub with a fixed
next-token distribution, the streamer, option validation, and an RNN LM against a plain loop."""

import pytest
import torch

from fastseq.generation import generate
from fastseq.models.gpt import GPT

transformers = pytest.importorskip("transformers")

V = 61


@pytest.fixture(scope="module")
def pair():
    """A tiny random GPT-2 (HF) and GPT.from_hf of it, eval mode."""
    hc = transformers.GPT2Config(vocab_size=V, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():                 # HF zero-initializes biases and sets norms to 1: randomize all
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    hf.generation_config.bos_token_id = None
    return hf, GPT.from_hf(hf).eval()


def _prompts(padded: bool):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:                           # left padding: rows of 6, 4 and 2 real tokens
        mask[1, :2] = 0
        mask[2, :4] = 0
        ids = ids.masked_fill(mask == 0, 5)
    return ids, mask


def _hf_generate(hf, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


def _an_eos(hf, ids, mask, **kw):
    """A token that generation without EOS emits in the middle of row 0 (so that EOS occurs)."""
    out = _hf_generate(hf, ids, mask, max_new_tokens=10, **kw)
    return int(out[0, ids.shape[1] + 3])


# ---------------------------------------------------------------------------- greedy search

@pytest.mark.parametrize("padded", [False, True])
def test_greedy_is_token_identical_to_hugging_face(pair, padded):
    hf, fast = pair
    ids, mask = _prompts(padded)
    want = _hf_generate(hf, ids, mask, max_new_tokens=14)
    got = generate(fast, ids, mask, max_new_tokens=14)
    assert got.dtype == torch.int64 and got.shape == (3, 6 + 14)
    assert torch.equal(got, want)
    assert len(set(got[:, 6:].flatten().tolist())) > 4          # not a degenerate repeat of one token


def test_greedy_with_eos_fills_finished_rows_with_pad_as_hugging_face(pair):
    hf, fast = pair
    ids, mask = _prompts(True)
    eos = _an_eos(hf, ids, mask)
    want = _hf_generate(hf, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=7)
    got = generate(fast, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, want)
    row0 = got[0, 6:].tolist()
    end = row0.index(eos)
    assert end == 3 and all(t == 7 for t in row0[end + 1:])
    # a list of EOS ids, and pad defaulting to the first EOS
    got2 = generate(fast, ids, mask, max_new_tokens=14, eos_token_id=[60, eos])
    want2 = _hf_generate(hf, ids, mask, max_new_tokens=14, eos_token_id=[60, eos], pad_token_id=60)
    assert torch.equal(got2, want2)


def test_greedy_matches_a_plain_loop_that_reruns_the_prefix(pair):
    _, fast = pair
    ids, _ = _prompts(False)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, fast(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(fast, ids, max_new_tokens=12), seq)


@pytest.mark.parametrize("opts", [dict(), dict(no_repeat_ngram_size=2, repetition_penalty=1.3),
                                  dict(num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2)])
def test_left_padding_does_not_change_a_rows_output(pair, opts):
    """Each row of a left-padded batch gets what its prompt gets alone (the n-gram ban and the
    repetition penalty ignore the padding)."""
    _, fast = pair
    ids, mask = _prompts(True)
    batch = generate(fast, ids, mask, max_new_tokens=10, **opts)
    R = opts.get("num_return_sequences", 1)
    for b in range(3):
        alone = generate(fast, ids[b:b + 1, (mask[b] == 0).sum():], max_new_tokens=10, **opts)
        assert torch.equal(batch[b * R:(b + 1) * R, 6:], alone[:, -10:])


def test_generation_stops_when_every_row_ended(pair):
    hf, fast = pair
    ids, mask = _prompts(False)
    ids = ids[:1]
    eos = _an_eos(hf, ids, mask[:1])
    got = generate(fast, ids, max_new_tokens=14, eos_token_id=eos)
    assert got.shape == (1, 6 + 4) and got[0, -1] == eos


@pytest.mark.parametrize("opts", [dict(repetition_penalty=1.8), dict(no_repeat_ngram_size=2),
                                  dict(repetition_penalty=0.7, no_repeat_ngram_size=3), "min_new_tokens"])
def test_processors_match_hugging_face_in_greedy_search(pair, opts):
    hf, fast = pair
    ids, mask = _prompts(opts == dict(repetition_penalty=1.8))      # HF's n-gram ban counts left padding
    if opts == "min_new_tokens":
        eos = _an_eos(hf, ids, mask)
        opts = dict(min_new_tokens=6, eos_token_id=eos, pad_token_id=7)
    want = _hf_generate(hf, ids, mask, max_new_tokens=14, **opts)
    got = generate(fast, ids, mask, max_new_tokens=14, **opts)
    assert torch.equal(got, want)
    if "eos_token_id" in opts:
        assert (got[:, 6:12] != opts["eos_token_id"]).all()
        assert (got == opts["eos_token_id"]).any()
    base = generate(fast, ids, mask, max_new_tokens=14)
    assert not torch.equal(got, base)                                # the option changed something


def test_output_scores_are_the_processed_logits_of_each_step(pair):
    _, fast = pair
    ids, mask = _prompts(True)
    seqs, scores = generate(fast, ids, mask, max_new_tokens=5, no_repeat_ngram_size=1, output_scores=True)
    assert len(scores) == 5 and all(s.shape == (3, V) and s.dtype == torch.float32 for s in scores)
    for t, s in enumerate(scores):
        assert torch.equal(s.argmax(-1), seqs[:, 6 + t])
        assert torch.isinf(s.gather(1, seqs[:, 6:6 + t])).all()        # earlier tokens banned (1-grams)


# ---------------------------------------------------------------------------- beam search

@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, nrs, padded", [
    (3, 1.0, False, 1, False),
    (4, 0.5, True, 2, True),
    (4, 2.0, False, 2, True),
    (3, 2.0, "never", 3, False),
    (4, -1.0, True, 1, True),
])
def test_beam_search_is_token_identical_to_hugging_face(pair, num_beams, length_penalty, early_stopping, nrs, padded):
    hf, fast = pair
    ids, mask = _prompts(padded)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=nrs, max_new_tokens=10)
    eos = _an_eos(hf, ids, mask, num_beams=num_beams)
    want = _hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=7, **kw)
    got = generate(fast, ids, mask, eos_token_id=eos, pad_token_id=7, **kw)
    assert got.shape == want.shape and got.shape[0] == 3 * nrs
    assert torch.equal(got, want)
    if length_penalty <= 1.0:                                          # (2.0 favours the long ones)
        assert (got[:, 6:] == eos).any()                               # EOS inside the beams
    # without EOS every hypothesis runs to max_new_tokens
    want = _hf_generate(hf, ids, mask, **kw)
    got = generate(fast, ids, mask, **kw)
    assert got.shape == (3 * nrs, 16) and torch.equal(got, want)


@pytest.mark.parametrize("num_beams, length_penalty, nrs, padded", [(3, 1.0, 3, False), (4, 2.0, 1, True),
                                                                  (4, 1.0, 2, True)])
def test_beam_search_stopping_rules_match_hugging_face(pair, num_beams, length_penalty, nrs, padded):
    """A frequent EOS over 16 steps fills the finished sets, so early_stopping True / False /
    "never" (HF's is_done) decide the output."""
    hf, fast = pair
    ids, mask = _prompts(padded)
    free = _hf_generate(hf, ids, mask, num_beams=4, max_new_tokens=16)
    eos = int(torch.mode(free[:, 6:].flatten()).values)
    outs = []
    for early_stopping in (True, False, "never"):
        kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                  num_return_sequences=nrs, max_new_tokens=16, eos_token_id=eos, pad_token_id=7)
        got = generate(fast, ids, mask, **kw)
        assert torch.equal(got, _hf_generate(hf, ids, mask, **kw)), early_stopping
        outs.append(got)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


def test_beam_search_with_processors_matches_hugging_face(pair):
    hf, fast = pair
    ids, mask = _prompts(False)
    eos = _an_eos(hf, ids, mask, num_beams=3)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, eos_token_id=eos, pad_token_id=7,
              repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=4)
    assert torch.equal(generate(fast, ids, mask, **kw), _hf_generate(hf, ids, mask, **kw))


def test_beam_search_output_scores_are_the_step_log_probs(pair):
    _, fast = pair
    ids, _ = _prompts(False)
    seqs, scores = generate(fast, ids, num_beams=2, max_new_tokens=4, output_scores=True)
    assert seqs.shape == (3, 10) and len(scores) == 4
    for s in scores:
        assert s.shape == (6, V)
        torch.testing.assert_close(s.exp().sum(-1), torch.ones(6))


# ---------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_under_a_generator(pair):
    _, fast = pair
    ids, mask = _prompts(True)
    kw = dict(do_sample=True, max_new_tokens=10, top_k=20, top_p=0.95, temperature=1.5, num_return_sequences=3)
    a = generate(fast, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(fast, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(fast, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == (9, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :6], ids.repeat_interleave(3, 0))           # a prompt's samples are adjacent rows
    assert not torch.equal(a[0], a[1])                                  # ... and differ


class _FixedCache:
    def __init__(self, B):
        self.length, self.B = 0, B

    def reorder(self, index):
        assert index.dim() == 1 and 1 <= index.shape[0] <= self.B and index.dtype == torch.int64
        self.B = index.shape[0]                                          # rows that ended leave


class _FixedLM:
    """A 'model' whose next-token logits are always the same (cache protocol only)."""

    def __init__(self, logits):
        self.logits = logits

    def new_cache(self, batch_size, max_length):
        return _FixedCache(batch_size)

    def __call__(self, tokens, cache=None, attention_mask=None):
        B, T = tokens.shape
        if attention_mask is not None:
            assert attention_mask.shape == (B, cache.length + T)
        cache.length += T
        return self.logits.expand(B, T, -1), cache


PROBS = torch.tensor([0.08, 0.4, 0.12, 0.25, 0.15])


def _filtered(temperature=1.0, top_k=0, top_p=1.0):
    """The distribution sampling should follow, written out directly."""
    p = PROBS ** (1.0 / temperature)
    p = p / p.sum()
    order = torch.argsort(p, descending=True)
    keep = torch.zeros(5, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass >= top_p - 1e-12:
            break
        keep[i], mass = True, mass + float(p[i])
    p = p * keep
    return p / p.sum()


@pytest.mark.parametrize("opts", [dict(), dict(temperature=2.0), dict(temperature=0.5), dict(top_k=2),
                                  dict(top_p=0.7), dict(temperature=0.7, top_k=4, top_p=0.8),
                                  dict(temperature=0.5, top_p=0.75), dict(temperature=2.0, top_p=0.6)])
def test_sampling_frequencies_follow_the_filtered_distribution(opts):
    n = 6000
    lm = _FixedLM(PROBS.log().view(1, 1, 5))
    out = generate(lm, torch.zeros(n, 1, dtype=torch.int64), do_sample=True, max_new_tokens=1,
                   generator=torch.Generator().manual_seed(0), **opts)
    counts = torch.bincount(out[:, 1], minlength=5).double()
    want = _filtered(**opts).double() * n
    assert (counts[want == 0] == 0).all()                              # filtered tokens never drawn
    kept = want > 0
    chi2 = float(((counts[kept] - want[kept]) ** 2 / want[kept]).sum())
    assert chi2 < 25.0, (counts.tolist(), want.tolist())               # df <= 4: p < 1e-4 under the null


def test_sampled_rows_that_emit_eos_are_padded_and_min_new_tokens_holds():
    lm = _FixedLM(PROBS.log().view(1, 1, 5))
    out = generate(lm, torch.zeros(400, 2, dtype=torch.int64), do_sample=True, max_new_tokens=8, eos_token_id=3,
                   pad_token_id=4, min_new_tokens=2, generator=torch.Generator().manual_seed(0))
    new = out[:, 2:]
    assert (new[:, :2] != 3).all()                                   # no EOS before 2 new tokens
    for row in new.tolist():
        if 3 in row:
            assert all(t == 4 for t in row[row.index(3) + 1:])
    assert (new == 3).any(1).float().mean() > 0.5                     # most rows ended


def test_beam_sampling_is_reproducible_and_keeps_the_prompts(pair):
    _, fast = pair
    ids, mask = _prompts(True)
    kw = dict(do_sample=True, num_beams=3, num_return_sequences=2, max_new_tokens=8, top_k=10, temperature=1.3)
    a = generate(fast, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(fast, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    c = generate(fast, ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    assert a.shape == (6, 14) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :6], ids.repeat_interleave(2, 0))


def test_beam_search_reorders_the_cache_rows():
    seen = []

    class Recording(_FixedCache):
        def reorder(self, index):
            seen.append(index.clone())

    lm = _FixedLM(PROBS.log().view(1, 1, 5))
    lm.new_cache = lambda B, L: Recording(B)
    out = generate(lm, torch.zeros(2, 3, dtype=torch.int64), num_beams=3, max_new_tokens=4, num_return_sequences=3)
    assert out.shape == (6, 7) and len(seen) >= 3
    assert all(ix.shape == (6,) and (ix[:3] < 3).all() and (ix[3:] >= 3).all() for ix in seen)
    # a fixed distribution: the best hypothesis repeats the most probable token
    assert (out[0, 3:] == 1).all() and (out[3, 3:] == 1).all()


# ---------------------------------------------------------------------------- streamer, options

class _Streamer:
    def __init__(self):
        self.put_calls, self.ends = [], 0

    def put(self, t):
        assert self.ends == 0
        self.put_calls.append(t.clone())

    def end(self):
        self.ends += 1


def test_streamer_gets_the_prompt_then_each_new_token(pair):
    _, fast = pair
    ids, mask = _prompts(True)
    s = _Streamer()
    out = generate(fast, ids, mask, max_new_tokens=5, streamer=s)
    assert s.ends == 1 and len(s.put_calls) == 6
    assert torch.equal(s.put_calls[0], ids)
    assert torch.equal(torch.stack(s.put_calls[1:], 1), out[:, 6:])


@pytest.mark.parametrize("bad, word", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=0), "num_beams"), (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(eos_token_id=-3), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"), (dict(pad_token_id=[1, 2]), "pad_token_id"),
    (dict(num_beams=2, streamer=_Streamer()), "streamer"), (dict(streamer=object()), "streamer"),
    (dict(generator=3), "generator"), (dict(do_sample="yes"), "do_sample"),
])
def test_bad_options_raise_naming_the_option(pair, bad, word):
    _, fast = pair
    ids, _ = _prompts(False)
    with pytest.raises(ValueError, match=word):
        generate(fast, ids, **bad)


def test_bad_inputs_raise(pair):
    _, fast = pair
    ids, mask = _prompts(True)
    with pytest.raises(ValueError, match="input_ids"):
        generate(fast, ids.int())
    with pytest.raises(ValueError, match="attention_mask"):
        generate(fast, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="left padding"):
        generate(fast, ids, mask.flip(1))
    with pytest.raises(ValueError, match="new_cache"):
        generate(torch.nn.Linear(2, 2), ids)


# ---------------------------------------------------------------------------- RNN LM

def test_rnn_lm_greedy_matches_a_loop_that_reruns_the_prefix():
    from fastseq.models.rnn_lm import RNNLM, RNNLMConfig
    if not hasattr(RNNLM, "new_cache"):
        pytest.skip("RNNLM has no new_cache yet")
    torch.manual_seed(0)
    cfg = RNNLMConfig(vocab_size=37, dim=16, hidden=16, layers=2, dropout=0.0)
    lm = RNNLM(cfg).eval()
    ids = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(4))
    got = generate(lm, ids, max_new_tokens=8)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            logits = lm(seq)
            logits = logits[0] if isinstance(logits, tuple) else logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_beam_search_finds_the_brute_force_best_when_the_beam_holds_every_prefix(length_penalty):
    """Vocabulary 4, 3 new tokens, 16 beams: every prefix stays in the beam, and with
    early_stopping="never" beam search must return the exact top hypotheses: every sequence that
    ends at EOS or at max_new_tokens, scored sum log p / new_len ** length_penalty."""
    import itertools
    from fastseq.models.rnn_lm import RNNLM, RNNLMConfig
    if not hasattr(RNNLM, "new_cache"):
        pytest.skip("RNNLM has no new_cache yet")
    torch.manual_seed(1)
    lm = RNNLM(RNNLMConfig(vocab_size=4, dim=8, hidden=8, layers=1, dropout=0.0)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(4.0)                                                  # sharper distributions
    ids = torch.randint(0, 4, (2, 3), generator=torch.Generator().manual_seed(5))
    eos, pad, R = 2, 9, 3                                             # pad outside the vocabulary: unambiguous
    got = generate(lm, ids, num_beams=16, max_new_tokens=3, eos_token_id=eos, pad_token_id=pad,
                   length_penalty=length_penalty, early_stopping="never", num_return_sequences=R)
    for b in range(2):
        hyps = []
        for n in (1, 2, 3):
            for tail in itertools.product(range(4), repeat=n):
                if eos in tail[:-1] or (n < 3 and tail[-1] != eos):
                    continue
                seq = torch.cat([ids[b], torch.tensor(tail)])[None]
                with torch.no_grad():
                    logp = torch.log_softmax(lm(seq[:, :-1]).float(), -1)[0, 2:]         # (n, V)
                total = float(logp.gather(1, seq[0, 3:, None]).sum())
                hyps.append((total / n ** length_penalty, list(tail)))
        hyps.sort(key=lambda h: -h[0])
        best = [h[1] + [pad] * (got.shape[1] - 3 - len(h[1])) for h in hyps[:R]]
        assert got[b * R:(b + 1) * R, 3:].tolist() == best


class _Recorder:
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def new_cache(self, batch_size, max_length):
        return self.model.new_cache(batch_size, max_length)

    def __call__(self, tokens, cache=None, attention_mask=None):
        self.sizes.append(tokens.shape[0])
        return self.model(tokens, cache=cache, attention_mask=attention_mask)


def test_finished_rows_leave_the_work_and_the_output_is_unchanged(pair):
    """A row that emits EOS is dropped from the cache and from later steps (greedy search and
    sampling); the sequences, the streamer's tokens and HF's output agree with every row kept."""
    hf, fast = pair
    ids, mask = _prompts(True)
    eos = _an_eos(hf, ids, mask)                                       # row 0 ends at its 4th new token
    rec = _Recorder(fast)
    s = _Streamer()
    got = generate(rec, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=7, streamer=s)
    assert torch.equal(got, _hf_generate(hf, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=7))
    assert rec.sizes[:4] == [3, 3, 3, 3] and rec.sizes[4] == 2         # prefill + 3 steps, then row 0 left
    assert torch.equal(torch.stack(s.put_calls[1:], 1), got[:, 6:6 + len(s.put_calls) - 1])
    # with output_scores every row keeps running (its scores are returned), to the same tokens
    rec2 = _Recorder(fast)
    got2, scores = generate(rec2, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=7,
                            output_scores=True)
    assert torch.equal(got2, got) and set(rec2.sizes) == {3} and all(x.shape[0] == 3 for x in scores)


class _RowCache:
    """A cache that remembers which prompt each row continues (reordered and shrunk as rows move)."""

    def __init__(self, B):
        self.length, self.prompt = 0, None

    def reorder(self, index):
        assert index.dim() == 1 and 1 <= index.shape[0] <= self.prompt.shape[0]
        self.prompt = self.prompt.index_select(0, index)


class _PerPromptLM:
    """Next-token log-probabilities fixed per prompt (its first token picks a row of `table`)."""

    def __init__(self, table):
        self.table, self.sizes = table, []

    def new_cache(self, batch_size, max_length):
        return _RowCache(batch_size)

    def __call__(self, tokens, cache=None, attention_mask=None):
        B, T = tokens.shape
        self.sizes.append(B)
        if cache.prompt is None:
            cache.prompt = tokens[:, 0].clone()
        cache.length += T
        return self.table[cache.prompt].view(B, 1, -1).expand(B, T, -1), cache


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_items_that_are_done_leave_the_work(early_stopping):
    """A prompt whose beam search is done stops costing rows (the cache drops its beams) while
    the others search on; the sequences equal a run with output_scores, where every row runs."""
    probs = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1],          # prompt 0: EOS (0) first, done early
                          [0.01, 0.3, 0.29, 0.2, 0.2]])       # prompt 1: EOS unlikely, runs on
    ids = torch.tensor([[0, 3], [1, 2]])
    kw = dict(max_new_tokens=6, num_beams=3, eos_token_id=0, pad_token_id=4, early_stopping=early_stopping,
              length_penalty=1.0)
    lm = _PerPromptLM(probs.log())
    got = generate(lm, ids, **kw)
    lm2 = _PerPromptLM(probs.log())
    got2, _ = generate(lm2, ids, output_scores=True, **kw)
    assert torch.equal(got, got2) and set(lm2.sizes) == {6}
    assert lm.sizes[0] == 6 and min(lm.sizes) == 3 and lm.sizes == sorted(lm.sizes, reverse=True)
    assert got[0, 2].item() == 0                                     # prompt 0's best: EOS at once
