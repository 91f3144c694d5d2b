"""Benchmark cases of word2vec (issue 14): one training call (5 epochs, vocabulary built
beforehand) of fastseq.word2vec.Word2Vec against gensim's Word2Vec with identical settings
(vector_size 100, window 5, negative 5, sample 1e-3, min_count 5), skip-gram and CBOW, at 1 and
2 worker threads.  Words/s counts the corpus words of all epochs (the same for both).

Corpus: gensim's test data when gensim is installed (its Wikipedia sample, 446 k words; else its
Lee background corpus), else Python's help texts; gensim absent, its peer is skipped and says so.  Each case's setup
prints the analogy accuracy of both on gensim's questions-words file (the questions whose words
are all in the vocabulary; on a corpus this small most are not)."""
from __future__ import annotations

import functools
import os
import re

from .registry import Case, Setup, register

SETTINGS = dict(vector_size=100, window=5, min_count=5, negative=5, sample=1e-3, epochs=5, seed=1)


@functools.lru_cache(maxsize=1)
def corpus():
    """(sentences, name), read once for all the cases: gensim's Wikipedia sample (206 articles, 446 k words: its lines of wiki
    text, markup filtered), else its Lee background corpus, else Python's help texts."""
    try:
        from gensim.test.utils import datapath
        from gensim.utils import simple_preprocess
    except ImportError:
        return _help_texts(), "Python help texts"
    wiki = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    if os.path.exists(wiki):
        import bz2
        from gensim.corpora.wikicorpus import filter_wiki
        with bz2.open(wiki, "rt", encoding="utf-8") as f:
            articles = re.findall(r"<text[^>]*>(.*?)</text>", f.read(), flags=re.S)
        sents = [s for a in articles for s in map(simple_preprocess, filter_wiki(a).splitlines()) if len(s) > 2]
        return sents, "gensim's enwiki sample"
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        return [simple_preprocess(line) for line in f], "gensim lee_background.cor"


def _help_texts():
    import pydoc
    text = []
    for name in ("list", "dict", "str", "os", "re", "collections", "itertools", "functools", "json"):
        try:
            text.append(pydoc.render_doc(name, renderer=pydoc.plaintext))
        except Exception:                             # noqa: BLE001 - any module the help cannot render
            continue
    lines = (re.findall(r"[a-z]+", line.lower()) for line in "\n".join(text).splitlines())
    return [s for s in lines if s]


def _questions():
    try:
        from gensim.test.utils import datapath
        path = datapath("questions-words.txt")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def _case(sg: bool, workers: int, meta: dict):
    def setup():
        import torch
        from ..word2vec import Word2Vec
        sents, name = corpus()
        words = sum(map(len, sents)) * SETTINGS["epochs"]
        meta["tokens"] = words                   # the report's tokens/s: words/s of both
        ours = Word2Vec(sg=int(sg), workers=workers, **SETTINGS)
        ours.build_vocab(sents)
        peers, skipped, theirs = {}, {}, None
        try:
            import gensim
            theirs = gensim.models.Word2Vec(sg=int(sg), workers=workers, **SETTINGS)
            theirs.build_vocab(sents)
            peers["gensim"] = lambda: theirs.train(sents, total_examples=len(sents), epochs=SETTINGS["epochs"])
        except ImportError:
            skipped["gensim"] = "skipped: gensim is not installed (pip install gensim)"
        before = torch.get_num_threads()
        torch.set_num_threads(max(before, workers))
        ours.train(sents)
        torch.set_num_threads(before)
        q = _questions()
        if q is not None:
            a, sec = ours.wv.evaluate_word_analogies(q)
            n = sum(s["correct"] + s["incorrect"] for s in sec)
            line = f"  word2vec {'sg' if sg else 'cbow'} x{workers} on {name} ({words // SETTINGS['epochs']} words): " \
                   f"analogy accuracy fastseq {100 * a:.1f}%"
            if theirs is not None:
                theirs.train(sents, total_examples=len(sents), epochs=SETTINGS["epochs"])
                ga = theirs.wv.evaluate_word_analogies(q)[0]
                line += f", gensim {100 * ga:.1f}%"
            print(line + f" ({n} questions in vocabulary)")

        def run():
            ours.train(sents)
        return Setup(fastseq=run, peers=peers, skipped=skipped, flops=0.0)
    return setup


for _sg in (True, False):
    for _workers in (1, 2):
        _meta: dict = {}
        register(Case("word2vec", f"word2vec {'skip-gram' if _sg else 'cbow'} train workers={_workers}", "cpu",
                      _case(_sg, _workers, _meta), peers=("gensim",), quick=_workers == 2, meta=_meta))
