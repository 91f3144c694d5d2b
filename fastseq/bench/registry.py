"""The benchmark registry: each op family adds its cases; fastseq-bench and bench/*.py run them.

A Case builds its inputs lazily (setup() runs only when the case is selected) and returns a
Setup: the fastseq callable, one or more peers, and optionally the kernel alone on preallocated
buffers, plus the bytes and FLOPs one call moves / performs, for GB/s and GFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Setup:
    fastseq: Callable[[], object]
    peers: Dict[str, Callable[[], object]]          # name -> callable; the first is "the" peer
    bytes: float = 0.0                              # memory traffic of one fastseq call
    flops: float = 0.0                              # arithmetic of one fastseq call
    kernel: Optional[Callable[[], object]] = None   # fastseq's kernels alone, outputs preallocated


@dataclass
class Case:
    family: str                   # "layer_norm", "attention", ...
    name: str                     # "layer_norm fwd+bwd (8192, 1024)"
    device: str                   # "cpu" or "cuda"
    setup: Callable[[], Setup]
    quick: bool = True            # part of --quick
    meta: dict = field(default_factory=dict)


_CASES: List[Case] = []


def register(case: Case) -> Case:
    _CASES.append(case)
    return case


def cases(device: str, only: Optional[List[str]] = None, quick: bool = False) -> List[Case]:
    return [c for c in _CASES
            if c.device == device and (not only or c.family in only) and (c.quick or not quick)]


def families() -> List[str]:
    return sorted({c.family for c in _CASES})
