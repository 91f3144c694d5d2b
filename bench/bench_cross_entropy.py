"""pytest-benchmark view of the cross-entropy cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/cross_entropy.py).

    pytest bench/bench_cross_entropy.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_cross_entropy = family_test("cross_entropy", rounds=5)
