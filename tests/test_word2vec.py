"""fastseq.word2vec (issue 14): the vocabulary, subsampling and negative tables against their
formulas; a one-thread run against a pure-NumPy reference of the same updates and the same random
streams (kernels/cpu/word2vec.pyx's docstring); a planted-structure corpus whose neighbours must
come out right at 1 and 2 threads; the API (most_similar, analogies, save/load, Embedding); bad
input named in the errors."""
import numpy as np
import pytest
import torch

from fastseq.word2vec import ALL, KeyedVectors, Word2Vec, build_vocab, cum_table, keep_thresholds

M64 = (1 << 64) - 1


# ---------------------------------------------------------------------------- the tables

def test_vocabulary_counts_order_and_min_count():
    sents = [["a", "b", "b", "c"], ["c", "c", "d"], ["b"]]
    words, counts, total = build_vocab(sents, min_count=2)
    assert words == ["c", "b"] and counts.tolist() == [3, 3] and total == 8   # ties: the later seen first (gensim)
    words, counts, _ = build_vocab(sents, min_count=1)
    assert words == ["c", "b", "d", "a"] and counts.tolist() == [3, 3, 1, 1]


def test_subsampling_thresholds_follow_the_formula():
    counts = np.array([1000, 100, 10, 1], dtype=np.int64)
    sample = 1e-2
    keep = keep_thresholds(counts, sample)
    t = sample * counts.sum()
    for c, k in zip(counts, keep):
        p = (np.sqrt(c / t) + 1) * t / c
        assert (k == ALL) if p >= 1 else abs(int(k) - p * 2 ** 32) <= 1
    assert (keep_thresholds(counts, 0) == ALL).all()


def test_negative_table_is_the_unigram_to_the_three_quarters():
    counts = np.array([81, 16, 1], dtype=np.int64)
    cum = cum_table(counts)
    w = counts ** 0.75
    assert cum[-1] == 2 ** 31 - 1
    np.testing.assert_allclose(np.diff(np.r_[0, cum]) / cum[-1], w / w.sum(), rtol=1e-8)


# ---------------------------------------------------------------------------- the reference

def _seed(seed, epoch, s):
    z = (seed + epoch * 0x9E3779B97F4A7C15 + s * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class _Rng:
    def __init__(self, state):
        self.r = state

    def next(self):
        self.r = (self.r * 25214903917 + 11) & M64
        return self.r


def _negative(cum, rng):
    x = (rng.next() >> 16) % int(cum[-1])
    return int(np.searchsorted(cum, x, side="right")) if x < cum[-1] else len(cum) - 1


def _pair(v, e, w, U, cum, negative, alpha, rng):
    for d in range(negative + 1):
        if d == 0:
            u, label = w, 1.0
        else:
            u, label = _negative(cum, rng), 0.0
            if u == w:
                continue
        f = float(np.dot(v.astype(np.float64), U[u].astype(np.float64)))
        g = (label - 1) * alpha if f > 6 else label * alpha if f < -6 else (label - 1 / (1 + np.exp(-f))) * alpha
        e += np.float32(g) * U[u]
        U[u] += np.float32(g) * v


def reference_train(model, ids, offs):
    """The kernel's updates in NumPy, one thread, in the same order with the same draws."""
    W, U = model.wv.vectors, model.syn1neg
    N, epochs, D = int(offs[-1]), model.epochs, model.vector_size
    for epoch in range(epochs):
        for s in range(len(offs) - 1):
            alpha = np.float32(model.alpha - (model.alpha - model.min_alpha) * (epoch * N + offs[s]) / (epochs * N))
            rng = _Rng(_seed(model.seed, epoch, s))
            kept = []
            for w in ids[offs[s]:offs[s + 1]]:
                k = int(model.keep[w])
                if k != ALL and k < (rng.next() & 0xFFFFFFFF):
                    continue
                kept.append(int(w))
            for pos in range(len(kept)):
                b = rng.next() % model.window
                lo, hi = max(0, pos - model.window + b), min(len(kept), pos + model.window + 1 - b)
                if model.sg:
                    for j in range(lo, hi):
                        if j != pos:
                            e = np.zeros(D, np.float32)
                            _pair(W[kept[j]], e, kept[pos], U, model.cum_table, model.negative, alpha, rng)
                            W[kept[j]] += e
                else:
                    ctx = [kept[j] for j in range(lo, hi) if j != pos]
                    if not ctx:
                        continue
                    v = W[ctx].sum(0, dtype=np.float32)
                    if model.cbow_mean:
                        v = v / np.float32(len(ctx))
                    e = np.zeros(D, np.float32)
                    _pair(v, e, kept[pos], U, model.cum_table, model.negative, alpha, rng)
                    for c in ctx:
                        W[c] += e


def _corpus(seed=0, n=40, groups=4, size=4, length=9):
    rng = np.random.default_rng(seed)
    words = [[f"g{g}w{i}" for i in range(size)] for g in range(groups)]
    return [[str(w) for w in rng.choice(words[rng.integers(groups)], length)] for _ in range(n)]


@pytest.mark.parametrize("sg,cbow_mean", [(1, 1), (0, 1), (0, 0)], ids=["skipgram", "cbow_mean", "cbow_sum"])
def test_one_thread_matches_the_numpy_reference(sg, cbow_mean):
    from fastseq.word2vec import _encode
    sents = _corpus()
    kw = dict(vector_size=8, window=3, min_count=1, sg=sg, negative=3, sample=0.05, alpha=0.05, min_alpha=0.001,
              epochs=2, workers=1, seed=7, cbow_mean=cbow_mean)
    got = Word2Vec(sents, **kw)
    ref = Word2Vec(**kw)
    ref.build_vocab(sents)
    ids, offs = _encode(sents, ref.wv.key_to_index)
    reference_train(ref, ids, offs)
    np.testing.assert_allclose(got.wv.vectors, ref.wv.vectors, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.syn1neg, ref.syn1neg, rtol=1e-4, atol=1e-6)
    assert np.abs(got.syn1neg).max() > 0.01                    # it did train


# ---------------------------------------------------------------------------- planted structure

@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
@pytest.mark.parametrize("workers", [1, 2])
def test_planted_groups_are_nearest_neighbours(sg, workers):
    """Words co-occur only within their group: each word's three nearest neighbours are its group."""
    sents = _corpus(seed=1, n=2000, groups=6, size=4, length=10)
    m = Word2Vec(sents, vector_size=24, window=4, min_count=1, sg=sg, epochs=5, workers=workers, seed=3, sample=0)
    for w in m.wv.index_to_key:
        group = w.split("w")[0]
        assert all(n.startswith(group + "w") for n, _ in m.wv.most_similar(w, topn=3)), (w, m.wv.most_similar(w))


def test_threads_write_every_row_and_repeat_at_one_thread():
    sents = _corpus(seed=2, n=300)
    a = Word2Vec(sents, vector_size=16, min_count=1, workers=1, seed=5, epochs=2)
    b = Word2Vec(sents, vector_size=16, min_count=1, workers=1, seed=5, epochs=2)
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    c = Word2Vec(sents, vector_size=16, min_count=1, workers=2, seed=5, epochs=2)
    assert np.isfinite(c.wv.vectors).all() and np.isfinite(c.syn1neg).all()


# ---------------------------------------------------------------------------- the API

def test_analogies_save_load_and_embedding(tmp_path):
    sents = _corpus(seed=3, n=500)
    m = Word2Vec(sents, vector_size=16, min_count=1, sg=1, epochs=3, workers=2, seed=1)
    q = tmp_path / "questions-words.txt"
    q.write_text(": planted\ng0w0 g0w1 g0w2 g0w3\ng1w0 g1w1 g1w2 g1w3\nxx g0w1 g0w2 g0w3\n")
    acc, sections = m.wv.evaluate_word_analogies(str(q))
    assert sections[0]["correct"] + sections[0]["incorrect"] == 2 and 0 <= acc <= 1   # the OOV question is skipped
    path = str(tmp_path / "model")
    m.save(path)
    m2 = Word2Vec.load(path)
    np.testing.assert_array_equal(m2.wv.vectors, m.wv.vectors)
    assert m2.wv.most_similar("g0w0", topn=3) == m.wv.most_similar("g0w0", topn=3)
    m.wv.save(str(tmp_path / "wv"))
    kv = KeyedVectors.load(str(tmp_path / "wv"))
    assert kv.index_to_key == m.wv.index_to_key
    emb = m.wv.to_embedding(freeze=True)
    assert isinstance(emb, torch.nn.Embedding) and not emb.weight.requires_grad
    torch.testing.assert_close(emb(torch.tensor([m.wv.key_to_index["g1w2"]]))[0], torch.from_numpy(m.wv["g1w2"]))
    assert m.wv.to_embedding(freeze=False).weight.requires_grad


def test_progress_bar_reports_words_per_second(capsys):
    m = Word2Vec(_corpus(seed=5, n=50), vector_size=8, min_count=1, epochs=2, workers=1, progress=True)
    assert m.words_per_second > 0
    assert "words/s" in capsys.readouterr().err + capsys.readouterr().out


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="corpus is empty"):
        Word2Vec([[], []], min_count=1)
    with pytest.raises(ValueError, match="min_count=5 removes every word"):
        Word2Vec([["a", "b"], ["a"]], min_count=5)
    with pytest.raises(ValueError, match="vector_size must be at least 1, got 0"):
        Word2Vec([["a"]], vector_size=0)
    with pytest.raises(ValueError, match="negative must be at most 64, got 65"):
        Word2Vec([["a"]], negative=65)
    with pytest.raises(KeyError, match="'zzz' is not in the vocabulary"):
        Word2Vec([["a", "b"]] * 3, min_count=1, vector_size=4).wv["zzz"]


def test_tables_match_gensims():
    """An independent oracle (gensim, installed by CI): the same vocabulary order, negatives'
    cumulative table and subsampling thresholds (to a few parts in 2^32) for the same corpus."""
    gensim = pytest.importorskip("gensim")
    sents = _corpus(seed=4, n=200) + [["rare"], ["g0w0", "rare", "once"]]
    g = gensim.models.Word2Vec(vector_size=4, min_count=2, sample=1e-2, negative=5, workers=1)
    g.build_vocab(sents)
    words, counts, _ = build_vocab(sents, 2)
    assert words == list(g.wv.index_to_key)
    np.testing.assert_array_equal(cum_table(counts), g.cum_table)
    theirs = np.array([g.wv.get_vecattr(w, "sample_int") for w in words], dtype=np.int64)
    np.testing.assert_allclose(keep_thresholds(counts, 1e-2).astype(np.int64), theirs, rtol=0, atol=4)
