"""The registered cases as pytest-benchmark tests (bench/bench_<family>.py use this).

Each case yields one benchmark per implementation (fastseq, each peer, the kernel alone), named
case-impl, so pytest-benchmark's table shows them side by side.
"""
from __future__ import annotations

import torch

from .registry import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_setups = {}


def family_cases(family: str):
    return cases(DEVICE, [family])


def run(benchmark, case, impl: str, rounds: int = 5):
    import pytest

    if case.name not in _setups:
        _setups.clear()                       # one case's inputs alive at a time
        _setups[case.name] = case.setup()
    s = _setups[case.name]
    fn = {"fastseq": s.fastseq, "kernel": s.kernel, **s.peers}.get(impl)
    if fn is None:
        pytest.skip(f"{case.name} has no {impl} implementation")
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info["case"] = case.name
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
