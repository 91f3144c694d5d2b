"""The benchmark suite's own plumbing (fastseq/bench, bench/): the overhead family's cases and
peers, the per-call timer, every bench/bench_<family>.py parametrized from the registry, and
plots with no empty panel.  No timings are asserted (DESIGN.md section 6)."""
import importlib.util
import math
import os
import shutil
import subprocess
import time

import pytest
import torch

from fastseq.bench import report, scaling
from fastseq.bench.pytest_view import DEVICE
from fastseq.bench.registry import FAMILY_MODULES, cases, check_setup, families, load
from fastseq.bench.timing import calls_for, interleaved_medians

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERHEAD_OPS = ["layer_norm (1, 512)", "rms_norm (1, 512)", "add_layer_norm (1, 512)", "sdpa decode",
                "LSTMCell (1, 256)", "GRUCell (1, 256)", "lstm_layer T=1 B=1 H=256", "nn.LayerNorm(512)",
                "nn.LSTM(256, 256)"]
load()


def test_every_family_module_registers_cases():
    assert families() == sorted(FAMILY_MODULES)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_overhead_family_covers_every_op(device):
    cs = cases(device, ["overhead"])
    for op in OVERHEAD_OPS:
        mine = [c for c in cs if c.name.startswith(op)]
        modes = sorted(c.meta["grad"] for c in mine)
        assert modes == ([False] if op == "sdpa decode" else [False, True]), (op, [c.name for c in mine])
    for c in cs:
        assert c.peers == ("torch",) and c.calls_per_sample > 1 and c.quick
    assert len(cs) == 2 * len(OVERHEAD_OPS) - 1


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out.reshape(-1)]
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("case", cases("cpu", ["overhead"]), ids=lambda c: c.name)
def test_overhead_peer_is_the_same_op(case):
    """fastseq's call and torch's compute the same thing on the same inputs / weights, in the
    declared grad mode (the grad rows build a graph to the parameters)."""
    s = case.setup()
    check_setup(case, s)
    with torch.set_grad_enabled(s.grad_enabled):
        got, exp = torch.cat(_flat(s.fastseq())), torch.cat(_flat(s.peers["torch"]()))
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    assert got.requires_grad == exp.requires_grad == bool(case.meta["grad"])


def test_declared_peers_match_setup():
    """The first CPU case of each family builds exactly the peers (and kernel) it declares."""
    for family in FAMILY_MODULES:
        case = cases("cpu", [family], quick=True)[0]
        check_setup(case, case.setup())


def test_calls_per_sample_loops_and_divides():
    counts = {"a": 0, "b": 0}

    def fn(k):
        def run():
            counts[k] += 1
        return run

    med = interleaved_medians({"a": fn("a"), "b": fn("b")}, warmup=1, reps=5, calls_per_sample=100)
    assert counts == {"a": 600, "b": 600}                     # (1 warm-up + 5 samples) x 100 calls each
    assert 0 < med["a"] < 1e-3 and 0 < med["b"] < 1e-3        # per call, not per sample

    sleepy = lambda: time.sleep(0.002)                        # noqa: E731
    n = calls_for({"slow": sleepy, "fast": lambda: None}, max_calls=2000, sample_seconds=0.02, probe=2)
    assert 1 <= n <= 10                                       # the slowest fn sets the loop length
    assert calls_for({"fast": lambda: None}, max_calls=2000, sample_seconds=0.02) == 2000


def _bench_test_function(family):
    path = os.path.join(ROOT, "bench", f"bench_{family}.py")
    assert os.path.exists(path), f"no pytest-benchmark view {path}"
    spec = importlib.util.spec_from_file_location(f"_bench_view_{family}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, f"test_{family}")


@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_bench_view_takes_cases_and_peers_from_registry(family):
    fn = _bench_test_function(family)
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    assert len(marks) == 1
    names, values = marks[0].args[:2]
    assert names == "case,impl"
    got = [(p.values[0].name, p.values[1]) for p in values]
    exp = [(c.name, impl) for c in cases(DEVICE, [family]) for impl in c.impls]
    assert got == exp and got
    assert {p.id for p in values} == {f"{c}-{i}" for c, i in exp}


# ------------------------------------------------------------------ plots: no empty panel

MACHINE = {"device": "cpu", "cpu": "test CPU", "threads": 2, "allocator": "glibc malloc",
           "copy_gbs": 30.0, "sgemm_gflops": 180.0}


def _rows():
    rows = []
    for peer in ("torch", "naive"):                    # bytes and a kernel-alone time
        rows.append({"family": "layer_norm", "case": "layer_norm fwd (8192, 1024)", "peer": peer, "peer_ms": 4.0,
                     "fastseq_ms": 2.0, "ratio": 2.0, "gbs": 20.0, "kernel_ms": 1.5, "kernel_gbs": 25.0})
    rows.append({"family": "layer_norm", "case": "rms_norm fwd+bwd (8192, 1024)", "peer": "torch", "peer_ms": 9.0,
                 "fastseq_ms": 3.0, "ratio": 3.0, "gbs": 22.0})
    for fam, case in (("attention", "sdpa fwd T=S=4096"), ("attention", "sdpa decode T=1"),
                      ("recurrent", "lstm infer (T,B,I,H)=(128, 32, 256, 256)"),
                      ("recurrent", "gru train (T,B,I,H)=(128, 32, 256, 256)")):     # FLOPs only
        rows.append({"family": fam, "case": case, "peer": "torch", "peer_ms": 10.0, "fastseq_ms": 8.0,
                     "ratio": 1.25, "gflops": 120.0})
    for case, fast, peer in (("layer_norm (1, 512) no_grad", 30.0, 3.5), ("LSTMCell (1, 256) grad", 60.0, 55.0),
                             ("nn.LSTM(256, 256) (1, 1, 256) no_grad", 20.0, 40.0)):
        rows.append({"family": "overhead", "case": case, "peer": "torch", "peer_ms": peer / 1e3,
                     "fastseq_ms": fast / 1e3, "ratio": peer / fast, "peer_us": peer, "fastseq_us": fast,
                     "calls_per_sample": 500, "grad_enabled": "grad" in case.split()})
    return rows


def _panel_has_data(ax):
    bars = [p for p in ax.patches if hasattr(p, "get_width") and (p.get_width() > 0 or p.get_height() > 0)
            and p.get_width() == p.get_width()]
    lines = [ln for ln in ax.lines if ln.get_transform() == ax.transData and len(ln.get_xdata()) > 0]
    return bool(bars or lines)


def _check_figure(fig, n_panels):
    axes = fig.get_axes()
    assert len(axes) == n_panels, [ax.get_xlabel() for ax in axes]
    for ax in axes:
        assert _panel_has_data(ax), f"empty panel: {ax.get_title() or ax.get_xlabel()}"


def test_report_figures_have_no_empty_panel(tmp_path):
    pytest.importorskip("matplotlib")
    figs = report.figures(_rows(), MACHINE)
    assert sorted(figs) == ["attention", "layer_norm", "overhead", "recurrent"]
    _check_figure(figs["layer_norm"], 2)               # speed-up, GB/s
    _check_figure(figs["attention"], 2)                # speed-up, GFLOP/s (no GB/s panel)
    _check_figure(figs["recurrent"], 2)
    xlabels = [ax.get_xlabel() for ax in figs["recurrent"].get_axes()]
    assert any("GFLOP/s" in x for x in xlabels) and not any("GB/s" in x for x in xlabels)
    texts = [t.get_text() for ax in figs["recurrent"].get_axes() for t in ax.texts]
    assert " 67%" in texts                             # 120 of the 180 GFLOP/s sgemm ceiling
    _check_figure(figs["overhead"], 2)                 # µs per call, ratio
    assert "µs per call" in figs["overhead"].get_axes()[0].get_xlabel()
    paths = report.save(figs, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["attention.png", "layer_norm.png", "overhead.png",
                                                          "recurrent.png"]


def _sweep(modes, memory=True):
    rows = []
    for mode in modes:
        for impl in ("fastseq", "torch"):
            for T in (256, 512, 1024, 2048):
                rows.append({"mode": mode, "impl": impl, "T": T, "ms": T * T / 1e5, "gflops": 100.0,
                             "peak_mib": T / 100 if memory else None, "naive_scores_mib": T * T * 32 / 2 ** 20})
    return rows


@pytest.mark.parametrize("modes,memory,n_panels", [
    (["fwd", "fwd causal", "fwd window=(512, 0)"], True, 2),      # quick mode: forward only
    (["fwd", "fwd causal"], False, 1),                            # no memory figures (no /proc)
    (["fwd", "fwd causal", "fwd+bwd", "fwd+bwd causal"], True, 4),
    (["fwd", "fwd+bwd"], False, 2),
])
def test_scaling_figure_has_no_empty_panel(modes, memory, n_panels):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = scaling.figure(_sweep(modes, memory))
    _check_figure(fig, n_panels)
    plt.close(fig)


def test_per_call_table_in_microseconds_with_flags():
    text = report.table(_rows(), MACHINE)
    lines = {ln.split("  ")[0]: ln for ln in text.splitlines()}
    assert "µs" in text
    assert ">2x" in next(v for k, v in lines.items() if k.startswith("layer_norm (1, 512) no_grad"))
    ln_row = next(v for k, v in lines.items() if k.startswith("LSTMCell (1, 256) grad"))
    assert ">2x" not in ln_row and ">1.2x" not in ln_row      # 60 vs 55 µs: within 1.2x
    assert report.flag({"fastseq_us": 5.0, "peer_us": 4.0}) == ">1.2x"
    assert report.flag({"fastseq_us": 4.0, "peer_us": 5.0}) == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None or torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_script_stops_at_once_without_a_gpu():
    before = set(os.listdir(os.path.join(ROOT, "bench", "results")))
    t0 = time.perf_counter()
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu", "run.sh")], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "OUT": ""})
    assert r.returncode == 2
    assert "no NVIDIA GPU" in r.stderr or "sees no CUDA device" in r.stderr
    assert time.perf_counter() - t0 < 30
    assert set(os.listdir(os.path.join(ROOT, "bench", "results"))) == before       # nothing written


def test_models_family_tiny(monkeypatch):
    """The models family at a tiny size (1 layer, E = 32, V = 64): setup() checks that torch's
    and the converted model's losses agree at dropout 0, one training step of each gives the same
    loss, and the harness's rows carry tokens/s (shown in the table)."""
    from fastseq.bench import models
    from fastseq.bench.__main__ import run_case

    real = models.build
    monkeypatch.setattr(models, "build", lambda model, B, T, p, layers=6, *a, device="cpu", **k:
                        real(model, 2, 16, p, 1, 32, 4, 64, device=device))
    quick = [c for c in cases("cpu", ["models"], quick=True) if not c.meta.get("twin") and c.meta["dropout"] == 0.0]
    assert sorted(c.meta["model"] for c in quick) == ["bert", "gpt"]
    for case in quick:
        s = case.setup()
        check_setup(case, s)
        with torch.enable_grad():
            fast, peer = s.fastseq().item(), s.peers["torch"]().item()
        assert abs(fast - peer) <= 1e-4 * abs(peer), (case.name, fast, peer)
    rows = run_case(quick[0], reps=1, max_seconds=1.0, device="cpu", quick=True)
    assert rows[0]["fastseq_tokens_s"] > 0 and rows[0]["peer_tokens_s"] > 0
    assert "tokens/s" in report.table(rows, MACHINE)


def test_models_twin_cases_quick():
    """Every model of fastseq.models has a quick twin case; setup() checks that the model and its
    torch.nn twin give the same loss (eval mode) and one training step of each runs; the rows
    carry tokens/s and peak memory."""
    from fastseq.bench.__main__ import run_case

    twins = [c for c in cases("cpu", ["models"], quick=True) if c.meta.get("twin")]
    assert {c.meta["model"] for c in twins} == {"gpt", "bert", "seq2seq transformer", "seq2seq lstm", "elmo",
                                                "rnnlm lstm", "rnnlm gru"}
    for case in twins:
        s = case.setup()
        check_setup(case, s)
        with torch.enable_grad():
            fast, peer = s.fastseq().item(), s.peers["torch"]().item()
        assert math.isfinite(fast) and math.isfinite(peer) and abs(fast - peer) < 0.5 * abs(peer), case.name
    rows = run_case(twins[0], reps=1, max_seconds=1.0, device="cpu", quick=True)
    assert rows[0]["fastseq_tokens_s"] > 0 and rows[0]["fastseq_peak_mib"] is not None
