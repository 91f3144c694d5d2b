"""pytest-benchmark view of the attention cases that fastseq-bench runs (same registry).

    pytest bench/bench_attention.py --benchmark-columns=median,iqr -k "BERT"

The long-context sweep is fastseq-bench's (`fastseq-bench --only attention`).
"""
import pytest

from fastseq.bench import attention as _cases  # noqa: F401  (registers the cases)
from fastseq.bench.pytest_view import family_cases, run

CASES = family_cases("attention")


@pytest.mark.parametrize("impl", ["fastseq", "torch", "math", "naive", "torch+mask"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attention(benchmark, case, impl):
    run(benchmark, case, impl, rounds=3)
