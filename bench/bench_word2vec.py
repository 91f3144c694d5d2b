"""pytest-benchmark view of the word2vec cases that fastseq-bench runs (same registry, cases and
peers: fastseq/bench/word2vec.py; gensim's peer is skipped when gensim is absent).

    pytest bench/bench_word2vec.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_word2vec = family_test("word2vec", rounds=3)
