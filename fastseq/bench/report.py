"""Results of a benchmark run as a table, JSON, CSV and PNG plots."""
from __future__ import annotations

import csv
import json
import os
from typing import List


def table(rows: List[dict], machine: dict) -> str:
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
            + (f"{kern:9.3f} {krate:9.1f} {krate / copy:7.0%}" if kern else ""))
        if r.get("gflops"):
            out[-1] += f"  {r['gflops']:.1f} GFLOP/s ({r['gflops'] / sgemm:.0%} of sgemm)"
    out.append("ratio = peer time / fastseq time (>1: fastseq faster); medians of interleaved runs; "
               "GB/s = bytes moved by one fastseq call / its time; kernel = fastseq kernels alone on "
               "preallocated outputs (no allocation or page faults)")
    return "\n".join(out)


def write(rows: List[dict], machine: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, "results.csv")
    keys = ["family", "case", "peer", "peer_ms", "fastseq_ms", "ratio", "gbs", "kernel_ms", "kernel_gbs", "gflops"]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths.append(p)
    png = plot(rows, machine, out_dir)
    if png:
        paths.append(png)
    return paths


def plot(rows: List[dict], machine: dict, out_dir: str):
    """One PNG per family: ratio to each peer, and achieved GB/s against the copy ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'fastseq-kernels[bench]')")
        return None
    written = None
    for family in sorted({r["family"] for r in rows}):
        fam = [r for r in rows if r["family"] == family]
        cases = list(dict.fromkeys(r["case"] for r in fam))
        peers = list(dict.fromkeys(r["peer"] for r in fam))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(cases) + 2.5))
        h = 0.8 / len(peers)
        for i, peer in enumerate(peers):
            vals = [next((r["ratio"] for r in fam if r["case"] == c and r["peer"] == peer), 0) for c in cases]
            ax1.barh([k + i * h for k in range(len(cases))], vals, height=h, label=f"vs {peer}")
        ax1.axvline(1.0, color="k", lw=1)
        ax1.set_xscale("log")
        ax1.set_yticks([k + 0.4 - h / 2 for k in range(len(cases))])
        ax1.set_yticklabels(cases, fontsize=8)
        ax1.invert_yaxis()
        ax1.set_xlabel("speed-up (peer time / fastseq time)")
        ax1.legend(fontsize=8)
        first = {c: next(r for r in fam if r["case"] == c) for c in cases}
        gbs = [first[c].get("gbs") or 0 for c in cases]
        kgbs = [first[c].get("kernel_gbs") or 0 for c in cases]
        ax2.barh([k for k in range(len(cases))], gbs, height=0.4, label="fastseq end to end")
        ax2.barh([k + 0.4 for k in range(len(cases))], kgbs, height=0.4, label="kernel alone")
        ax2.axvline(machine["copy_gbs"], color="r", lw=1, label=f"copy {machine['copy_gbs']:.0f} GB/s")
        ax2.set_yticks([k + 0.2 for k in range(len(cases))])
        ax2.set_yticklabels([])
        ax2.invert_yaxis()
        ax2.set_xlabel("GB/s")
        ax2.legend(fontsize=8)
        fig.suptitle(f"fastseq {family} on {machine['device']} ({machine.get('gpu', machine['cpu'])}, "
                     f"{machine['threads']} threads, {machine['allocator']})", fontsize=10)
        fig.tight_layout()
        written = os.path.join(out_dir, f"{family}.png")
        fig.savefig(written, dpi=110)
        plt.close(fig)
    return written
