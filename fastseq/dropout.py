"""Dropout family: counter-based dropout, dropout + residual add, and the fused bias + activation
+ dropout of a feed-forward block.

Read top to bottom: the mask and the pure-torch references (the test oracle), input checks,
dispatch, the kernel calls, the autograd Functions, the registered ops (graph capture), the
functional ops, the module.  The residual-add + norm with dropout on the branch
(dropout_add_layer_norm) lives in the layer_norm package (fastseq/layer_norm/): it extends that family's kernels.

The mask.  Element k of a tensor (its flat row-major index) is kept when a keyed hash of k is at
least p 2^32 (kernels/cpu/_fastmath.h's fs_rand32: two rounds of a 32-bit avalanche mix), and
kept elements are scaled by 1 / (1 - p).  The key (seed) is drawn from torch's generator once per
call, so torch.manual_seed reproduces a run; backward regenerates the mask from (seed, k), so it
is never stored.  The masks are not torch's (its draws are Philox/mt19937 streams), the
statistics are: each element kept independently with probability 1 - p to within 2^-32.

Why one family for plain dropout and bias + activation + dropout: both are one pass over a
row-major tensor that draws the same mask; the activation kernel is the dropout kernel with a
bias and a pointwise function in front, so the mask code and the threading are written once.
"""

import math
import numbers
from typing import List, Optional, Tuple

import torch

from . import _alloc, _dispatch, _library

# ============================================================================ mask and references

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for int64 tensors x < 2^32 without overflowing int64."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """An element is kept when its 32-bit draw is >= this (p 2^32, capped at 2^32 - 1)."""
    return min(int(p * 4294967296.0), _M32)


def dropout_keep(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The kernels' dropout mask, in torch: a bool tensor of `shape` whose element with flat
    row-major index k is True (kept) when fs_rand32(k, seed) >= p 2^32.  Attention's kernels
    index (B, H, T, S) the same way."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    lo, hi = index & _M32, (index >> 32) & _M32
    r = _mix32(_mix32(lo ^ (seed & _M32)) ^ hi ^ ((seed >> 32) & _M32))
    return r >= keep_threshold(p)


def dropout_scale(p: float) -> float:
    """The factor of a kept element: 1 / (1 - p), 0 when p = 1 (everything dropped)."""
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def dropout_mul(seed: int, shape, p: float, dtype, device=None) -> torch.Tensor:
    """Z / (1 - p) as a tensor of `dtype`: the multiplier each element of `shape` gets."""
    return dropout_keep(seed, shape, p, device).to(dtype) * dropout_scale(p)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_ref(x, p: float, seed: int, residual=None):
    """x * mask / (1 - p) [+ residual], mask = dropout_keep(seed, x.shape, p); p = 1 gives x * 0."""
    acc = _acc(x.dtype)
    y = x.to(acc) * dropout_mul(seed, x.shape, p, acc, x.device)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
_GELU_K = math.sqrt(2.0 / math.pi)


def activation_ref(u, activation: str):
    """The activations bias_act_dropout fuses, written as formulas: relu max(u, 0); gelu
    u Phi(u) = u (1 + erf(u / sqrt 2)) / 2 (exact, F.gelu's default); gelu_tanh
    u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2 (F.gelu(approximate="tanh"), GPT-2's);
    silu u sigmoid(u)."""
    if activation == "relu":
        return u.clamp(min=0)
    if activation == "gelu":
        return 0.5 * u * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        return 0.5 * u * (1.0 + torch.tanh(_GELU_K * (u + 0.044715 * u * u * u)))
    if activation == "silu":
        return u * torch.sigmoid(u)
    raise ValueError(f"bias_act_dropout: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def bias_act_dropout_ref(x, bias, activation: str, p: float, seed: int):
    """dropout(act(x + bias)) with the kernels' mask, in the accumulator precision; x (*, F),
    bias (F,) or None; the mask indexes x's flat elements."""
    acc = _acc(x.dtype)
    u = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    y = activation_ref(u, activation)
    if p > 0:
        y = y * dropout_mul(seed, x.shape, p, acc, x.device)
    return y.to(x.dtype)


# ============================================================================ input checks

class _NaNProbability(ValueError, RuntimeError):
    """p = NaN: torch's F.dropout raises RuntimeError (from its kernel), fastseq's errors are
    ValueErrors; code written against either catches this."""


def _check_p(op: str, p) -> float:
    """torch's rules and messages: F.dropout raises ValueError for p outside [0, 1], RuntimeError
    for NaN, TypeError for a p that is not a number."""
    if not isinstance(p, numbers.Real):
        raise TypeError(f"{op}: dropout probability must be a real number, got {type(p).__name__} {p!r}")
    if p != p:
        raise _NaNProbability(f"{op}: dropout probability has to be between 0 and 1, but got {p}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _check_tensor(op: str, name: str, t) -> None:
    """torch raises TypeError for a non-tensor argument (F.dropout([1.0], 0.1)), so does fastseq."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")


def _check_residual(op: str, x, residual) -> None:
    _check_tensor(op, "residual", residual)
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(f"{op}: expected a residual of the input's shape and device ({list(x.shape)}, {x.device}), "
                         f"got ({list(residual.shape)}, {residual.device})")


def _check_bias_act(op: str, x, bias, activation: str) -> None:
    _check_tensor(op, "input", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if x.dim() == 0:
        raise ValueError(f"{op}: expected an input of at least one dim (*, F), got a 0-dim tensor")
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if bias.shape != (x.shape[-1],) or bias.device != x.device:
            raise ValueError(f"{op}: expected bias of shape [{x.shape[-1]}] (the input's last dim) on {x.device}, "
                             f"got {list(bias.shape)} on {bias.device}")


def _promote(x, residual):
    """x + residual in torch's type promotion: both operands in the result dtype."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


# ============================================================================ dispatch

_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float16, torch.float32, torch.float64)}


def _facts_of(x, *params) -> dict:
    return {"device": x.device.type, "dtype": str(x.dtype).replace("torch.", ""),
            "param_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in params if t is not None}
                                   - {str(x.dtype).replace("torch.", "")})}


def _reasons(backend):
    names = tuple(str(d).replace("torch.", "") for d in _KERNEL_DTYPES[backend])

    def reasons(f: dict) -> List[str]:
        out = []
        if f["dtype"] not in names:
            out.append(f"{backend} kernels take {', '.join(names)}, got {f['dtype']}")
        if f["param_dtypes"]:
            out.append(f"{backend} kernels need the bias in the input's dtype {f['dtype']}, got "
                       f"{', '.join(f['param_dtypes'])}")
        return out
    return reasons


def _facts_dropout(input, p=0.5, training=True, inplace=False):
    _check_tensor("dropout", "input", input)
    _check_p("dropout", p)
    return _facts_of(input)


def _facts_dropout_add(input, residual, p=0.5, training=True):
    _check_tensor("dropout_add", "input", input)
    _check_residual("dropout_add", input, residual)
    _check_p("dropout_add", p)
    return _facts_of(*_promote(input, residual))


def _facts_bias_act_dropout(input, bias, activation="gelu", p=0.0, training=True):
    _check_bias_act("bias_act_dropout", input, bias, activation)
    _check_p("bias_act_dropout", p)
    return _facts_of(input, bias)


for _op, _f in (("dropout", _facts_dropout), ("dropout_add", _facts_dropout_add),
                ("bias_act_dropout", _facts_bias_act_dropout)):
    _dispatch.register_op(_op, _f, cpu=_reasons("cpu"), cuda=_reasons("cuda"), torch=lambda f: [])


def _backend(op: str, x, bias=None) -> str:
    if _library.transformed() or _capturing_cuda_graph(x):
        return "torch"
    return _dispatch.choose_cached(op, (x.device, x.dtype, None if bias is None else bias.dtype), _facts_of, x, bias)


def draw_seed() -> int:
    """One dropout key from torch's default (CPU) generator, for every device: torch.manual_seed
    reproduces it (torch.cuda.manual_seed alone does not)."""
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


def _capturing_cuda_graph(x) -> bool:
    """A CUDA graph being captured would freeze the drawn seed (every replay the same mask):
    such calls run on torch's ops, whose dropout draws inside the graph."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


# ============================================================================ kernel calls

# Below this many elements a call runs on one thread (waking the second costs more than it saves).
_PARALLEL_ELEMENTS = 1 << 15


def _threads(numel: int) -> int:
    return _dispatch.num_threads() if numel >= _PARALLEL_ELEMENTS else 1


def _dropout_kernel(backend, x, r, p, seed):
    """x * Z / (1 - p) [+ r] for contiguous x (and r of x's dtype): a new tensor."""
    y = _alloc.empty_like(x)
    if backend == "cpu":
        _dispatch.cpu_kernels("dropout").dropout_ptr(x.data_ptr(), 0 if r is None else r.data_ptr(), y.data_ptr(),
                                                     x.numel(), p, seed, _threads(x.numel()),
                                                     x.dtype == torch.float64)
    else:
        from fastseq._cuda._common import as_array, on_device, torch_stream
        with on_device(x.device):
            _dispatch.cuda_kernels("dropout").dropout(
                as_array(x.view(-1)), as_array(r.view(-1)) if r is not None else as_array(x.view(-1)[:1]),
                as_array(y.view(-1)), x.numel(), p, seed, r is not None, stream=torch_stream())
    return y


def _bias_act_forward(backend, x, bias, act: int, p, seed):
    """act(x + bias) * Z / (1 - p) for contiguous x (*, F): a new tensor."""
    y = _alloc.empty_like(x)
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    if backend == "cpu":
        _dispatch.cpu_kernels("dropout").bias_act_forward_ptr(
            x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), m, n, act, p, seed,
            _threads(x.numel()), x.dtype == torch.float64)
    else:
        from fastseq._cuda._common import as_array, on_device, torch_stream
        with on_device(x.device):
            _dispatch.cuda_kernels("dropout").bias_act_forward(
                as_array(x.view(-1)), as_array(bias) if bias is not None else as_array(x.view(-1)[:1]),
                as_array(y.view(-1)), m, n, act, p, seed, bias is not None, stream=torch_stream())
    return y


def _bias_act_backward(backend, x, bias, dy, act: int, p, seed, want_db: bool):
    """(dx, db or None) of _bias_act_forward for contiguous x, dy."""
    dx = _alloc.empty_like(x)
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    db = torch.empty(n, dtype=x.dtype, device=x.device) if want_db else None
    if backend == "cpu":
        nt = _threads(x.numel())
        part = _alloc.scratch(max(1, min(nt, m)) * n, x.dtype) if want_db else None
        _dispatch.cpu_kernels("dropout").bias_act_backward_ptr(
            x.data_ptr(), 0 if bias is None else bias.data_ptr(), dy.data_ptr(), dx.data_ptr(),
            0 if part is None else part.data_ptr(), 0 if db is None else db.data_ptr(), m, n, act, p, seed, nt,
            x.dtype == torch.float64)
    else:
        k = _dispatch.cuda_kernels("dropout")
        from fastseq._cuda._common import as_array, on_device, torch_stream
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        part = torch.empty(max(1, k.partial_chunks(m)[1] * n), dtype=acc, device=x.device)
        dummy = x.view(-1)[:1]
        with on_device(x.device):
            k.bias_act_backward(as_array(x.view(-1)), as_array(bias) if bias is not None else as_array(dummy),
                                as_array(dy.view(-1)), as_array(dx.view(-1)),
                                as_array(db) if db is not None else as_array(dummy), as_array(part), m, n, act, p,
                                seed, bias is not None, want_db, stream=torch_stream())
    return dx, db


# ============================================================================ autograd

class DropoutFunction(torch.autograd.Function):
    """x * Z / (1 - p) [+ residual]; saves nothing but (p, seed).  Backward: dx = dy * Z / (1 - p),
    dresidual = dy.  Dropout is linear in x, so double backward is this Function again."""

    @staticmethod
    def forward(ctx, x, residual, p, seed, backend):
        ctx.meta = (p, seed, backend, residual is not None)
        ctx.set_materialize_grads(False)
        return _dropout_kernel(backend, x.contiguous(), residual.contiguous() if residual is not None else None,
                               p, seed).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        p, seed, backend, has_r = ctx.meta
        if dy is None:
            return None, None, None, None, None
        if not ctx.needs_input_grad[0]:
            dx = None
        elif torch.is_grad_enabled():               # create_graph=True: stay differentiable
            dx = _apply_dropout(dy, None, p, seed, backend)
        else:
            dx = _dropout_kernel(backend, dy.contiguous(), None, p, seed).view(dy.shape)
        return dx, (dy if has_r else None), None, None, None


_apply_dropout = _library.direct_apply(DropoutFunction)


class BiasActDropoutFunction(torch.autograd.Function):
    """act(x + bias) * Z / (1 - p); saves x and bias (the pre-activation is rebuilt in backward)."""

    @staticmethod
    def forward(ctx, x, bias, act, p, seed, backend):
        xc = x.contiguous()
        y = _bias_act_forward(backend, xc, bias, act, p, seed)
        ctx.save_for_backward(x, bias)
        ctx.meta = (act, p, seed, backend)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        act, p, seed, backend = ctx.meta
        x, bias = ctx.saved_tensors
        if dy is None:
            return (None,) * 6
        if torch.is_grad_enabled():                 # create_graph=True: the reference, differentiated
            live = [t for t in (x, bias) if t is not None and t.requires_grad]
            y = bias_act_dropout_ref(x, bias, ACTIVATIONS[act], p, seed)
            got = iter(torch.autograd.grad(y, live, dy, create_graph=True))
            dx, db = [next(got) if t is not None and t.requires_grad else None for t in (x, bias)]
            return dx, db, None, None, None, None
        dx, db = _bias_act_backward(backend, x.contiguous(), bias, dy.contiguous(), act, p, seed,
                                    bias is not None and ctx.needs_input_grad[1])
        return dx, db, None, None, None, None


_apply_bias_act_dropout = _library.direct_apply(BiasActDropoutFunction)


# ============================================================================ registered ops
# The same kernels as torch.library ops, for graph capture (fastseq/_library.py); the seed is a
# 0-dim int64 tensor drawn in the graph.

@torch.library.custom_op("fastseq::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, residual: Optional[torch.Tensor], p: float, seed: torch.Tensor,
                backend: str) -> torch.Tensor:
    return _dropout_kernel(backend, x.contiguous(), residual.contiguous() if residual is not None else None,
                           p, int(seed)).view(x.shape)


@_dropout_op.register_fake
def _(x, residual, p, seed, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output):
    x, residual, p, seed, backend = inputs
    ctx.save_for_backward(seed)
    ctx.meta = (p, backend, residual is not None)


def _dropout_op_backward(ctx, dy):
    p, backend, has_r = ctx.meta
    seed, = ctx.saved_tensors
    return _dropout_op(dy, None, p, seed, backend), (dy if has_r else None), None, None, None


_dropout_op.register_autograd(_dropout_op_backward, setup_context=_dropout_setup_context)


@torch.library.custom_op("fastseq::bias_act_dropout_forward", mutates_args=())
def _bias_act_forward_op(x: torch.Tensor, bias: Optional[torch.Tensor], act: int, p: float, seed: torch.Tensor,
                         backend: str) -> torch.Tensor:
    return _bias_act_forward(backend, x.contiguous(), bias, act, p, int(seed))


@_bias_act_forward_op.register_fake
def _(x, bias, act, p, seed, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastseq::bias_act_dropout_backward", mutates_args=())
def _bias_act_backward_op(x: torch.Tensor, bias: Optional[torch.Tensor], dy: torch.Tensor, act: int, p: float,
                          seed: torch.Tensor, want_db: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dx, db = _bias_act_backward(backend, x.contiguous(), bias, dy.contiguous(), act, p, int(seed), want_db)
    return dx, (db if db is not None else x.new_empty(0))


@_bias_act_backward_op.register_fake
def _(x, bias, dy, act, p, seed, want_db, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[-1],) if want_db else (0,)))


def _bias_act_setup_context(ctx, inputs, output):
    x, bias, act, p, seed, backend = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.meta = (act, p, backend)


def _bias_act_op_backward(ctx, dy):
    act, p, backend = ctx.meta
    x, bias, seed = ctx.saved_tensors
    want_db = bias is not None and ctx.needs_input_grad[1]
    dx, db = _bias_act_backward_op(x, bias, dy, act, p, seed, want_db, backend)
    return dx, (db if want_db else None), None, None, None, None


_bias_act_forward_op.register_autograd(_bias_act_op_backward, setup_context=_bias_act_setup_context)


# ============================================================================ functional

def _wants_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _run_dropout(op, x, residual, p, backend):
    """The kernel path of dropout / dropout_add, p > 0."""
    if _library.captured(x):
        return _dropout_op(x, residual, p, _library.seed_tensor(), backend)
    seed = draw_seed()
    if _wants_grad(x, residual):
        return _apply_dropout(x, residual, p, seed, backend)
    return _dropout_kernel(backend, x.contiguous(), residual.contiguous() if residual is not None else None,
                           p, seed).view(x.shape)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Dropout, as torch.nn.functional.dropout, on fastseq's counter-based mask.

    Args:
        input: a tensor of any shape.
        p: probability of zeroing an element, in [0, 1].
        training: apply dropout (False, or p = 0: input is returned as is, as torch does).
        inplace: write the result into input (as torch's inplace=True).
    Returns:
        input * Z / (1 - p), Z_k = [hash(seed, k) >= p 2^32] for the element with flat index k; the
        seed is drawn from torch's generator (torch.manual_seed reproduces the mask; the masks are
        not torch's, their statistics are).  Backward regenerates the mask: nothing is stored.
    Shapes:
        input (*) -> output (*), input's dtype.
    """
    _check_tensor("dropout", "input", input)
    p = _check_p("dropout", p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    backend = _backend("dropout", input)
    if backend == "torch":
        return torch.nn.functional.dropout(input, p, True, inplace)
    y = _run_dropout("dropout", input, None, p, backend)
    return input.copy_(y) if inplace else y


def dropout_add(input: torch.Tensor, residual: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """residual + dropout(input, p, training) in one pass (read input and residual, write the sum).

    Args:
        input: the branch to drop (a block's output), any shape.
        residual: the residual stream, input's shape and device (no broadcasting).
        p, training: as dropout.
    Returns:
        residual + input * Z / (1 - p), the promoted dtype of the two (as input + residual).
    Shapes:
        input, residual (*) -> output (*).
    """
    _check_tensor("dropout_add", "input", input)
    _check_residual("dropout_add", input, residual)
    p = _check_p("dropout_add", p)
    x, r = _promote(input, residual)
    if not training or p == 0.0 or x.numel() == 0:
        return x + r
    backend = _backend("dropout_add", x)
    if backend == "torch":
        return r + torch.nn.functional.dropout(x, p, True)
    return _run_dropout("dropout_add", x, r, p, backend)


def bias_act_dropout(input: torch.Tensor, bias: Optional[torch.Tensor], activation: str = "gelu", p: float = 0.0,
                     training: bool = True) -> torch.Tensor:
    """dropout(act(input + bias), p) in one pass forward and one backward: the feed-forward
    block's middle, after a bias-free GEMM (F.linear(x, w1)), before the second linear.

    Args:
        input: (*, F) the first linear's output without its bias.
        bias: (F,) or None.
        activation: "relu", "gelu" (exact, erf), "gelu_tanh" (F.gelu(approximate="tanh")) or "silu".
        p: dropout probability in [0, 1]; 0 (or training=False) is the fused bias + activation.
        training: apply dropout.
    Returns:
        (*, F) in the input's dtype.  Backward rebuilds input + bias and the mask: it saves only
        input and bias (the unfused sequence also saves the activation's input and a mask).
    Shapes:
        input (*, F), bias (F,) -> (*, F).
    """
    _check_bias_act("bias_act_dropout", input, bias, activation)
    p = _check_p("bias_act_dropout", p)             # validated as torch does, whatever `training` says
    p = p if training else 0.0
    act = _ACT_CODE[activation]
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    backend = _backend("bias_act_dropout", input, bias)
    if backend == "torch":
        u = input if bias is None else input + bias
        a = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
             "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[activation](u)
        return torch.nn.functional.dropout(a, p, True) if p > 0 else a
    if _library.captured(input):
        seed_t = _library.seed_tensor() if p > 0 else torch.zeros((), dtype=torch.int64)
        return _bias_act_forward_op(input, bias, act, p, seed_t, backend)
    seed = draw_seed() if p > 0 else 0
    if _wants_grad(input, bias):
        return _apply_bias_act_dropout(input, bias, act, p, seed, backend)
    return _bias_act_forward(backend, input.contiguous(), bias, act, p, seed)


_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


# ============================================================================ module

class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout on fastseq's counter-based mask: same constructor and behaviour
    (eval mode and p = 0 return the input itself); the masks differ from torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)
