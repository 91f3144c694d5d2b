"""fastseq's kernels as registered torch.library ops (namespace `fastseq`), for graph capture.

Two paths reach the same kernels (DESIGN.md sections 2 and 3):

* eager: the functional op calls its binding directly (a few microseconds between the call and
  the kernel).  A registered op costs ~10 us more per call in its Python wrapper, which the
  decoding loops that call an op once per token would pay thousands of times.
* graph capture: under torch.compile (Dynamo / AOTAutograd), torch.jit.trace and torch.export
  the functional op calls the registered op instead.  Each op has a
  fake implementation (output shapes and dtypes, no data: what the tracers run) and registered
  autograd whose backward is itself a registered op, so a compiled graph keeps forward and
  backward as opaque kernel calls and `torch.library.opcheck` passes.

`captured(t)` says which path a call takes; it costs a few hundred nanoseconds.  Under the
torch.func transforms (`transformed()`) the ops run on the "torch" backend instead.
"""
from __future__ import annotations

import torch

NAMESPACE = "fastseq"

# private torch entry points (torch 2.x), used for their cost: the public torch.jit.is_tracing()
# and torch._functorch checks wrap these in Python
_is_tracing = torch._C._is_tracing
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def captured(t: torch.Tensor) -> bool:
    """True when a call on `t` is being captured into a graph (Dynamo, jit.trace, export, a
    FakeTensor or other tensor subclass): the functional op must then go through its registered
    op, which the capturing machinery understands.  (Dynamo answers the first test itself.)"""
    return _is_compiling() or type(t) not in _PLAIN or _is_tracing()


def transformed() -> bool:
    """True under a torch.func transform (grad, vjp, jacrev, vmap, ...).  torch 2.13 runs the
    registered autograd of a custom op under these only for autograd.Functions it generates with
    setup_context, which register_autograd's are not, so the ops run on the "torch" backend
    there: torch's own ops, which every transform supports."""
    return _functorch_active()


def op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def seed_tensor() -> torch.Tensor:
    """A dropout seed drawn from torch's (CPU) generator as a 0-dim int64 tensor: inside a
    captured graph the draw is a graph node (no .item(), hence no graph break), and the registered
    op reads it.  The eager path makes the same draw; a compiled graph matches it under backends
    that keep torch's RNG (aot_eager, or inductor with fallback_random), while inductor's own RNG
    draws another seed (masks differ from eager's, statistics do not)."""
    return torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)


def autocast_to(t, dtype):
    """t as autocast would pass it to a lower-precision op: floating tensors other than fp64 in
    `dtype`; anything else unchanged."""
    if t is None or not t.dtype.is_floating_point or t.dtype == torch.float64 or t.dtype == dtype:
        return t
    return t.to(dtype)


def autocast_dtype(device_type: str):
    """The autocast dtype in force for `device_type`, or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_rnn_modules_allowed = False


def allow_dynamo_rnn_modules() -> None:
    """Let Dynamo trace fastseq's recurrent modules.  It refuses any instance of torch.nn.LSTM /
    GRU / RNN unless torch._dynamo.config.allow_rnn is set, and fastseq's modules subclass those
    (isinstance and state_dict compatibility) while running plain Python over registered ops.
    Called when one is built or converted; it sets that flag for the process (which also lets
    Dynamo trace torch's own RNN modules instead of breaking the graph at them) and imports
    torch._dynamo, once (~1.5 s)."""
    global _rnn_modules_allowed
    if not _rnn_modules_allowed:
        import torch._dynamo.config
        torch._dynamo.config.allow_rnn = True
        _rnn_modules_allowed = True


def direct_apply(function: type):
    """`function.apply` without torch's Python wrapper around it (torch/autograd/function.py),
    which binds default arguments for setup_context-style Functions and unwraps tensors that
    escaped a torch.func transform before calling the C++ apply: ~3 us of a ~7 us call.
    fastseq's Functions have neither setup_context nor default arguments, and its ops leave the
    Functions for torch's own ops under the transforms (transformed()), so they call the C++
    apply directly."""
    return super(torch.autograd.Function, function).apply
