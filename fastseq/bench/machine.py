"""What the machine can do and what the process runs on: the ceilings every benchmark is
measured against (sgemm GFLOP/s, streaming copy GB/s) and the memory allocator in use."""
from __future__ import annotations

import os
import platform
import re

import torch

from .timing import interleaved_medians


def sgemm_gflops(device: str = "cpu", n: int = 2048) -> float:
    """fp32 matrix-multiply rate of torch (MKL / cuBLAS) at n x n x n, current thread count."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    t = interleaved_medians({"mm": lambda: torch.mm(a, b, out=c)}, device, warmup=2, reps=7)["mm"]
    return 2 * n ** 3 / t / 1e9


def copy_gbs(device: str = "cpu", mib: int = 256) -> float:
    """Streaming copy rate, counting bytes read plus bytes written, into a preallocated buffer."""
    src = torch.randn(mib * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, warmup=2, reps=9)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


def allocator() -> str:
    """The malloc the process runs on, read from its mapped libraries."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown (no /proc/self/maps)"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name + " (preloaded)" if name in os.environ.get("LD_PRELOAD", "") else name
    return "glibc malloc"


def transparent_hugepages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(device: str) -> dict:
    from .. import _alloc

    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "allocator": allocator(),
        "transparent_hugepages": transparent_hugepages(),
        "fastseq_hugepage_outputs": _alloc.ENABLED,
        "torch_THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "") not in ("", "0"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["sgemm_gflops"] = sgemm_gflops(device)
    info["copy_gbs"] = copy_gbs(device)
    return info
