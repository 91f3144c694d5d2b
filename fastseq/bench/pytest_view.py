"""The registered cases as pytest-benchmark tests: every bench/bench_<family>.py is

    test_<family> = family_test("<family>")

parametrized over the registry's cases of that family on this machine's device and, per case,
over the implementations it declares (fastseq, each peer, the kernel alone), named
"<case>-<impl>" and grouped by case, so pytest-benchmark's table shows them side by side.
Inputs are built lazily, one case's at a time.  Per-call cases (Case.calls_per_sample > 1) run
that loop as pytest-benchmark iterations, so its figures are per call too.
"""
from __future__ import annotations

import contextlib

import torch

from .registry import cases, check_setup, load
from .timing import calls_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_setups = {}


def family_cases(family: str, device: str = DEVICE):
    load([family])
    return cases(device, [family])


def params(family: str, device: str = DEVICE):
    """pytest.param(case, impl) for every case of the family and every implementation it declares."""
    import pytest

    return [pytest.param(c, impl, id=f"{c.name}-{impl}") for c in family_cases(family, device) for impl in c.impls]


def family_test(family: str, rounds: int = 5):
    """The test function of bench/bench_<family>.py."""
    import pytest

    @pytest.mark.parametrize("case,impl", params(family))
    def test(benchmark, case, impl):
        run(benchmark, case, impl, rounds)

    test.__name__ = test.__qualname__ = f"test_{family}"
    test.__doc__ = f"pytest-benchmark view of the registry's {family} cases (fastseq-bench --only {family})."
    return test


def run(benchmark, case, impl: str, rounds: int = 5):
    import pytest

    if case.name not in _setups:
        _setups.clear()                       # one case's inputs alive at a time
        _setups[case.name] = case.setup()
        check_setup(case, _setups[case.name])
    s = _setups[case.name]
    fn = {"fastseq": s.fastseq, "kernel": s.kernel, **s.peers}.get(impl)
    if fn is None:
        pytest.skip(f"{case.name} has no {impl} implementation")
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.group = case.name
    benchmark.extra_info["case"] = case.name
    grad = torch.set_grad_enabled(s.grad_enabled) if s.grad_enabled is not None else contextlib.nullcontext()
    with grad:
        iterations = 1
        if case.calls_per_sample > 1:
            iterations = calls_for({impl: fn}, DEVICE, case.calls_per_sample, 0.02)
            benchmark.extra_info["calls_per_sample"] = iterations
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
