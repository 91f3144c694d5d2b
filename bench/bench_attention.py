"""pytest-benchmark view of the attention cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/attention.py).

    pytest bench/bench_attention.py --benchmark-columns=median,iqr -k "BERT"

The long-context sweep is fastseq-bench's (`fastseq-bench --only attention`).
"""
from fastseq.bench.pytest_view import family_test

test_attention = family_test("attention", rounds=3)
