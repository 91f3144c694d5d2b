"""The benchmark registry: each op family adds its cases; fastseq-bench and bench/*.py run them.

A Case builds its inputs lazily (setup() runs only when the case is selected) and returns a
Setup: the fastseq callable, one or more peers, and optionally the kernel alone on preallocated
buffers, plus the bytes and FLOPs one call moves / performs, for GB/s and GFLOP/s.  The case
declares its peers' names (and whether it has a kernel-alone callable) when it is registered,
so listings (the pytest-benchmark views, --help) need not build any inputs; the harness checks
that setup() returns exactly those.

Optional peers (CTranslate2, Hugging Face transformers) may be missing: setup() then leaves the
peer out of Setup.peers and names it in Setup.skipped with the reason (a Skipped message,
"skipped: ctranslate2 is not installed ..."); check_setup accepts that and prints the reason.  A
case that cannot run at all raises Skipped from setup().  ALIASES: other names of a family
(`cases` and `load` accept them).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# The case files, one per family; importing one registers its cases.
FAMILY_MODULES = ("layer_norm", "attention", "recurrent", "dropout", "cross_entropy", "overhead", "decode",
                  "models", "word2vec")
ALIASES = {"generation": "decode"}     # issue #12 names the generation benchmarks "generation"


class Skipped(RuntimeError):
    """A case, or one of its peers, cannot run here (an optional package is missing); the
    message says why and starts with "skipped: "."""


@dataclass
class Setup:
    fastseq: Callable[[], object]
    peers: Dict[str, Callable[[], object]]          # name -> callable; the first is "the" peer
    bytes: float = 0.0                              # memory traffic of one fastseq call
    flops: float = 0.0                              # arithmetic of one fastseq call
    kernel: Optional[Callable[[], object]] = None   # fastseq's kernels alone, outputs preallocated
    grad_enabled: Optional[bool] = None             # grad mode every call runs in (None: the caller's)
    skipped: Dict[str, str] = field(default_factory=dict)   # declared peers that cannot run here -> why


@dataclass
class Case:
    family: str                   # "layer_norm", "attention", ...
    name: str                     # "layer_norm fwd+bwd (8192, 1024)"
    device: str                   # "cpu" or "cuda"
    setup: Callable[[], Setup]
    peers: Tuple[str, ...] = ()   # the names setup() returns in Setup.peers, in order
    kernel: bool = False          # setup() returns a kernel-alone callable
    quick: bool = True            # part of --quick
    calls_per_sample: int = 1     # > 1: a sample loops over up to this many calls (per-call timings in µs)
    meta: dict = field(default_factory=dict)  # "tokens": tokens one call processes (rows get tokens/s)

    @property
    def impls(self) -> Tuple[str, ...]:
        """Every implementation the case times: fastseq, its peers, the kernel alone."""
        return ("fastseq",) + tuple(self.peers) + (("kernel",) if self.kernel else ())


_CASES: List[Case] = []


def register(case: Case) -> Case:
    if not case.peers:
        raise ValueError(f"benchmark case {case.name!r}: declare its peers' names (Case.peers)")
    _CASES.append(case)
    return case


def load(families: Optional[List[str]] = None) -> None:
    """Import the case files of these families (default: all), registering their cases."""
    for f in families or FAMILY_MODULES:
        f = ALIASES.get(f, f)
        if f not in FAMILY_MODULES:
            raise ValueError(f"no benchmark family {f!r}; families: {', '.join(FAMILY_MODULES)}")
        importlib.import_module(f"{__package__}.{f}")


def cases(device: str, only: Optional[List[str]] = None, quick: bool = False) -> List[Case]:
    only = [ALIASES.get(f, f) for f in only] if only else only
    return [c for c in _CASES
            if c.device == device and (not only or c.family in only) and (c.quick or not quick)]


def families() -> List[str]:
    return sorted({c.family for c in _CASES})


def check_setup(case: Case, s: Setup) -> None:
    """setup() returned what the case declared (its peers' names, less the ones it skipped, a
    kernel or none); prints why each skipped peer was skipped."""
    present = tuple(p for p in case.peers if p not in s.skipped)
    if tuple(s.peers) != present or not set(s.skipped) <= set(case.peers) or (s.kernel is not None) != case.kernel:
        raise RuntimeError(f"benchmark case {case.name!r} declares peers {list(case.peers)}, kernel={case.kernel}; "
                           f"its setup returned peers {list(s.peers)}, skipped {list(s.skipped)}, "
                           f"kernel={s.kernel is not None}")
    for peer, why in s.skipped.items():
        print(f"case {case.name!r}, peer {peer!r}: {why}", file=sys.stderr)
