"""pytest-benchmark view of the fused-dropout cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/dropout.py).

    pytest bench/bench_dropout.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_dropout = family_test("dropout", rounds=15)
