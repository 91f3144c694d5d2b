"""Long-context scaling of attention: time and peak extra memory against sequence length.

For each implementation and mode (forward, forward+backward; causal or not; a sliding window),
T = S runs over a doubling grid; each point records the median time and the peak memory the
call adds on top of its inputs.  The log-log slope of time and memory in T (least squares over
T >= 1024) says how the cost grows: ~2 for quadratic time, ~1 for linear memory.

Peak memory is measured in process: glibc's free heap is trimmed (malloc_trim), the kernel's
resident-set high-water mark is reset (/proc/self/clear_refs), one call runs, and VmHWM minus the
resident set before the call is the extra memory.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
from typing import Callable, Dict, List, Optional

import torch

from ..functional import scaled_dot_product_attention as fast_sdpa
from .attention import attention_flops, naive_attention, torch_math, torch_sdpa
from ..attention import visible_count, visible_keys
from .timing import interleaved_medians

B, H, D = 1, 8, 64


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory one call adds above what was resident before it (None if unknown)."""
    _trim()
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # reset VmHWM to the current RSS
    except OSError:
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def _impls(window, causal, backward, T, quick):
    """name -> (callable(q, k, v), max T it is run to)."""
    mib = 1 << 20
    scores = B * H * T * T * 4                           # one fp32 T x S score matrix
    out: Dict[str, Callable] = {}
    if window is not None:
        out["fastseq"] = lambda q, k, v: fast_sdpa(q, k, v, window=window)
        keep = None
        if scores // 32 <= 2048 * mib and T <= (8192 if backward else 16384):
            keep = visible_keys(T, T, False, window)
            out["torch+mask"] = lambda q, k, v: torch_sdpa(q, k, v, mask=keep)
        return out
    out["fastseq"] = lambda q, k, v: fast_sdpa(q, k, v, is_causal=causal)
    out["torch"] = lambda q, k, v: torch_sdpa(q, k, v, is_causal=causal)
    if not quick and scores * (4 if backward else 2) <= 6 * 1024 * mib:
        out["math"] = lambda q, k, v: torch_math(q, k, v, is_causal=causal)
    if scores * (4 if backward else 2) <= (1024 if quick else 4096) * mib:
        out["naive"] = lambda q, k, v: naive_attention(q, k, v, is_causal=causal)
    return out


def _runner(fn, T, backward):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_(backward) for _ in range(3))
    if not backward:
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run
    do = torch.randn(B, H, T, D, generator=g)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def grid(quick: bool) -> List[dict]:
    """The sweep: (mode, causal, window, T values)."""
    if quick:
        ts = [256, 512, 1024, 2048]
        return [dict(backward=False, causal=c, window=None, Ts=ts) for c in (False, True)] + \
               [dict(backward=False, causal=False, window=(512, 0), Ts=[1024, 2048, 4096])]
    ts = [256, 512, 1024, 2048, 4096, 8192, 16384]
    wts = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    return [dict(backward=b, causal=c, window=None, Ts=ts) for b in (False, True) for c in (False, True)] + \
           [dict(backward=b, causal=False, window=(512, 0), Ts=wts) for b in (False, True)]


def run(quick: bool, progress=None, checkpoint: Optional[str] = None) -> List[dict]:
    """The sweep's rows; with `checkpoint`, the rows so far are rewritten there after each point."""
    rows = []
    points = [(g, T) for g in grid(quick) for T in g["Ts"]]
    it = progress(points) if progress else points
    for g, T in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"T={T}")
        mode = ("fwd+bwd" if g["backward"] else "fwd") + (" causal" if g["causal"] else "") + \
            (f" window={g['window']}" if g["window"] else "")
        impls = {name: _runner(fn, T, g["backward"]) for name, fn in
                 _impls(g["window"], g["causal"], g["backward"], T, quick).items()}
        est_reps = 3 if T >= 8192 else (5 if T >= 2048 else 9)
        times = interleaved_medians(impls, "cpu", warmup=1, reps=est_reps, max_seconds=60)
        for name, fn in impls.items():
            mem = peak_extra_bytes(fn)
            if g["window"]:
                vis = visible_count(T, T, False, g["window"]) * B * H
                flops = 4 * vis * D * (3.5 if g["backward"] else 1)
            else:
                flops = attention_flops(B, H, T, T, D, g["causal"], g["backward"])
            rows.append({"mode": mode, "impl": name, "T": T, "ms": times[name] * 1e3,
                         "gflops": flops / times[name] / 1e9, "peak_mib": None if mem is None else mem / 2 ** 20,
                         "naive_scores_mib": B * H * T * T * 4 / 2 ** 20})
        _trim()
        if checkpoint:
            with open(checkpoint, "w") as f:
                json.dump(rows, f)
    return rows


def slopes(rows: List[dict], key: str, t_min: int = 1024) -> Dict[tuple, float]:
    """Least-squares slope of log(key) against log(T) per (mode, impl), over T >= t_min."""
    out = {}
    for mode, impl in sorted({(r["mode"], r["impl"]) for r in rows}):
        pts = [(math.log(r["T"]), math.log(r[key])) for r in rows
               if r["mode"] == mode and r["impl"] == impl and r["T"] >= t_min and r.get(key)]
        if len(pts) >= 2:
            mx = sum(p[0] for p in pts) / len(pts)
            my = sum(p[1] for p in pts) / len(pts)
            sxx = sum((p[0] - mx) ** 2 for p in pts)
            out[(mode, impl)] = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")
    return out


def table(rows: List[dict]) -> str:
    ts, ms = slopes(rows, "ms"), slopes(rows, "peak_mib")
    lines = [f"{'mode':32s} {'impl':10s} {'T':>6s} {'ms':>10s} {'GFLOP/s':>8s} {'peak MiB':>9s} {'of T*S':>7s}"]
    for r in rows:
        frac = r["peak_mib"] / r["naive_scores_mib"] if r.get("peak_mib") is not None else None
        lines.append(f"{r['mode']:32s} {r['impl']:10s} {r['T']:6d} {r['ms']:10.2f} {r['gflops']:8.1f} "
                     + (f"{r['peak_mib']:9.1f} {frac:7.1%}" if frac is not None else f"{'n/a':>9s}"))
    lines.append("log-log slopes in T (T >= 1024): time / peak memory")
    for key in sorted(ts):
        lines.append(f"  {key[0]:32s} {key[1]:10s} time {ts[key]:5.2f}   memory "
                     + (f"{ms[key]:5.2f}" if key in ms else "  n/a"))
    lines.append("'of T*S': peak extra memory as a fraction of one fp32 (B, H, T, S) score matrix")
    return "\n".join(lines)


def write(rows: List[dict], out_dir: str) -> List[str]:
    """attention_scaling.json / .csv / .png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "attention_scaling.json")
    sl_t, sl_m = slopes(rows, "ms"), slopes(rows, "peak_mib")
    with open(p, "w") as f:
        json.dump({"shape": {"B": B, "H": H, "D": D}, "points": rows,
                   "slopes": [{"mode": k[0], "impl": k[1], "time": sl_t[k], "memory": sl_m.get(k)} for k in sl_t]},
                  f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, "attention_scaling.csv")
    with open(p, "w") as f:
        f.write("mode,impl,T,ms,gflops,peak_mib\n")
        for r in rows:
            f.write(f"{r['mode']},{r['impl']},{r['T']},{r['ms']:.4f},{r['gflops']:.2f},"
                    f"{'' if r['peak_mib'] is None else round(r['peak_mib'], 2)}\n")
    paths.append(p)
    fig = figure(rows)
    if fig is None:
        return paths
    import matplotlib.pyplot as plt

    p = os.path.join(out_dir, "attention_scaling.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def figure(rows: List[dict]):
    """The sweep as log-log panels, one per (forward / forward+backward) x (time / peak extra
    memory) that has data: quick mode (forward only) draws two, a run without memory figures
    one per mode.  None without matplotlib or points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sl_t, sl_m = slopes(rows, "ms"), slopes(rows, "peak_mib")
    colors = {"fastseq": "tab:blue", "torch": "tab:orange", "math": "tab:green", "naive": "tab:red",
              "torch+mask": "tab:purple"}
    panels: Dict[tuple, list] = {}                    # (mode row, column) -> [(xs, ys, label, style kw)]
    for (mode, impl) in sorted({(r["mode"], r["impl"]) for r in rows}):
        pts = [r for r in rows if r["mode"] == mode and r["impl"] == impl]
        kind = "forward + backward" if mode.startswith("fwd+bwd") else "forward"
        style = ":" if "window" in mode else ("--" if "causal" in mode else "-")
        variant = mode.split(" ", 1)[1] if " " in mode else "full"
        kw = dict(color=colors.get(impl), linestyle=style, marker="o", ms=3)
        panels.setdefault((kind, "time per call (ms)"), []).append(
            ([r["T"] for r in pts], [r["ms"] for r in pts],
             f"{impl}, {variant} (slope {sl_t.get((mode, impl), float('nan')):.2f})", kw))
        mem = [r for r in pts if r.get("peak_mib")]              # log axis: zero (or unknown) is no point
        if mem:
            panels.setdefault((kind, "peak extra memory (MiB)"), []).append(
                ([r["T"] for r in mem], [r["peak_mib"] for r in mem],
                 f"{impl}, {variant} (slope {sl_m.get((mode, impl), float('nan')):.2f})", kw))
    if not panels:
        return None
    order = [(k, c) for k in ("forward", "forward + backward")
             for c in ("time per call (ms)", "peak extra memory (MiB)") if (k, c) in panels]
    ncols = min(2, len(order))
    nrows = (len(order) + ncols - 1) // ncols
    fig = plt.figure(figsize=(7 * ncols, 5 * nrows))
    for i, (kind, label) in enumerate(order):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for xs, ys, name, kw in panels[(kind, label)]:
            ax.plot(xs, ys, label=name, **kw)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"T = S (B={B}, {H} heads, D={D}, fp32)")
        ax.set_ylabel(label)
        ax.set_title(f"{kind}: {label.split(' (')[0]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("attention: long-context scaling on the CPU (solid: full, dashed: causal, dotted: window (512, 0))")
    fig.tight_layout()
    return fig
