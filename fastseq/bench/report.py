"""Results of a benchmark run as a table, JSON, CSV and PNG plots.

Rows of per-call cases (the `overhead` family: rows with "fastseq_us") are shown in µs per
call, with the ratio torch / fastseq and flags where fastseq's call costs more than 1.2x / 2x
torch's; the other rows in ms, with GB/s or GFLOP/s and the fraction of the machine's ceiling, and
tokens/s of both where the case counts tokens (model-level cases: "fastseq_tokens_s").
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List

# per-call rows: fastseq time / peer time above these is flagged (issue #8: within 2x, target 1.2x)
FLAG_LIMITS = (2.0, 1.2)


def is_per_call(row: dict) -> bool:
    return row.get("fastseq_us") is not None


def flag(row: dict) -> str:
    """'>2x' / '>1.2x' where fastseq's call takes that much longer than the peer's, else ''."""
    slower = row["fastseq_us"] / row["peer_us"] if row.get("peer_us") else 0.0
    for limit in FLAG_LIMITS:
        if slower > limit:
            return f">{limit:g}x"
    return ""


def table(rows: List[dict], machine: dict) -> str:
    parts = []
    timed = [r for r in rows if not is_per_call(r)]
    per_call = [r for r in rows if is_per_call(r)]
    if timed:
        parts.append(_timed_table(timed, machine))
    if per_call:
        parts.append(per_call_table(per_call))
    return "\n\n".join(parts)


def _timed_table(rows: List[dict], machine: dict) -> str:
    copy, sgemm = machine["copy_gbs"], machine["sgemm_gflops"]
    head = (f"{'case':44s} {'peer':10s} {'peer ms':>9s} {'fastseq ms':>10s} {'ratio':>6s} "
            f"{'GB/s':>6s} {'of copy':>7s} {'kernel ms':>9s} {'kern GB/s':>9s} {'of copy':>7s}")
    out = [head, "-" * len(head)]
    for r in rows:
        kern = r.get("kernel_ms")
        rate = r.get("gbs")
        krate = r.get("kernel_gbs")
        out.append(
            f"{r['case']:44s} {r['peer']:10s} {r['peer_ms']:9.3f} {r['fastseq_ms']:10.3f} {r['ratio']:6.2f} "
            + (f"{rate:6.1f} {rate / copy:7.0%} " if rate else f"{'':6s} {'':7s} ")
            + (f"{kern:9.3f} " + (f"{krate:9.1f} {krate / copy:7.0%}" if krate else "") if kern else ""))
        if r.get("gflops"):
            out[-1] += f"  {r['gflops']:.1f} GFLOP/s ({r['gflops'] / sgemm:.0%} of sgemm)"
        if r.get("fastseq_peak_mib") is not None and r.get("peer_peak_mib") is not None:
            out[-1] += f"  peak extra MiB: fastseq {r['fastseq_peak_mib']:.0f}, {r['peer']} {r['peer_peak_mib']:.0f}"
        if r.get("fastseq_tokens_s"):
            out[-1] += f"  tokens/s: fastseq {r['fastseq_tokens_s']:.0f}, {r['peer']} {r['peer_tokens_s']:.0f}"
    out.append("ratio = peer time / fastseq time (>1: fastseq faster); medians of interleaved runs; "
               "GB/s = bytes moved by one fastseq call / its time; kernel = fastseq kernels alone on "
               "preallocated outputs (no allocation or page faults)")
    return "\n".join(out)


def per_call_table(rows: List[dict]) -> str:
    """µs per call for fastseq and the peer, the ratio peer / fastseq and the flags."""
    head = (f"{'case (per call)':44s} {'peer':8s} {'peer µs':>9s} {'fastseq µs':>10s} {'ratio':>6s} "
            f"{'flag':>6s} {'calls':>6s}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['case']:44s} {r['peer']:8s} {r['peer_us']:9.2f} {r['fastseq_us']:10.2f} {r['ratio']:6.2f} "
                   f"{flag(r):>6s} {r.get('calls_per_sample', ''):>6}")
    n2 = sum(flag(r) == ">2x" for r in rows)
    n12 = sum(flag(r) == ">1.2x" for r in rows)
    out.append(f"µs per call: median over samples of back-to-back loops of 'calls' calls, interleaved with the "
               f"peer; ratio = peer / fastseq (<1: fastseq's call costs more); flag: fastseq over 2x ({n2} rows) "
               f"or over 1.2x ({n12} rows) of the peer's time")
    return "\n".join(out)


def write(rows: List[dict], machine: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, "results.csv")
    keys = ["family", "case", "peer", "peer_ms", "fastseq_ms", "ratio", "gbs", "kernel_ms", "kernel_gbs", "gflops",
            "peer_us", "fastseq_us", "calls_per_sample", "grad_enabled", "fastseq_tokens_s", "peer_tokens_s", "fastseq_peak_mib",
            "peer_peak_mib"]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths.append(p)
    paths += plot(rows, machine, out_dir)
    return paths


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'fastseq-kernels[bench]')")
        return None
    return plt


def plot(rows: List[dict], machine: dict, out_dir: str) -> List[str]:
    """One PNG per family (see figures); returns the paths written."""
    return save(figures(rows, machine), out_dir)


def save(figs: Dict[str, object], out_dir: str) -> List[str]:
    """<family>.png in out_dir for each figure, closing it; returns the paths."""
    plt = _pyplot()
    if plt is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for family, fig in figs.items():
        path = os.path.join(out_dir, f"{family}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def figures(rows: List[dict], machine: dict) -> Dict[str, object]:
    """family -> matplotlib Figure, one panel per kind of data the family's rows carry, so no
    panel is empty: the speed-up against each peer (always); achieved GB/s against the copy
    ceiling (rows with bytes); GFLOP/s against the sgemm ceiling, with the fraction (rows with
    FLOPs).  Per-call families: µs per call, fastseq beside the peer, and the ratio."""
    plt = _pyplot()
    if plt is None:
        return {}
    out = {}
    for family in sorted({r["family"] for r in rows}):
        fam = [r for r in rows if r["family"] == family]
        per_call = [r for r in fam if is_per_call(r)]
        out[family] = _per_call_figure(plt, per_call) if per_call else _rates_figure(plt, fam, machine)
        out[family].suptitle(f"fastseq {family} on {machine['device']} ({machine.get('gpu', machine['cpu'])}, "
                             f"{machine['threads']} threads, {machine['allocator']})", fontsize=10)
        out[family].tight_layout()
    return out


def _log_axis(ax, values, marks=()):
    """Log-scaled x with plain labelled ticks (1-2-5 steps) spanning values and marks; bars on a
    log axis start at the left edge, so the limits are set rather than left to autoscale."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    vals = [v for v in list(values) + list(marks) if v and v > 0]
    lo, hi = min(vals) / 1.6, max(vals) * 1.6
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    # 1-2-5 steps; decades alone over a wide range, finer steps over a narrow one
    steps = (1,) if hi / lo > 1e3 else (1, 2, 5) if hi / lo > 4 else (1, 1.2, 1.5, 2, 3, 5, 7)
    ticks = [m * 10.0 ** e for e in range(-4, 7) for m in steps if lo <= m * 10.0 ** e <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _case_axis(ax, cases, labels=True):
    """Case k's bars fill [k, k + 0.8], top to bottom; the same rows in every panel."""
    ax.set_yticks([k + 0.4 for k in range(len(cases))])
    ax.set_yticklabels(cases if labels else [], fontsize=8)
    ax.set_ylim(len(cases), -0.2)


def _rates_figure(plt, fam: List[dict], machine: dict):
    cases = list(dict.fromkeys(r["case"] for r in fam))
    peers = list(dict.fromkeys(r["peer"] for r in fam))
    first = {c: next(r for r in fam if r["case"] == c) for c in cases}
    panels = ["ratio"]
    if any(r.get("gbs") or r.get("kernel_gbs") for r in fam):
        panels.append("gbs")
    if any(r.get("gflops") for r in fam):
        panels.append("gflops")
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.45 * len(cases) + 2.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labels = panel == "ratio"
        if panel == "ratio":
            # each case's own peers side by side (no gaps for peers it lacks), one color per peer
            of_case = {c: [r for r in fam if r["case"] == c] for c in cases}
            h = 0.8 / max(len(v) for v in of_case.values())
            color = {p: f"C{i % 10}" for i, p in enumerate(peers)}
            for k, c in enumerate(cases):
                n = len(of_case[c])
                for j, r in enumerate(of_case[c]):
                    ax.barh(k + 0.4 - h * n / 2 + h * (j + 0.5), r["ratio"], height=h, color=color[r["peer"]])
            for p in peers:
                ax.barh([0], [0], height=0, color=color[p], label=f"vs {p}")        # legend entries
            ax.axvline(1.0, color="k", lw=1)
            _log_axis(ax, [r["ratio"] for r in fam], (1.0,))
            _case_axis(ax, cases)
            ax.set_xlabel("speed-up (peer time / fastseq time)")
        elif panel == "gbs":
            gbs = [first[c].get("gbs") or 0 for c in cases]
            kgbs = [first[c].get("kernel_gbs") or 0 for c in cases]
            shift = 0.2 if any(kgbs) else 0.4
            ax.barh([k + shift for k in range(len(cases))], gbs, height=0.4, label="fastseq end to end")
            if any(kgbs):
                ax.barh([k + 0.6 for k in range(len(cases))], kgbs, height=0.4, label="kernel alone")
            ax.axvline(machine["copy_gbs"], color="r", lw=1, label=f"copy {machine['copy_gbs']:.0f} GB/s")
            _case_axis(ax, cases, labels)
            ax.set_xlabel("GB/s (bytes moved by one call / its time)")
        else:
            sgemm = machine["sgemm_gflops"]
            gf = [first[c].get("gflops") or 0 for c in cases]
            ax.barh([k + 0.4 for k in range(len(cases))], gf, height=0.6, label="fastseq")
            for k, v in enumerate(gf):
                if v:
                    ax.text(v, k + 0.4, f" {v / sgemm:.0%}", va="center", fontsize=7)
            ax.axvline(sgemm, color="r", lw=1, label=f"sgemm {sgemm:.0f} GFLOP/s")
            ax.set_xlim(0, max(max(gf), sgemm) * 1.12)
            _case_axis(ax, cases, labels)
            ax.set_xlabel("GFLOP/s (label: fraction of the sgemm ceiling)")
        ax.legend(fontsize=8)
    return fig


def _per_call_figure(plt, rows: List[dict]):
    """µs per call (log scale: calls span µs to ms), fastseq beside the peer; the ratio with
    the 1.2x and 2x marks."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    first = {c: next(r for r in rows if r["case"] == c) for c in cases}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.4 * len(cases) + 2.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    fast = [first[c]["fastseq_us"] for c in cases]
    peer = [first[c]["peer_us"] for c in cases]
    peer_name = first[cases[0]]["peer"]
    ax1.barh([k + 0.2 for k in range(len(cases))], fast, height=0.4, label="fastseq")
    ax1.barh([k + 0.6 for k in range(len(cases))], peer, height=0.4, label=peer_name)
    _log_axis(ax1, fast + peer)
    _case_axis(ax1, cases)
    ax1.set_xlabel("µs per call")
    ax1.legend(fontsize=8)
    ratios = [first[c]["ratio"] for c in cases]
    colors = ["tab:red" if flag(first[c]) == ">2x" else "tab:orange" if flag(first[c]) else "tab:green"
              for c in cases]
    ax2.barh([k + 0.4 for k in range(len(cases))], ratios, height=0.6, color=colors)
    for k, v in enumerate(ratios):
        ax2.text(v, k + 0.4, f" {v:.2f}", va="center", fontsize=7)
    ax2.axvline(1.0, color="k", lw=1)
    for limit, style in zip(FLAG_LIMITS, (":", "--")):
        ax2.axvline(1 / limit, color="k", lw=1, linestyle=style)
    _log_axis(ax2, ratios, (1 / FLAG_LIMITS[0], 1.0))
    _case_axis(ax2, cases, labels=False)
    ax2.set_xlabel(f"{peer_name} time / fastseq time (<1: fastseq's call costs more)\n"
                   f"dotted / dashed: fastseq at {FLAG_LIMITS[0]:g}x / {FLAG_LIMITS[1]:g}x {peer_name}'s time; "
                   f"red, orange: over them", fontsize=9)
    return fig
