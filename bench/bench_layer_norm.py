"""pytest-benchmark view of the LayerNorm cases that fastseq-bench runs (same registry).

    pytest bench/bench_layer_norm.py --benchmark-group-by=param:case --benchmark-columns=median,iqr

Each case yields one benchmark per implementation (fastseq, each peer, the kernel alone), grouped
by case so pytest-benchmark's table shows them side by side.  Not part of the test run.
"""
import pytest
import torch

from fastseq.bench import layer_norm as _cases  # noqa: F401  (registers the cases)
from fastseq.bench.registry import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases(DEVICE, ["layer_norm"])
_setups = {}


def _setup(case):
    if case.name not in _setups:
        _setups[case.name] = case.setup()
    return _setups[case.name]


@pytest.mark.parametrize("impl", ["fastseq", "torch", "naive", "kernel"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_norm(benchmark, case, impl):
    s = _setup(case)
    fn = {"fastseq": s.fastseq, "kernel": s.kernel, **s.peers}.get(impl)
    if fn is None:
        pytest.skip(f"{case.name} has no {impl} implementation")
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info["case"] = case.name
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
