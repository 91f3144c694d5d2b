"""fastseq.generate on the seq2seq models (TransformerSeq2Seq post- and pre-norm, LSTMSeq2Seq):
greedy search against the models' own uncached greedy_decode, the cached decoder's logits
against the full decoder's, beam search against a brute-force search and against a plain
reference beam loop (both on the uncached forward), greedy and beam search against Hugging
Face's generate on a MarianMTModel holding the same weights, sampling against a plain sampling
loop, source padding, and the errors."""
import itertools

import pytest
import torch

from fastseq.generation import generate
from fastseq.models.seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig, TransformerSeq2Seq, TransformerSeq2SeqConfig

V = 13
LENGTHS = [7, 3, 5, 1, 6]                      # a padded batch of sources (S = 7), one row of one token


def build(kind: str, dtype=torch.float32, vocab_size=V, eos_id=None):
    """A small model with weights that make varied outputs (a random init mostly repeats one
    token), eval mode.  eos_id: one the greedy outputs meet in some rows, not all."""
    if kind == "lstm":
        torch.manual_seed(4)
        model = LSTMSeq2Seq(LSTMSeq2SeqConfig(vocab_size=vocab_size, dim=16, hidden=24, layers=2, dropout=0.0,
                                              eos_id=eos_id or 2))
        noise = 1.0
    else:
        torch.manual_seed(11 if kind == "post-norm" else 3)
        model = TransformerSeq2Seq(TransformerSeq2SeqConfig(
            vocab_size=vocab_size, dim=24, layers=2, heads=3, ffn_dim=48, dropout=0.0, max_positions=32,
            norm_first=kind == "pre-norm", eos_id=eos_id or (5 if kind == "post-norm" else 2)))
        noise = 0.0 if kind == "post-norm" else 0.3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.to(dtype).eval()


KINDS = ["post-norm", "pre-norm", "lstm"]


def sources(lengths=LENGTHS, S=7, seed=5):
    """Right-padded sources (B, S), their lengths (B,) and Hugging Face's mask (B, S)."""
    lengths = torch.tensor(lengths)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(S).view(1, S) < lengths.view(-1, 1)).long()
    src = torch.randint(3, V, (len(lengths), S), generator=g).masked_fill(mask == 0, 0)
    return src, lengths, mask


def seq2seq_generate(model, src, mask, **kw):
    c = model.config
    return generate(model, src, mask, decoder_start_token_id=c.bos_id, **kw)


def log_probs(model, src, lengths, prefixes):
    """The uncached forward's next-token log-probabilities (n, V) after each prefix (n, t)
    (the start token first), for n rows of the sources src (n, S)."""
    with torch.no_grad():
        return torch.log_softmax(model(src, lengths, prefixes)[:, -1].double(), -1)


# ---------------------------------------------------------------------------- greedy search

@pytest.mark.parametrize("kind", KINDS)
def test_greedy_is_token_identical_to_greedy_decode(kind):
    """generate's cached decoder, one padded batch, against greedy_decode, which reruns the whole
    decoder every step; fp32.  Some rows end at EOS (then pad), some run to max_new_tokens."""
    model = build(kind)
    c = model.config
    src, lengths, mask = sources()
    want = model.greedy_decode(src, lengths, 12)
    got = seq2seq_generate(model, src, mask, max_new_tokens=12, eos_token_id=c.eos_id, pad_token_id=c.pad_id)
    assert got.dtype == torch.int64 and (got[:, 0] == c.bos_id).all()
    assert torch.equal(got[:, 1:], want)
    ended = (want == c.eos_id).any(1)
    assert ended.any() and not ended.all() and want.shape[1] == 12
    assert len(set(want.flatten().tolist())) >= 5                 # not one token repeated
    # attention_mask None: every source position a token
    full = seq2seq_generate(model, src[:1], None, max_new_tokens=12, eos_token_id=c.eos_id, pad_token_id=c.pad_id)
    assert torch.equal(full, got[:1, :full.shape[1]])


@pytest.mark.parametrize("kind", KINDS)
def test_source_padding_does_not_change_a_rows_output(kind):
    """Each source alone (unpadded), the batch right-padded, and the batch left-padded give the
    same tokens (the encoder takes right padding; left padding is moved to the right)."""
    model = build(kind)
    src, lengths, mask = sources()
    kw = dict(max_new_tokens=8, num_beams=2, num_return_sequences=2)
    batch = seq2seq_generate(model, src, mask, **kw)
    left = torch.stack([row.roll(7 - n) for row, n in zip(src, LENGTHS)])
    assert torch.equal(seq2seq_generate(model, left, mask.flip(1), **kw), batch)
    for b, n in enumerate(LENGTHS):
        alone = seq2seq_generate(model, src[b:b + 1, :n], None, **kw)
        assert torch.equal(alone, batch[2 * b:2 * b + 2])


def test_streamer_and_scores_see_the_decoder_tokens():
    """The streamer gets the start tokens, then each step's tokens; output_scores the logits each
    step chose from (as Hugging Face's encoder-decoder generate)."""
    model = build("pre-norm")
    src, _, mask = sources()
    calls = []

    class Streamer:
        def put(self, tokens):
            calls.append(tokens.clone())

        def end(self):
            calls.append("end")

    seqs, scores = seq2seq_generate(model, src, mask, max_new_tokens=4, streamer=Streamer(), output_scores=True)
    assert calls[-1] == "end" and len(calls) == 6 and torch.equal(calls[0], seqs[:, :1])
    assert torch.equal(torch.stack(calls[1:5], 1), seqs[:, 1:])
    assert len(scores) == 4 and all(s.shape == (5, V) for s in scores)
    assert torch.equal(torch.stack([s.argmax(-1) for s in scores], 1), seqs[:, 1:])


# ---------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoder_logits_equal_the_full_decoder(kind, dtype):
    """Two rows per source (g = 2) with different targets, fed to the cache in chunks of 3, 1, 1
    and 2 positions, then reordered across sources (and back within them): every chunk's logits
    equal the uncached forward's on the same prefix -- in fp64 to 1e-11; in fp32 within 2x the
    uncached fp32 forward's own error, both measured against the fp64 forward."""
    model, exact = build(kind, dtype), build(kind, torch.float64)
    src, lengths, mask = sources()
    B, g, T = len(LENGTHS), 2, 9
    tgt = torch.randint(0, V, (B * g, T), generator=torch.Generator().manual_seed(9))
    rows_src, rows_len = src.repeat_interleave(g, 0), lengths.repeat_interleave(g, 0)
    with torch.no_grad():
        cache = model.new_cache(B * g, T, model.encode_for_generation(src, mask))
        n = 0
        chunks = [3, 1, 1, ("reorder", torch.randperm(B * g, generator=torch.Generator().manual_seed(1))),
                  2, ("reorder", (torch.arange(B * g) // g) * g + torch.tensor([1, 0] * B)), 1, 1]
        for chunk in chunks:
            if isinstance(chunk, tuple):
                index = chunk[1]
                cache.reorder(index)
                tgt, rows_src, rows_len = tgt[index], rows_src[index], rows_len[index]
                continue
            logits, cache = model(tgt_in=tgt[:, n:n + chunk], cache=cache)
            want = model(rows_src, rows_len, tgt[:, :n + chunk])[:, n:]
            if dtype == torch.float64:
                torch.testing.assert_close(logits, want, rtol=1e-11, atol=1e-11)
            else:
                ref = exact(rows_src, rows_len, tgt[:, :n + chunk])[:, n:]
                own = (want.double() - ref).abs().max().item()
                err = (logits.double() - ref).abs().max().item()
                assert err <= 2 * own + 1e-6 * ref.abs().max().item(), (n, err, own)
            n += chunk
            assert cache.length == n
        assert not cache.grouped                                   # the rows left their sources' order
        with pytest.raises(ValueError, match="max_length"):
            model(tgt_in=tgt[:, :2], cache=cache)


def test_grouped_rows_follow_a_reorder_within_their_sources():
    model = build("post-norm")
    src, _, mask = sources()
    cache = model.new_cache(10, 4, model.encode_for_generation(src, mask))
    assert cache.grouped and cache.rows_per_source == 2 and cache.sources == 5
    cache.reorder(torch.tensor([1, 1, 2, 3, 5, 4, 6, 6, 9, 8]))         # every row stays with its source
    assert cache.grouped
    cache.reorder(torch.tensor([2, 1, 0, 3, 4, 5, 6, 7, 8, 9]))
    assert not cache.grouped and cache.source_of.tolist() == [1, 0, 0, 1, 2, 2, 3, 3, 4, 4]


# ---------------------------------------------------------------------------- beam search

@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_finds_the_brute_force_best_when_the_beam_holds_every_prefix(kind, length_penalty):
    """Vocabulary 5, 3 new tokens, 20 beams: every prefix stays in the beam, and with
    early_stopping="never" beam search must return the exact top hypotheses of all sequences
    that end at EOS or at max_new_tokens, scored sum log p / new_len ** length_penalty (the log p
    from the uncached forward)."""
    Vs, eos, pad, R = 5, 2, 9, 3                                     # pad outside the vocabulary: unambiguous
    model = build(kind, torch.float64, vocab_size=Vs, eos_id=eos)
    src, lengths, mask = sources([4, 2])
    src = src % Vs
    got = seq2seq_generate(model, src, mask, num_beams=20, max_new_tokens=3, eos_token_id=eos, pad_token_id=pad,
                           length_penalty=length_penalty, early_stopping="never", num_return_sequences=R)
    bos = model.config.bos_id
    for b in range(2):
        tails = [t for n in (1, 2, 3) for t in itertools.product(range(Vs), repeat=n)
                 if eos not in t[:-1] and (n == 3 or t[-1] == eos)]
        hyps = []
        for n in (1, 2, 3):
            of_n = [t for t in tails if len(t) == n]
            seqs = torch.tensor([[bos, *t] for t in of_n])                               # (k, 1 + n)
            with torch.no_grad():
                logp = torch.log_softmax(model(src[b:b + 1].expand(len(of_n), -1), lengths[b:b + 1].expand(len(of_n)),
                                               seqs[:, :-1]), -1)                        # (k, n, V)
            totals = logp.gather(2, seqs[:, 1:, None]).sum((1, 2))
            hyps += [(float(s) / n ** length_penalty, list(t)) for s, t in zip(totals, of_n)]
        hyps.sort(key=lambda h: -h[0])
        assert hyps[R - 1][0] - hyps[R][0] > 1e-9                    # the top R are well defined
        best = [[bos] + h[1] + [pad] * (got.shape[1] - 1 - len(h[1])) for h in hyps[:R]]
        assert got[b * R:(b + 1) * R].tolist() == best


def reference_beam_search(model, src, length, *, num_beams, max_new_tokens, eos, pad, length_penalty,
                          early_stopping, num_return_sequences):
    """Hugging Face's beam search (as fastseq.generation.beam documents it) for one source, written
    as a plain loop over hypotheses on the uncached forward: (score, tokens) of the best finished
    hypotheses, best first."""
    bos, nb = model.config.bos_id, num_beams
    running = [(0.0, [bos])] + [(-1.0e9, [bos])] * (nb - 1)              # only the first beam counts at first
    finished, done = [], False
    for step in range(max_new_tokens):
        prefixes = torch.tensor([tokens for _, tokens in running])
        logp = log_probs(model, src.expand(nb, -1), length.expand(nb), prefixes)       # (nb, V)
        cands = sorted(((score + float(logp[i, v]), tokens + [v]) for i, (score, tokens) in enumerate(running)
                        for v in range(logp.shape[1])), key=lambda c: -c[0])[:2 * nb]
        ends = [c[1][-1] == eos or step + 1 == max_new_tokens for c in cands]
        if not done:
            for rank, ((total, tokens), end) in enumerate(zip(cands, ends)):
                if end and rank < nb:
                    finished.append((total / (step + 1) ** length_penalty, tokens))
            finished = sorted(finished, key=lambda f: -f[0])[:nb]
        running = [c for c, end in zip(cands, ends) if not end][:nb]
        if not running:
            break
        if len(finished) == nb and not done:
            if early_stopping is True:
                done = True
            else:
                n_new = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
                done = running[0][0] / n_new ** length_penalty <= finished[-1][0]
        if done:
            break
    return finished[:num_return_sequences]


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.5, True), (2.0, "never"), (1.0, "never")])
@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_matches_a_reference_beam_loop(kind, length_penalty, early_stopping):
    """num_beams 3, 2 returned sequences, an EOS the beams meet: the batched search on the
    cached decoder gives the reference loop's hypotheses (fp64)."""
    model = build(kind, torch.float64)
    src, lengths, mask = sources()
    nb, R, pad, steps = 3, 2, 0, 8
    free = seq2seq_generate(model, src, mask, num_beams=nb, max_new_tokens=steps)
    eos = int(torch.mode(free[:, 2:].flatten()).values)              # a token the beams meet often
    got = seq2seq_generate(model, src, mask, num_beams=nb, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad,
                           length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=R)
    want = [reference_beam_search(model, src[b:b + 1], lengths[b:b + 1], num_beams=nb, max_new_tokens=steps, eos=eos,
                                  pad=pad, length_penalty=length_penalty, early_stopping=early_stopping,
                                  num_return_sequences=R) for b in range(len(LENGTHS))]
    width = max(len(tokens) for hyps in want for _, tokens in hyps)
    assert got.shape == (len(LENGTHS) * R, width)
    assert got.tolist() == [tokens + [pad] * (width - len(tokens)) for hyps in want for _, tokens in hyps]
    assert any(eos in tokens[1:-1] or tokens[-1] == eos for hyps in want for _, tokens in hyps)   # EOS inside the beams


# ---------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def marian_pair():
    """The post-norm model and a Hugging Face MarianMTModel with its weights (fairseq's transformer
    is Marian's post-norm architecture; Marian's position table, sines then cosines, is copied
    into the fastseq model's)."""
    transformers = pytest.importorskip("transformers")
    ours = build("post-norm")
    c = ours.config
    E, L = c.dim, c.decoder_layers
    hf = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=c.vocab_size, d_model=E, encoder_layers=L, decoder_layers=L, encoder_attention_heads=c.heads,
        decoder_attention_heads=c.heads, encoder_ffn_dim=c.ffn_dim, decoder_ffn_dim=c.ffn_dim,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=c.max_positions, scale_embedding=True, pad_token_id=c.pad_id, eos_token_id=c.eos_id,
        bos_token_id=c.bos_id, decoder_start_token_id=c.bos_id, forced_eos_token_id=None,
        share_encoder_decoder_embeddings=False, tie_word_embeddings=False)).eval()
    sd = ours.state_dict()
    hf_sd = {"model.encoder.embed_tokens.weight": sd["encoder_embed.weight"],
             "model.decoder.embed_tokens.weight": sd["decoder_embed.weight"],
             "lm_head.weight": sd["output_proj.weight"], "final_logits_bias": torch.zeros(1, c.vocab_size)}

    def attention(hf_name, name):                     # torch's packed in_proj -> q / k / v projections
        w, b = sd[f"{name}.in_proj_weight"], sd[f"{name}.in_proj_bias"]
        for j, x in enumerate("qkv"):
            rows = slice(j * E, (j + 1) * E)
            hf_sd[f"{hf_name}.{x}_proj.weight"], hf_sd[f"{hf_name}.{x}_proj.bias"] = w[rows], b[rows]
        same(f"{hf_name}.out_proj", f"{name}.out_proj")

    def same(hf_name, name):
        hf_sd[f"{hf_name}.weight"], hf_sd[f"{hf_name}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]

    for i in range(L):
        h, o = f"model.encoder.layers.{i}", f"encoder_layers.{i}"
        attention(f"{h}.self_attn", f"{o}.self_attn")
        for hf_name, name in [("self_attn_layer_norm", "norm1"), ("fc1", "linear1"), ("fc2", "linear2"),
                              ("final_layer_norm", "norm2")]:
            same(f"{h}.{hf_name}", f"{o}.{name}")
        h, o = f"model.decoder.layers.{i}", f"decoder_layers.{i}"
        attention(f"{h}.self_attn", f"{o}.self_attn")
        attention(f"{h}.encoder_attn", f"{o}.multihead_attn")
        for hf_name, name in [("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm2"),
                              ("final_layer_norm", "norm3"), ("fc1", "linear1"), ("fc2", "linear2")]:
            same(f"{h}.{hf_name}", f"{o}.{name}")
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert sorted(missing) == ["model.decoder.embed_positions.weight", "model.encoder.embed_positions.weight"]
    assert not unexpected
    with torch.no_grad():
        ours.positions.copy_(hf.model.encoder.embed_positions.weight)
    hf.generation_config.forced_eos_token_id = None
    return hf, ours


def hf_generate(hf, src, mask, **kw):
    with torch.no_grad():
        return hf.generate(src, attention_mask=mask, do_sample=False, decoder_start_token_id=1, **kw)


@pytest.mark.parametrize("opts", [
    dict(), dict(repetition_penalty=1.4, no_repeat_ngram_size=2),
    dict(num_beams=3, num_return_sequences=2),
    dict(num_beams=4, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
    dict(num_beams=3, length_penalty=-1.0, early_stopping=False, min_new_tokens=3),
])
def test_greedy_and_beam_search_are_token_identical_to_hugging_face_marian(marian_pair, opts):
    """Same weights, a right-padded batch, an EOS the outputs meet (pad 7: HF's beam search takes a
    pad of 0 for 'none')."""
    hf, ours = marian_pair
    src, lengths, mask = sources()
    with torch.no_grad():
        torch.testing.assert_close(ours(src, lengths, src[:, :5]), hf(input_ids=src, attention_mask=mask,
                                                                      decoder_input_ids=src[:, :5]).logits)
    free = hf_generate(hf, src, mask, max_new_tokens=12, **opts)
    eos = int(free[0, 4])                                             # a token the outputs meet
    kw = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=7, **opts)
    want = hf_generate(hf, src, mask, **kw)
    got = generate(ours, src, mask, decoder_start_token_id=1, **kw)
    assert got.shape == want.shape and torch.equal(got, want)
    assert (got[:, 1:] == eos).any()


# ---------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", KINDS)
def test_sampling_equals_a_plain_sampling_loop_under_the_same_generator(kind):
    """3 samples per source, top_k 6 and temperature 1.3: the same draws as a loop that reruns the
    uncached forward (fp64, so the probabilities agree to rounding); reproducible under a seed."""
    model = build(kind, torch.float64)
    c = model.config
    src, lengths, mask = sources()
    R, steps = 3, 6
    kw = dict(do_sample=True, top_k=6, temperature=1.3, num_return_sequences=R, max_new_tokens=steps,
              eos_token_id=c.eos_id, pad_token_id=c.pad_id)
    got = seq2seq_generate(model, src, mask, generator=torch.Generator().manual_seed(3), **kw)
    again = seq2seq_generate(model, src, mask, generator=torch.Generator().manual_seed(3), **kw)
    other = seq2seq_generate(model, src, mask, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(got, again) and not torch.equal(got, other)

    gen = torch.Generator().manual_seed(3)
    rows_src, rows_len = src.repeat_interleave(R, 0), lengths.repeat_interleave(R, 0)
    seqs = torch.full((len(rows_len), 1), c.bos_id)
    running = torch.ones(len(rows_len), dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            scores = model(rows_src, rows_len, seqs)[:, -1].float() / 1.3               # as generate: the logits
        live = running.nonzero().squeeze(1)              # as generate: rows that ended left the batch
        best, ids = scores[live].topk(6, -1)             # ... and it draws among the 6 best
        pick = ids.gather(1, torch.multinomial(best.softmax(-1), 1, generator=gen)).squeeze(1)
        tok = torch.full_like(running, c.pad_id, dtype=torch.int64)
        tok[live] = pick
        running[live] = pick != c.eos_id
        seqs = torch.cat([seqs, tok[:, None]], 1)
        if not running.any():
            break
    assert torch.equal(got, seqs)
    assert any(not torch.equal(got[i], got[i + 1]) for i in range(0, len(got), R))   # a source's samples differ


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, word", [
    (dict(decoder_start_token_id=None), "decoder_start_token_id is required"),
    (dict(decoder_start_token_id=-1), "decoder_start_token_id"),
    (dict(decoder_start_token_id=[1, 2]), "decoder_start_token_id"),
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=40), "max_length"),                          # 1 + 40 positions > max_positions 32
])
def test_bad_options_raise_naming_the_option(bad, word):
    model = build("pre-norm")
    src, _, mask = sources()
    kw = {"decoder_start_token_id": 1, **bad}
    with pytest.raises(ValueError, match=word):
        generate(model, src, mask, **kw)


@pytest.mark.parametrize("kind", ["pre-norm", "lstm"])
def test_masks_the_encoder_cannot_take_raise(kind):
    model = build(kind)
    src, _, mask = sources()
    holes = mask.clone()
    holes[0, 3] = 0                                                   # 1 1 1 0 1 1 1: not one run of tokens
    with pytest.raises(ValueError, match="contiguous run.*row 0"):
        seq2seq_generate(model, src, holes)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"every source needs a token.*\[2\]"):
        seq2seq_generate(model, src, empty)
    with pytest.raises(ValueError, match="only 0 and 1"):
        seq2seq_generate(model, src, mask * 2)
    with pytest.raises(ValueError, match="attention_mask"):
        seq2seq_generate(model, src, mask[:, 1:])


def test_the_decoder_protocol_rejects_bad_calls():
    model = build("post-norm")
    lstm = build("lstm")
    src, lengths, mask = sources()
    memory = model.encode_for_generation(src, mask)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 5"):
        model.new_cache(7, 4, memory)
    with pytest.raises(ValueError, match="max_length"):
        model.new_cache(5, 33, memory)
    cache = model.new_cache(5, 4, memory)
    tokens = torch.ones(5, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="sources are encoded already"):
        model(src, lengths, tokens, cache=cache)
    with pytest.raises(ValueError, match=r"tgt_in as a \(5, T\)"):
        model(tgt_in=tokens[:3], cache=cache)
    with pytest.raises(ValueError, match="EncoderDecoderCache"):
        model(tgt_in=tokens, cache=object())
    lstm_cache = lstm.new_cache(5, 4, lstm.encode_for_generation(src, mask))
    with pytest.raises(ValueError, match="not a TransformerSeq2Seq.new_cache one"):
        model(tgt_in=tokens, cache=lstm_cache)
    with pytest.raises(ValueError, match="reorder"):
        cache.reorder(torch.arange(6))                     # more rows than the cache holds
    with pytest.raises(ValueError, match="reorder"):
        cache.reorder(torch.arange(0))


def test_decoder_start_token_id_is_rejected_for_a_decoder_only_model():
    from fastseq.models.gpt import GPT, GPTConfig
    gpt = GPT(GPTConfig(vocab_size=V, max_positions=16, dim=8, layers=1, heads=2)).eval()
    with pytest.raises(ValueError, match="decoder_start_token_id is for encoder-decoder models"):
        generate(gpt, torch.ones(1, 2, dtype=torch.int64), decoder_start_token_id=1)
