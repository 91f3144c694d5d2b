"""Interleaved median timing: every implementation runs once per round, in turn, so drifts in
clock speed or background load hit them alike (DESIGN.md section 7).  The order rotates from
round to round: otherwise whichever runs right after another on the same inputs always finds
them in cache, which biases small, memory-bound cases (decode) by up to 2x."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: str = "cpu", warmup: int = 2,
                        reps: int = 15, max_seconds: float = 20.0) -> Dict[str, float]:
    """Median seconds per call of each fn, measured round-robin after `warmup` rounds.  Stops
    early (after at least 5 rounds) once `max_seconds` have passed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    gc.collect()
    start = time.perf_counter()
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            fn = fns[k]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() - start > max_seconds:
            break
    return {k: statistics.median(v) for k, v in times.items()}
