"""fastseq-bench: run the registered benchmark cases, print a table, write JSON/CSV/PNG.

    fastseq-bench --quick                 # CPU, every family, ~2 minutes on 2 cores
    fastseq-bench --device cuda --only layer_norm --out results/
    fastseq-bench --quick --only overhead  # per-call cost of tiny calls, µs, against torch's ops
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

import torch

from .machine import describe
from .registry import ALIASES, Skipped, cases, check_setup, families, load
from .report import table, write
from .timing import calls_for, interleaved_medians

load()                                    # every family's cases (--only's choices)


def run_case(case, reps: int, max_seconds: float, device: str, quick: bool = False) -> list:
    s = case.setup()
    check_setup(case, s)
    if quick and case.meta.get("quick_peers"):
        s.peers = {k: v for k, v in s.peers.items() if k in case.meta["quick_peers"]}
    fns = {"fastseq": s.fastseq, **{f"peer:{k}": v for k, v in s.peers.items()}}
    if s.kernel is not None:
        fns["kernel"] = s.kernel
    grad = torch.set_grad_enabled(s.grad_enabled) if s.grad_enabled is not None else contextlib.nullcontext()
    with grad:
        calls = 1
        if case.calls_per_sample > 1:     # tiny calls: a sample loops over many (about 20 / 50 ms a sample)
            calls = calls_for(fns, device, case.calls_per_sample, 0.02 if quick else 0.05)
        med = interleaved_medians(fns, device, warmup=1 if calls > 1 else 2, reps=reps, max_seconds=max_seconds,
                                  calls_per_sample=calls)
    peaks = {}
    if case.meta.get("memory"):
        from .scaling import peak_extra_bytes
        with torch.set_grad_enabled(s.grad_enabled) if s.grad_enabled is not None else contextlib.nullcontext():
            for name, fn in fns.items():
                b = peak_extra_bytes(fn)
                peaks[name] = None if b is None else b / 2 ** 20
    rows = []
    for peer in s.peers:
        row = {"family": case.family, "case": case.name, "peer": peer,
               "peer_ms": med[f"peer:{peer}"] * 1e3, "fastseq_ms": med["fastseq"] * 1e3,
               "ratio": med[f"peer:{peer}"] / med["fastseq"]}
        if case.calls_per_sample > 1:     # per-call figures in µs
            row.update(peer_us=med[f"peer:{peer}"] * 1e6, fastseq_us=med["fastseq"] * 1e6,
                       calls_per_sample=calls, grad_enabled=s.grad_enabled)
        if s.bytes:
            row["gbs"] = s.bytes / med["fastseq"] / 1e9
        if s.flops:
            row["gflops"] = s.flops / med["fastseq"] / 1e9
        if case.meta.get("tokens"):       # model-level cases: tokens one call processes
            row.update(fastseq_tokens_s=case.meta["tokens"] / med["fastseq"],
                       peer_tokens_s=case.meta["tokens"] / med[f"peer:{peer}"])
        if case.meta.get("memory"):       # peak extra resident memory of one call, each impl
            row.update(fastseq_peak_mib=peaks.get("fastseq"), peer_peak_mib=peaks.get(f"peer:{peer}"))
        if "kernel" in med:
            row["kernel_ms"] = med["kernel"] * 1e3
            row["kernel_gbs"] = s.bytes / med["kernel"] / 1e9 if s.bytes else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastseq-bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and cases (~2.5 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", action="append", choices=families() + sorted(ALIASES), metavar="FAMILY",
                   help=f"run only this family (repeatable): {', '.join(families())} "
                        f"({', '.join(f'{a} = {f}' for a, f in sorted(ALIASES.items()))})")
    p.add_argument("--case", action="append", metavar="TEXT",
                   help="run only the cases whose name contains TEXT (repeatable: any of them)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 5 quick, 21 full)")
    p.add_argument("--out", default="fastseq-bench-results", help="folder for results.json/.csv and plots")
    p.add_argument("--no-sweep", action="store_true", help="skip attention's long-context scaling sweep")
    p.add_argument("--sweep-only", action="store_true", help="run only attention's long-context scaling sweep")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 21)
    todo = [] if args.sweep_only else cases(args.device, args.only, args.quick)
    if args.case:
        todo = [c for c in todo if any(t in c.name for t in args.case)]

    t0 = time.perf_counter()
    machine = describe(args.device)
    print(f"fastseq-bench on {args.device}: {machine.get('gpu', machine['cpu'])}, torch {machine['torch']}, "
          f"{machine['threads']} threads")
    print(f"allocator: {machine['allocator']}; transparent huge pages: {machine['transparent_hugepages']}; "
          f"torch THP_MEM_ALLOC_ENABLE: {'on' if machine['torch_THP_MEM_ALLOC_ENABLE'] else 'off'}; "
          f"fastseq huge-page outputs: {'on' if machine['fastseq_hugepage_outputs'] else 'off'}")
    print(f"ceilings: sgemm {machine['sgemm_gflops']:.0f} GFLOP/s, copy {machine['copy_gbs']:.1f} GB/s "
          f"(read + write)")
    try:
        global tqdm
        from tqdm import tqdm
        it = tqdm(todo, desc="cases", unit="case", file=sys.stderr)
    except ImportError:
        it = todo
    rows, failed = [], []
    for case in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(case.name)
        try:
            rows += run_case(case, reps, 3.0 if args.quick else 20.0, args.device, args.quick)
        except Skipped as e:              # a peer package the case needs is not installed
            print(f"\ncase {case.name!r} skipped: {e}", file=sys.stderr)
        except Exception:                 # one broken case must not lose the others' results
            failed.append(case.name)
            print(f"\ncase {case.name!r} failed:\n{traceback.format_exc()}", file=sys.stderr)
    if rows:
        print(table(rows, machine))
        for path in write(rows, machine, args.out):
            print("wrote", path)
    if args.device == "cpu" and not args.no_sweep and (not args.only or "attention" in args.only):
        from . import scaling

        progress = (lambda xs: tqdm(xs, desc="attention scaling", unit="point", file=sys.stderr)) \
            if "tqdm" in globals() else None
        os.makedirs(args.out, exist_ok=True)
        sweep = scaling.run(args.quick, progress, checkpoint=os.path.join(args.out, "attention_scaling.partial.json"))
        print(scaling.table(sweep))
        for path in scaling.write(sweep, args.out):
            print("wrote", path)
    print(f"{len(todo)} cases in {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"{len(failed)} case(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
