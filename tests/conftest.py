"""Shared test fixtures.  The CUDA-simulator tests (tests/cuda_sim) need NUMBA_ENABLE_CUDASIM=1 set
before numba is imported, so they run in their own pytest process (see README)."""
import os

import pytest
import torch

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore = ["cuda_sim"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison(monkeypatch):
    """Every fastseq output buffer starts as NaN, so an element a kernel forgets to write shows."""
    import fastseq._alloc as alloc

    real_empty, real_empty_like, real_reused = alloc.empty, alloc.empty_like, alloc.reused

    def nan_empty(shape, dtype, device):
        t = real_empty(shape, dtype, device)
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    def nan_reused(shape, dtype):
        return real_reused(shape, dtype).fill_(float("nan"))

    def nan_empty_like(like):
        t = real_empty_like(like)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setattr(alloc, "empty_like", nan_empty_like)
    monkeypatch.setattr(alloc, "reused", nan_reused)
    yield


def pytest_configure(config):
    import fastseq

    if "cpu" not in fastseq.available_backends():
        pytest.exit(f"fastseq at {fastseq.__file__} has no compiled CPU kernels: "
                    f"{fastseq._dispatch.backend_missing('cpu')}.  Install with `pip install .` and run "
                    "`pytest` (not `python -m pytest`, which puts the uncompiled source tree first).",
                    returncode=2)
