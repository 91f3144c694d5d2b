"""pytest-benchmark view of the recurrent cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/recurrent.py).

    pytest bench/bench_recurrent.py --benchmark-columns=median,iqr -k "infer"
"""
from fastseq.bench.pytest_view import family_test

test_recurrent = family_test("recurrent", rounds=5)
