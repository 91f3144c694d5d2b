"""pytest-benchmark view of the LayerNorm cases that fastseq-bench runs (same registry).

    pytest bench/bench_layer_norm.py --benchmark-columns=median,iqr
"""
import pytest

from fastseq.bench import layer_norm as _cases  # noqa: F401  (registers the cases)
from fastseq.bench.pytest_view import family_cases, run

CASES = family_cases("layer_norm")


@pytest.mark.parametrize("impl", ["fastseq", "torch", "naive", "kernel"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_norm(benchmark, case, impl):
    run(benchmark, case, impl, rounds=15)
