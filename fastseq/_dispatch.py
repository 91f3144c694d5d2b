"""Backend registry and selection (DESIGN.md section 4).

Every op family registers, per backend, a function that answers `not_supported_reasons(facts)`:
a list of human-readable reasons why that backend cannot run these inputs (empty = it can).
`facts` is a small dict the family derives from the call's arguments (device, dtype, sizes,
features).  The first backend of the device's priority list with no reasons wins; a backend
forced with `use_backend` that cannot run raises NotImplementedError listing every reason.

Numba is never imported here: the "cuda" backend only checks that torch sees a GPU and that
numba-cuda is installed (importlib.util.find_spec), so `import fastseq` stays fast.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("cpu", "cuda", "torch")
CPU_FAMILIES = ("layer_norm", "attention", "recurrent", "dropout", "cross_entropy", "decode")     # compiled modules the "cpu" backend needs
PRIORITY = {"cuda": ("cuda", "torch"), "cpu": ("cpu", "torch")}

Reasons = Callable[[dict], List[str]]


class ShapeError(ValueError, RuntimeError):
    """Bad input where torch's own op raises RuntimeError: fastseq's errors are ValueErrors
    (DESIGN.md section 5) and code written against torch catches RuntimeError, so both work."""


def num_threads() -> int:
    """The thread count every CPU kernel uses: torch's, so torch.set_num_threads applies."""
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------- availability

_cpu_import_error: Optional[str] = None
_cpu_modules: Dict[str, object] = {}


def cpu_kernels(family: str):
    """The compiled module fastseq._cpu.<family> (raises ImportError naming the cause)."""
    mod = _cpu_modules.get(family)
    if mod is None:
        mod = importlib.import_module(f"fastseq._cpu.{family}")
        _cpu_modules[family] = mod
    return mod


def cuda_kernels(family: str):
    """fastseq._cuda.<family>; imports numba on first use only."""
    return importlib.import_module(f"fastseq._cuda.{family}")


def _cpu_missing() -> Optional[str]:
    global _cpu_import_error
    if _cpu_import_error is None:
        try:
            for family in CPU_FAMILIES:
                importlib.import_module(f"fastseq._cpu.{family}")
            _cpu_import_error = ""
        except ImportError as e:  # not built (a source checkout on sys.path without `pip install .`)
            _cpu_import_error = f"compiled CPU kernels not importable ({e}); run `pip install .`"
    return _cpu_import_error or None


def _cuda_missing() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if importlib.util.find_spec("numba") is None or importlib.util.find_spec("numba.cuda") is None:
        return "numba-cuda is not installed (pip install 'fastseq-kernels[cuda]')"
    return None


def backend_missing(name: str) -> Optional[str]:
    """Why backend `name` cannot run on this machine at all, or None."""
    if name == "cpu":
        return _cpu_missing()
    if name == "cuda":
        return _cuda_missing()
    return None


def available_backends() -> List[str]:
    """Backends usable on this machine, in priority order: e.g. ['cpu', 'torch']."""
    return [b for b in BACKENDS if backend_missing(b) is None]


# --------------------------------------------------------------------------- registry

@dataclass
class OpEntry:
    facts: Callable[..., dict]                       # (*args, **kwargs) of the functional op -> facts
    reasons: Dict[str, Reasons] = field(default_factory=dict)


_REGISTRY: Dict[str, OpEntry] = {}


def register_op(op: str, facts: Callable[..., dict], **reasons: Reasons) -> None:
    """Declare op `op`: how to derive facts from its arguments, and each backend's reasons."""
    unknown = set(reasons) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register_op({op!r}): unknown backends {sorted(unknown)}")
    _REGISTRY[op] = OpEntry(facts, dict(reasons))


def registered_ops() -> List[str]:
    return sorted(_REGISTRY)


def reasons_for(op: str, backend: str, facts: dict) -> List[str]:
    """Every reason backend `backend` cannot run op `op` on inputs described by `facts`."""
    entry = _REGISTRY[op]
    out: List[str] = []
    device = facts.get("device", "cpu")
    if backend != "torch" and backend != device:
        out.append(f"{backend} backend runs {backend} tensors, got {device} tensors")
    missing = backend_missing(backend)
    if missing:
        out.append(missing)
    fn = entry.reasons.get(backend)
    if fn is None:
        out.append(f"{backend} backend does not implement {op}")
    elif not out:
        out.extend(fn(facts))
    return out


_state = threading.local()


def _forced_stack() -> list:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def forced_backend() -> Optional[str]:
    stack = _forced_stack()
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend `name` ("cpu", "cuda" or "torch") for fastseq ops in this block.

    Nests (the innermost wins) and is restored on exit, exceptions included.  An op the forced
    backend cannot run raises NotImplementedError listing the reasons.  Per thread.
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    stack = _forced_stack()
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def choose(op: str, facts: dict) -> str:
    """The backend that runs op `op` on inputs described by `facts`."""
    forced = forced_backend()
    if forced is not None:
        why = reasons_for(op, forced, facts)
        if why:
            raise NotImplementedError(
                f"{op}: backend {forced!r} (forced by use_backend) cannot run these inputs: " + "; ".join(why))
        return forced
    device = facts.get("device", "cpu")
    for backend in PRIORITY.get(device, ("torch",)):
        if not reasons_for(op, backend, facts):
            return backend
    return "torch"


_CHOICES: Dict[tuple, str] = {}


def choose_cached(op: str, key: tuple, facts: Callable[..., dict], *args) -> str:
    """choose(op, facts(*args)) remembered by `key`, a tuple of everything the op's reasons read
    (device, dtype, flags): the per-call cost is one dict lookup.  The forced backend is part of
    the key; a forced backend that cannot run raises every time (never cached)."""
    stack = getattr(_state, "stack", None)
    k = (op, key, stack[-1] if stack else None)
    backend = _CHOICES.get(k)
    if backend is None:
        backend = _CHOICES[k] = choose(op, facts(*args))
    return backend


def select(op: str, *args, **kwargs) -> str:
    """choose() from the functional op's own arguments."""
    return choose(op, _REGISTRY[op].facts(*args, **kwargs))


def explain(op: Optional[str] = None, *args, **kwargs) -> str:
    """Why each backend was or was not chosen for `op` on these arguments.

    `fastseq.explain("layer_norm", x, (768,))` reports the backend that would run and every
    other backend's reasons.  With no arguments: the machine's backends and the registered ops.
    """
    if op is None:
        lines = ["fastseq backends on this machine:"]
        for b in BACKENDS:
            missing = backend_missing(b)
            lines.append(f"  {b:6s} " + ("available" if missing is None else f"unavailable: {missing}"))
        lines.append("ops: " + ", ".join(registered_ops()))
        return "\n".join(lines)
    if op not in _REGISTRY:
        raise ValueError(f"explain: unknown op {op!r}; registered ops: {', '.join(registered_ops())}")
    try:                    # the facts functions run the op's own boundary checks first
        facts = _REGISTRY[op].facts(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        kind = "ValueError" if isinstance(e, ValueError) else type(e).__name__
        return f"{op}: this call raises {kind} before any backend runs: {e}"
    shown = ", ".join(f"{k}={v}" for k, v in facts.items())
    try:
        chosen = choose(op, facts)
    except NotImplementedError as e:
        chosen = None
        lines = [f"{op}({shown}) raises NotImplementedError: {e}"]
    else:
        lines = [f"{op}({shown}) runs on backend {chosen!r}"]
        if forced_backend():
            lines[0] += " (forced by use_backend)"
    order = PRIORITY.get(facts.get("device", "cpu"), ()) + tuple(b for b in BACKENDS if b not in
                                                                   PRIORITY.get(facts.get("device", "cpu"), ()))
    for b in order:
        why = reasons_for(op, b, facts)
        lines.append(f"  {b:6s} " + ("can run" if not why else "cannot: " + "; ".join(why)))
    return "\n".join(lines)
