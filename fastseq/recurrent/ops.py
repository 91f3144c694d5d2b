"""The cells' autograd Functions as torch.library ops, for graph capture (fastseq/_library.py).

One op pair per Function (functions.py): `fastseq::<cell>_layer_forward` runs its compute() and
returns the Function's outputs followed by the intermediates its backward needs (a registered
op's autograd may save only inputs and outputs); `fastseq::<cell>_layer_backward` runs the
Function's own backward on those, through a stand-in for autograd's ctx.  Both are opaque to
the tracers, which see only the fake implementations: output shapes from the input shapes.

Eager calls never come here (layers call the Functions directly: a registered op costs ~10 us
more per call).  `apply(name, *args)` is the single entry the layers use while captured (names, not the
Function classes, key the tables: Dynamo cannot hash a Function class).

Shapes: xp (N, G H) projected rows, offs (T + 1,) step offsets, h0 (B, H) (or (B, P) with a
projection), c0 (B, H), w_hh (G H, H) (or (4H, P)), G H = w_hh.shape[0], H the hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .functions import (GRULayerFunction, LayerNormGRULayerFunction, LayerNormLSTMLayerFunction, LSTMLayerFunction,
                        LSTMProjLayerFunction, RNNLayerFunction)

Shapes = Callable[[Dict[str, torch.Tensor]], List[Tuple[int, ...]]]


@dataclass(frozen=True)
class Spec:
    """How one Function becomes an op pair."""
    name: str                       # op names: fastseq::<name>_forward / _backward
    function: type
    scalars: Tuple[Tuple[str, str], ...]   # (schema type, name) of the non-tensor arguments after offs
    tensors: Tuple[str, ...]        # tensor arguments after the scalars, in order; "?" suffix: optional
    saved: Tuple[str, ...]          # what backward's ctx.saved_tensors holds: argument names, then outputs
    extras: Shapes                  # shapes of the intermediates the op returns after the outputs
    outputs: Shapes                 # shapes of the Function's outputs (y, h_n[, c_n])

    def arg(self, name: str) -> str:
        return name.rstrip("?")


def _H(a):
    return a["w_hh"].shape[1] if "w_hr" not in a else a["w_hr"].shape[1]


def _lstm_out(a):
    N, B, P, H = a["xp"].shape[0], a["h0"].shape[0], a["h0"].shape[1], _H(a)
    return [(N, P), (B, P), (B, H)]


def _h_out(a):
    N, B, H = a["xp"].shape[0], a["h0"].shape[0], a["h0"].shape[1]
    return [(N, H), (B, H)]


SPECS = {s.name: s for s in (
    Spec("lstm_layer", LSTMLayerFunction, (("int", "ub"),), ("xp", "h0", "c0", "w_hh"),
         ("offs", "h0", "c0", "w_hh", "out0", "extra0", "extra1"),
         lambda a: [(a["xp"].shape[0], _H(a)), (a["xp"].shape[0], 4 * _H(a))], _lstm_out),
    Spec("lstm_proj_layer", LSTMProjLayerFunction, (("int", "ub"),), ("xp", "h0", "c0", "w_hh", "w_hr"),
         ("offs", "h0", "c0", "w_hh", "w_hr", "out0", "extra0", "extra1", "extra2"),
         lambda a: [(a["xp"].shape[0], _H(a)), (a["xp"].shape[0], 4 * _H(a)), (a["xp"].shape[0], _H(a))], _lstm_out),
    Spec("gru_layer", GRULayerFunction, (("int", "ub"),), ("xp", "h0", "w_hh", "b_hh?"),
         ("offs", "h0", "w_hh", "out0", "extra0", "extra1"),
         lambda a: [(a["xp"].shape[0], 3 * _H(a)), (a["xp"].shape[0], _H(a))], _h_out),
    Spec("rnn_layer", RNNLayerFunction, (("int", "ub"), ("bool", "relu")), ("xp", "h0", "w_hh"),
         ("offs", "h0", "w_hh", "out0"), lambda a: [], _h_out),
    Spec("layer_norm_lstm_layer", LayerNormLSTMLayerFunction, (("float", "eps"),),
         ("xp", "h0", "c0", "w_hh", "g_hh", "g_c", "b_c"),
         ("offs", "h0", "c0", "w_hh", "g_hh", "g_c", "b_c", "out0", "extra0", "extra1", "extra2", "extra3",
          "extra4", "extra5"),
         lambda a: [(a["xp"].shape[0], _H(a)), (a["xp"].shape[0], 4 * _H(a)), (a["xp"].shape[0], 4 * _H(a)),
                    (a["xp"].shape[0],), (a["xp"].shape[0], _H(a)), (a["xp"].shape[0],)], _lstm_out),
    Spec("layer_norm_gru_layer", LayerNormGRULayerFunction, (("float", "eps"),), ("xp", "h0", "w_hh", "g_hh", "b_hh?"),
         ("offs", "h0", "w_hh", "g_hh", "out0", "extra0", "extra1", "extra2", "extra3"),
         lambda a: [(a["xp"].shape[0], 3 * _H(a)), (a["xp"].shape[0], 3 * _H(a)), (a["xp"].shape[0],),
                    (a["xp"].shape[0], _H(a))], _h_out),
)}


class _Ctx:
    """Stands in for autograd's ctx when a Function's backward runs inside a registered op."""

    def __init__(self, saved, needs, attrs):
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = tuple(needs)
        self.__dict__.update(attrs)


_lib = torch.library.Library("fastseq", "FRAGMENT")


def _register(spec: Spec):
    scal = ", ".join(f"{t} {n}" for t, n in spec.scalars)
    tens = ", ".join(f"Tensor{'?' if n.endswith('?') else ''} {spec.arg(n)}" for n in spec.tensors)
    fwd, bwd = f"{spec.name}_forward", f"{spec.name}_backward"
    _lib.define(f"{fwd}(str backend, Tensor offs, {scal}, {tens}) -> Tensor[]")
    # backward: the saved tensors, the output gradients (optional), which inputs need a gradient
    _lib.define(f"{bwd}(str backend, {scal}, Tensor[] saved, Tensor?[] grads, bool[] needs) -> Tensor[]")
    names = [spec.arg(n) for n in spec.tensors]
    n_out = 3 if "c0" in names else 2                 # y, h_n[, c_n]

    def forward_impl(backend, offs, *rest):
        out, saved = spec.function.compute(backend, offs, *rest)
        extras = [t for t in saved[len(spec.saved) - _n_extra(spec):]]
        return [t.clone() if _aliases(t, rest) else t for t in list(out) + extras]

    def forward_fake(backend, offs, *rest):
        a = dict(zip(names, rest[len(spec.scalars):]))
        like = a["xp"]
        return ([like.new_empty(s) for s in spec.outputs(a)] + [like.new_empty(s) for s in spec.extras(a)])

    def backward_impl(backend, *rest):
        scalars, (saved, grads, needs) = rest[:len(spec.scalars)], rest[len(spec.scalars):]
        saved = [t.contiguous() for t in saved]
        attrs = {"backend": backend, **{n: v for (_, n), v in zip(spec.scalars, scalars)}}
        # the Function's backward takes grads of its outputs; needs covers every forward argument
        full_needs = (False, False) + (False,) * len(spec.scalars) + tuple(needs)
        g = spec.function.backward(_Ctx(saved, full_needs, attrs), *grads)
        g = g[2 + len(spec.scalars):]
        shapes = _grad_shapes(spec, saved)
        # outputs of an op may not alias each other: views (split pieces of one buffer) are copied
        return [(_own(t) if t is not None else saved[1].new_zeros(s)) if need
                else saved[1].new_empty(0) for t, s, need in zip(g, shapes, needs)]

    def backward_fake(backend, *rest):
        saved, grads, needs = rest[len(spec.scalars):]
        return [saved[1].new_empty(s) if need else saved[1].new_empty(0)
                for s, need in zip(_grad_shapes(spec, saved), needs)]

    _lib.impl(fwd, forward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastseq::{fwd}", forward_fake, lib=_lib)
    _lib.impl(bwd, backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastseq::{bwd}", backward_fake, lib=_lib)

    def setup_context(ctx, inputs, output):
        backend, offs, *rest = inputs
        a = dict(zip(names, rest[len(spec.scalars):]))
        a["offs"] = offs
        for i in range(n_out):
            a[f"out{i}"] = output[i]
        for i, t in enumerate(output[n_out:]):
            a[f"extra{i}"] = t
        ctx.save_for_backward(*[a[n] for n in spec.saved])
        ctx.backend, ctx.scalars = backend, rest[:len(spec.scalars)]

    def backward(ctx, grads):
        needs = list(ctx.needs_input_grad[2 + len(spec.scalars):])
        g = getattr(torch.ops.fastseq, bwd)(ctx.backend, *ctx.scalars, list(ctx.saved_tensors),
                                            list(grads[:n_out]), needs)
        return (None, None) + (None,) * len(spec.scalars) + tuple(t if need else None for t, need in zip(g, needs))

    torch.library.register_autograd(f"fastseq::{fwd}", backward, setup_context=setup_context, lib=_lib)
    return getattr(torch.ops.fastseq, fwd), n_out


def _own(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and owning its storage (not a view into a buffer another output shares)."""
    return t.clone() if t._base is not None or not t.is_contiguous() else t


def _n_extra(spec: Spec) -> int:
    return sum(1 for n in spec.saved if n.startswith("extra"))


def _aliases(t, args) -> bool:
    """An output may not share storage with an input (h0.contiguous() is h0 itself, say)."""
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for a in args)


def _grad_shapes(spec: Spec, saved: Sequence[torch.Tensor]) -> List[Tuple[int, ...]]:
    """The shape of each tensor argument's gradient, from the saved tensors: xp (N, G H) with N
    the output rows and G H the recurrent weight's rows; b_hh (G H,); the rest as saved."""
    s = dict(zip(spec.saved, saved))
    gh = s["w_hh"].shape[0]
    out = []
    for n in spec.tensors:
        n = spec.arg(n)
        out.append((s["out0"].shape[0], gh) if n == "xp" else (gh,) if n == "b_hh" else tuple(s[n].shape))
    return out


_OPS = {name: _register(spec) for name, spec in SPECS.items()}
XP_ARG = {name: 2 + len(spec.scalars) for name, spec in SPECS.items()}   # where xp sits in the arguments
FUNCTION = {name: spec.function for name, spec in SPECS.items()}


def apply(name: str, backend: str, offs, *rest):
    """FUNCTION[name].apply(backend, offs, *rest) as its registered op: the Function's outputs."""
    op, n_out = _OPS[name]
    spec = SPECS[name]
    k = len(spec.scalars)
    tensors = list(rest[k:])
    if len(tensors) < len(spec.tensors):          # trailing optional tensors left out
        tensors += [None] * (len(spec.tensors) - len(tensors))
    return tuple(op(backend, offs, *rest[:k], *tensors)[:n_out])
