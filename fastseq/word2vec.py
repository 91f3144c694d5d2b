"""word2vec on a compiled kernel (issue 14): skip-gram and CBOW with negative sampling, an API a
gensim user recognizes.

    from fastseq.word2vec import Word2Vec
    model = Word2Vec(sentences, vector_size=100, window=5, min_count=5, sg=1, negative=5,
                     sample=1e-3, epochs=5, workers=2, seed=1)
    model.wv["king"], model.wv.most_similar("king", topn=5)
    emb = model.wv.to_embedding(freeze=True)          # a torch.nn.Embedding for a downstream model

The pieces, in gensim's definitions:
  - vocabulary: words seen at least min_count times, most frequent first (ties: the later seen
    first, as gensim's reversed stable sort);
  - subsampling: a word of count c is kept with probability min(1, (sqrt(c / t) + 1) t / c),
    t = sample x (the kept words' total count), stored as an integer out of 2^32;
  - negatives: drawn from count^0.75, a cumulative table scaled to [0, 2^31 - 1];
  - learning rate: linear from alpha to min_alpha over all epochs;
  - initial vectors uniform in [-0.5 / D, 0.5 / D), output vectors zero.
The training loop itself is kernels/cpu/word2vec.pyx (its docstring has the update and the
random streams): Hogwild over `workers` OpenMP threads, no per-pair library call.
"""
from __future__ import annotations

import collections
import time
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from . import _dispatch

MAX_SENTENCE = 10000          # longer sentences are split, as gensim's MAX_WORDS_IN_BATCH
ALL = 0xFFFFFFFF              # a keep threshold meaning "never subsampled"


def _kernels():
    return _dispatch.cpu_kernels("word2vec")


# ============================================================================ vocabulary and tables

def build_vocab(sentences: Iterable[Sequence[str]], min_count: int):
    """(words most frequent first, ties the later seen first, as gensim; their counts (int64);
    the total words seen)."""
    counts = collections.Counter()
    total = 0
    for sentence in sentences:
        counts.update(sentence)
        total += len(sentence)
    seen = [(w, c) for w, c in counts.items() if c >= min_count]      # first-seen order
    order = np.argsort(np.array([c for _, c in seen], dtype=np.int64), kind="stable")[::-1]
    return [seen[i][0] for i in order], np.array([seen[i][1] for i in order], dtype=np.int64), total


def keep_thresholds(counts: np.ndarray, sample: float) -> np.ndarray:
    """Subsampling: word i is kept when a uniform 32-bit draw is at most keep[i] (ALL: always)."""
    if sample <= 0:
        return np.full(len(counts), ALL, dtype=np.uint32)
    t = sample * counts.sum() if sample < 1 else sample
    p = (np.sqrt(counts / t) + 1) * (t / counts)
    keep = np.where(p >= 1, ALL, np.round(p * 2.0 ** 32))
    return np.minimum(keep, ALL).astype(np.uint32)


def cum_table(counts: np.ndarray, power: float = 0.75, domain: int = 2 ** 31 - 1) -> np.ndarray:
    """The negatives' cumulative distribution count^power, scaled to [0, domain]."""
    w = counts.astype(np.float64) ** power
    return np.round(np.cumsum(w) / w.sum() * domain).astype(np.uint32)


def cum_starts(cum: np.ndarray) -> np.ndarray:
    """start[k]: the first entry of cum above k 2^15, k = 0 .. 2^16 (the kernel's negative_
    scans from start[x >> 15] for the first entry above a draw x)."""
    return np.searchsorted(cum, np.arange(2 ** 16 + 1, dtype=np.int64) << 15, side="right").astype(np.int32)


def _encode(sentences, index: dict):
    """Word indices (int32, words outside the vocabulary dropped) and sentence offsets (int64);
    sentences longer than MAX_SENTENCE are split."""
    ids, offs = [], [0]
    for sentence in sentences:
        row = [index[w] for w in sentence if w in index]
        for k in range(0, len(row), MAX_SENTENCE):
            part = row[k:k + MAX_SENTENCE]
            ids.extend(part)
            offs.append(offs[-1] + len(part))
    return np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64)


def _read(corpus_file: str) -> List[List[str]]:
    with open(corpus_file, encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


def _progress_bar(epochs: int):
    """A progress bar over the epochs (tqdm's; a line per epoch without it)."""
    try:
        from tqdm import tqdm
        return tqdm(total=epochs, unit="epoch", desc="word2vec")
    except ImportError:
        class _Lines:
            n = 0

            def update(self, k):
                self.n += k

            def set_postfix_str(self, s):
                print(f"word2vec epoch {self.n}/{epochs}: {s}")

            def close(self):
                pass
        return _Lines()


# ============================================================================ the vectors

class KeyedVectors:
    """Word vectors by word: `wv[word]`, `most_similar`, `similarity`, analogy evaluation,
    save / load, and export as a torch.nn.Embedding."""

    def __init__(self, index_to_key: List[str], vectors: np.ndarray):
        self.index_to_key = list(index_to_key)
        self.key_to_index = {w: i for i, w in enumerate(self.index_to_key)}
        self.vectors = vectors
        self._unit = None

    def __len__(self):
        return len(self.index_to_key)

    def __contains__(self, word):
        return word in self.key_to_index

    def __getitem__(self, word):
        """Args: word, a str, or a list of them.  Returns: its vector, (D,) float32 (a view of
        `vectors`), or (len(word), D) for a list.  Raises KeyError naming an unknown word."""
        if isinstance(word, str):
            return self.vectors[self._index(word)]
        return np.stack([self[w] for w in word])

    def _index(self, word: str) -> int:
        try:
            return self.key_to_index[word]
        except KeyError:
            raise KeyError(f"word {word!r} is not in the vocabulary ({len(self)} words)") from None

    def unit_vectors(self) -> np.ndarray:
        if self._unit is None or self._unit.shape != self.vectors.shape:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.maximum(norms, 1e-12)
        return self._unit

    def similarity(self, a: str, b: str) -> float:
        """Args: two words.  Returns: the cosine of their vectors."""
        u = self.unit_vectors()
        return float(u[self._index(a)] @ u[self._index(b)])

    def most_similar(self, positive=(), negative=(), topn: int = 10):
        """The words nearest by cosine to sum(positive) - sum(negative) of the unit vectors, the
        query words left out (gensim's 3CosAdd for an analogy: positive=[b, c], negative=[a]).

        Args: positive, negative: a word or a list of words; topn: how many.
        Returns: [(word, cosine)], nearest first, topn long (fewer if the vocabulary is)."""
        positive = [positive] if isinstance(positive, str) else list(positive)
        negative = [negative] if isinstance(negative, str) else list(negative)
        if not positive and not negative:
            raise ValueError("most_similar: give at least one positive or negative word")
        u = self.unit_vectors()
        q = np.zeros(u.shape[1])
        for w in positive:
            q += u[self._index(w)]
        for w in negative:
            q -= u[self._index(w)]
        q /= max(np.linalg.norm(q), 1e-12)
        sims = u @ q
        skip = {self.key_to_index[w] for w in positive + negative}
        order = np.argsort(-sims)
        out = []
        for i in order:
            if i not in skip:
                out.append((self.index_to_key[i], float(sims[i])))
                if len(out) == topn:
                    break
        return out

    def evaluate_word_analogies(self, path: str, restrict_vocab: int = 300000):
        """Accuracy on a questions-words file (": section" lines, then "a b c d": a is to b as c is
        to d), counting the questions whose four words are among the restrict_vocab most frequent,
        as gensim does: (accuracy, sections [{"section", "correct", "incorrect"}])."""
        allowed = set(self.index_to_key[:restrict_vocab])
        sections, cur = [], None
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(":"):
                    cur = {"section": line[1:].strip(), "correct": 0, "incorrect": 0}
                    sections.append(cur)
                    continue
                words = line.split()
                if len(words) != 4 or cur is None:
                    continue
                a, b, c, d = words
                if not all(w in allowed for w in words):
                    continue
                guess = self.most_similar(positive=[b, c], negative=[a], topn=1)[0][0]
                cur["correct" if guess == d else "incorrect"] += 1
        right = sum(s["correct"] for s in sections)
        total = right + sum(s["incorrect"] for s in sections)
        return (right / total if total else 0.0), sections

    def to_embedding(self, freeze: bool = True) -> torch.nn.Embedding:
        """Args: freeze: the weight left out of training (requires_grad False) or not.
        Returns: a torch.nn.Embedding of weight (V, D), a copy of the vectors (row i:
        index_to_key[i]); look words up with key_to_index."""
        return torch.nn.Embedding.from_pretrained(torch.from_numpy(self.vectors.copy()), freeze=freeze)

    def save(self, path: str):
        """Write the words and vectors to path (.npz; load() reads it back)."""
        np.savez(path, vectors=self.vectors, words=np.array(self.index_to_key, dtype=object))

    @classmethod
    def load(cls, path: str) -> "KeyedVectors":
        data = np.load(path if path.endswith(".npz") else path + ".npz", allow_pickle=True)
        return cls(list(data["words"]), data["vectors"])


# ============================================================================ the model

class Word2Vec:
    """Skip-gram (sg=1) or CBOW (sg=0) with negative sampling, trained on construction when a
    corpus is given (gensim's arguments and defaults, workers defaulting to torch's threads).

    Args:
        sentences: an iterable of token lists; or corpus_file: a text file, one sentence a line,
            tokens split on whitespace (not both).
        vector_size (D), window, min_count, negative (<= 64), sample, alpha, min_alpha, epochs,
            seed, cbow_mean: as gensim's.
        workers: OpenMP threads (default torch.get_num_threads()).
        progress: a progress bar over the epochs with words/s.
    Attributes after training:
        wv: KeyedVectors, vectors (V, D) float32 in wv.index_to_key's order, most frequent first;
        syn1neg: (V, D) float32, the output vectors; words_per_second of the last train().
    Raises ValueError naming the argument for bad sizes, an empty corpus, or a min_count that
    removes every word."""

    def __init__(self, sentences: Optional[Iterable[Sequence[str]]] = None, corpus_file: Optional[str] = None,
                 vector_size: int = 100, window: int = 5, min_count: int = 5, sg: int = 0, negative: int = 5,
                 sample: float = 1e-3, alpha: float = 0.025, min_alpha: float = 0.0001, epochs: int = 5,
                 workers: Optional[int] = None, seed: int = 1, cbow_mean: int = 1, progress: bool = False):
        for name, value, low in (("vector_size", vector_size, 1), ("window", window, 1), ("negative", negative, 1),
                                 ("epochs", epochs, 1), ("min_count", min_count, 1)):
            if int(value) < low:
                raise ValueError(f"Word2Vec: {name} must be at least {low}, got {value!r}")
        if int(negative) > 64:
            raise ValueError(f"Word2Vec: negative must be at most 64, got {negative!r}")
        if sample < 0 or alpha <= 0 or min_alpha < 0:
            raise ValueError(f"Word2Vec: sample, alpha, min_alpha must be >= 0, > 0, >= 0; got {sample}, {alpha}, "
                             f"{min_alpha}")
        if sentences is not None and corpus_file is not None:
            raise ValueError("Word2Vec: give sentences or corpus_file, not both")
        self.vector_size, self.window, self.min_count, self.sg = int(vector_size), int(window), int(min_count), sg
        self.negative, self.sample, self.alpha, self.min_alpha = int(negative), sample, alpha, min_alpha
        self.epochs, self.seed, self.cbow_mean, self.progress = int(epochs), int(seed), int(cbow_mean), progress
        self.workers = int(workers) if workers is not None else torch.get_num_threads()
        self.wv: Optional[KeyedVectors] = None
        self.words_per_second = 0.0
        if corpus_file is not None:
            sentences = _read(corpus_file)
        if sentences is not None:
            sentences = sentences if isinstance(sentences, list) else list(sentences)
            self.build_vocab(sentences)
            self.train(sentences)

    def build_vocab(self, sentences: Sequence[Sequence[str]]):
        """Args: sentences, token lists.  Builds the vocabulary (min_count), the subsampling and
        negatives' tables and fresh vectors: wv.vectors (V, D) uniform in [-0.5/D, 0.5/D),
        syn1neg (V, D) zeros."""
        words, counts, total = build_vocab(sentences, self.min_count)
        if total == 0:
            raise ValueError("Word2Vec: the corpus is empty (no words in any sentence)")
        if not words:
            top = collections.Counter(w for s in sentences for w in s).most_common(1)[0][1]
            raise ValueError(f"Word2Vec: min_count={self.min_count} removes every word ({total} words, the most "
                             f"frequent seen {top} times)")
        self.counts = counts
        self.keep = keep_thresholds(counts, self.sample)
        self.cum_table = cum_table(counts)
        self.cum_start = cum_starts(self.cum_table)
        rng = np.random.default_rng(self.seed)
        D = self.vector_size
        vectors = ((rng.random((len(words), D)) - 0.5) / D).astype(np.float32)
        self.wv = KeyedVectors(words, vectors)
        self.syn1neg = np.zeros((len(words), D), dtype=np.float32)

    def train(self, sentences: Sequence[Sequence[str]]):
        """Train `epochs` epochs over the sentences, updating wv.vectors and syn1neg in place
        (build_vocab first; words outside the vocabulary are skipped).

        Args: sentences: token lists.
        Returns: the words trained on (kept by subsampling) in each epoch, a list of ints."""
        if self.wv is None:
            raise ValueError("Word2Vec.train: build_vocab first")
        ids, offs = _encode(sentences, self.wv.key_to_index)
        longest = int(np.max(np.diff(offs))) if len(offs) > 1 else 0
        nt = max(1, self.workers)
        scratch = np.empty(max(1, longest) * nt, dtype=np.int32)
        vecs = np.empty(2 * self.vector_size * nt, dtype=np.float32)
        W, U = self.wv.vectors.reshape(-1), self.syn1neg.reshape(-1)
        done, t0 = [], time.perf_counter()
        bar = _progress_bar(self.epochs) if self.progress else None
        for epoch in range(self.epochs):
            done.append(_kernels().train_epoch(ids, offs, W, U, self.cum_table, self.cum_start, self.keep,
                                               scratch, vecs,
                                               self.vector_size, self.window, self.negative, bool(self.sg),
                                               bool(self.cbow_mean), self.alpha, self.min_alpha, epoch, self.epochs,
                                               self.seed, nt))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{len(ids) * (epoch + 1) / (time.perf_counter() - t0):,.0f} words/s")
        if bar is not None:
            bar.close()
        self.words_per_second = len(ids) * self.epochs / max(time.perf_counter() - t0, 1e-9)
        self.wv._unit = None
        return done

    def save(self, path: str):
        """Write the model (vectors, output vectors, counts, settings) to path (.npz)."""
        np.savez(path, vectors=self.wv.vectors, syn1neg=self.syn1neg, counts=self.counts,
                 words=np.array(self.wv.index_to_key, dtype=object),
                 config=np.array([self.vector_size, self.window, self.min_count, self.sg, self.negative,
                                  self.epochs, self.seed, self.cbow_mean]),
                 rates=np.array([self.sample, self.alpha, self.min_alpha]))

    @classmethod
    def load(cls, path: str) -> "Word2Vec":
        data = np.load(path if path.endswith(".npz") else path + ".npz", allow_pickle=True)
        D, window, min_count, sg, negative, epochs, seed, cbow_mean = (int(v) for v in data["config"])
        sample, alpha, min_alpha = (float(v) for v in data["rates"])
        m = cls(vector_size=D, window=window, min_count=min_count, sg=sg, negative=negative, sample=sample,
                alpha=alpha, min_alpha=min_alpha, epochs=epochs, seed=seed, cbow_mean=cbow_mean)
        m.counts = data["counts"]
        m.keep, m.cum_table = keep_thresholds(m.counts, sample), cum_table(m.counts)
        m.cum_start = cum_starts(m.cum_table)
        m.wv = KeyedVectors(list(data["words"]), data["vectors"])
        m.syn1neg = data["syn1neg"]
        return m
