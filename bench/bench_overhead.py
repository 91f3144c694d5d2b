"""pytest-benchmark view of the per-call overhead cases that fastseq-bench runs (same registry,
cases and peers: fastseq/bench/overhead.py).  Each round loops over many calls (pytest-benchmark
iterations), so the times shown are per call.

    pytest bench/bench_overhead.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_overhead = family_test("overhead", rounds=15)
