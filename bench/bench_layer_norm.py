"""pytest-benchmark view of the LayerNorm cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/layer_norm.py).

    pytest bench/bench_layer_norm.py --benchmark-columns=median,iqr
"""
from fastseq.bench.pytest_view import family_test

test_layer_norm = family_test("layer_norm", rounds=15)
