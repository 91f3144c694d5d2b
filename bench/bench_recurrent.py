"""pytest-benchmark view of the recurrent cases that fastseq-bench runs (same registry).

    pytest bench/bench_recurrent.py --benchmark-columns=median,iqr
"""
import pytest

from fastseq.bench import recurrent as _cases  # noqa: F401  (registers the cases)
from fastseq.bench.pytest_view import family_cases, run

CASES = family_cases("recurrent")


@pytest.mark.parametrize("impl", ["fastseq", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_recurrent(benchmark, case, impl):
    run(benchmark, case, impl, rounds=5)
