"""Backend registry, use_backend, explain, thread count (DESIGN.md section 4)."""
import pytest
import torch

import fastseq
from fastseq import _dispatch
from fastseq.functional import layer_norm


def test_available_backends_on_a_cpu_machine():
    got = fastseq.available_backends()
    assert "cpu" in got and "torch" in got
    if not torch.cuda.is_available():
        assert "cuda" not in got


def test_cpu_tensors_pick_the_cpu_backend():
    x = torch.randn(4, 8)
    assert _dispatch.select("layer_norm", x, (8,)) == "cpu"
    # float16 has no CPU kernel: falls back to the torch reference, and says why
    assert _dispatch.select("layer_norm", x.half(), (8,)) == "torch"
    assert "cpu kernels take float32, float64, got float16" in fastseq.explain("layer_norm", x.half(), (8,))


def test_use_backend_nests_and_restores_on_exception():
    x = torch.randn(4, 8)
    assert _dispatch.forced_backend() is None
    with fastseq.use_backend("torch"):
        assert _dispatch.select("layer_norm", x, (8,)) == "torch"
        with fastseq.use_backend("cpu"):
            assert _dispatch.select("layer_norm", x, (8,)) == "cpu"
        assert _dispatch.forced_backend() == "torch"
        with pytest.raises(RuntimeError):
            with fastseq.use_backend("cpu"):
                raise RuntimeError("boom")
        assert _dispatch.forced_backend() == "torch"
    assert _dispatch.forced_backend() is None


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; expected one of cpu, cuda, torch"):
        with fastseq.use_backend("gpu"):
            pass


def test_forced_backend_that_cannot_run_lists_every_reason():
    with fastseq.use_backend("cpu"):
        with pytest.raises(NotImplementedError, match="float16"):
            layer_norm(torch.randn(4, 8).half(), (8,))
    with fastseq.use_backend("cuda"):
        with pytest.raises(NotImplementedError) as e:
            layer_norm(torch.randn(4, 8), (8,))
    assert "cuda backend runs cuda tensors, got cpu tensors" in str(e.value)


def test_forced_torch_backend_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(_dispatch, "cpu_kernels", lambda fam: calls.append(fam))
    x = torch.randn(5, 8, requires_grad=True)
    with fastseq.use_backend("torch"):
        y = layer_norm(x, (8,))
    y.sum().backward()
    assert calls == []
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))


def test_backward_runs_on_the_backend_that_ran_forward(monkeypatch):
    x = torch.randn(5, 8, requires_grad=True)
    with fastseq.use_backend("cpu"):
        y = layer_norm(x, (8,))
    seen = []
    real = _dispatch.cpu_kernels
    monkeypatch.setattr(_dispatch, "cpu_kernels", lambda fam: seen.append(fam) or real(fam))
    dy = torch.randn_like(y)
    with fastseq.use_backend("torch"):              # does not move the backward
        y.backward(dy)
    assert seen == ["layer_norm"]
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.layer_norm(x2, (8,)).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)


def test_explain_reports_choice_and_reasons():
    text = fastseq.explain("layer_norm", torch.randn(3, 8), (8,))
    assert "runs on backend 'cpu'" in text
    assert "cuda   cannot:" in text
    assert "ops:" in fastseq.explain()
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        fastseq.explain("nope")


def test_thread_count_follows_torch():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _dispatch.num_threads() == 1
        x = torch.randn(301, 97)
        y1 = layer_norm(x, (97,))
        torch.set_num_threads(2)
        assert _dispatch.num_threads() == 2
        y2 = layer_norm(x, (97,))
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)   # rows are independent of threading
    finally:
        torch.set_num_threads(old)
