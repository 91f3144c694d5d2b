"""Interleaved median timing: every implementation runs once per round, in turn, so drifts in
clock speed or background load hit them alike (DESIGN.md section 7).  The order rotates from
round to round: otherwise whichever runs right after another on the same inputs always finds
them in cache, which biases small, memory-bound cases (decode) by up to 2x.

Calls of a few microseconds (the `overhead` family) are below what one timed call can resolve
against the timer's own cost and the noise of a shared machine, so a sample there is a loop of
`calls_per_sample` calls, timed as a whole and divided by the count; `calls_for` picks that
count so that a sample lasts about a given time."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _loop(fn: Callable[[], object], n: int):
    for _ in range(n):
        fn()


def calls_for(fns: Dict[str, Callable[[], object]], device: str = "cpu", max_calls: int = 2000,
              sample_seconds: float = 0.02, probe: int = 10) -> int:
    """How many calls one sample should loop over: about `sample_seconds` for the slowest fn,
    at most `max_calls`, at least 1.  Each fn runs once (warm-up: first-call compilation,
    caches) and then `probe` times, timed."""
    slowest = 0.0
    for fn in fns.values():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        _loop(fn, probe)
        _sync(device)
        slowest = max(slowest, (time.perf_counter() - t0) / probe)
    if slowest <= 0:
        return max_calls
    return max(1, min(max_calls, int(sample_seconds / slowest)))


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: str = "cpu", warmup: int = 2,
                        reps: int = 15, max_seconds: float = 20.0, calls_per_sample: int = 1) -> Dict[str, float]:
    """Median seconds per call of each fn, measured round-robin after `warmup` rounds.  Stops
    early (after at least 5 rounds) once `max_seconds` have passed.  With `calls_per_sample`
    > 1 each sample times that many back-to-back calls (one device sync at the end) and counts
    their mean: the per-call cost of a tight loop, as a decoder pays it."""
    n = max(1, int(calls_per_sample))
    for _ in range(warmup):
        for fn in fns.values():
            _loop(fn, n)
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
            if n == 1:
                fn()
            else:
                _loop(fn, n)
            _sync(device)
            times[k].append((time.perf_counter() - t0) / n)
        if i >= 4 and time.perf_counter() - start > max_seconds:
            break
    return {k: statistics.median(v) for k, v in times.items()}
