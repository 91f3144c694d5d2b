"""fastseq.convert(model): swap supported torch.nn layers for their fastseq twins, in place.

Each family registers a converter for the torch.nn classes it replaces.  A twin shares the
original's Parameter objects (no copy), buffers, hooks and train/eval mode.
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch

_CONVERTERS: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module]] = {}


def register_converter(torch_cls: Type[torch.nn.Module], fn: Callable[[torch.nn.Module], torch.nn.Module]):
    _CONVERTERS[torch_cls] = fn


def rebind(module: torch.nn.Module, cls: Type[torch.nn.Module]) -> torch.nn.Module:
    """A `cls` instance with `module`'s state (parameters shared, not copied).  For twins that
    subclass the torch class and add no state."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    return twin


def convert(module: torch.nn.Module, _inside: bool = False) -> torch.nn.Module:
    """Replace every supported torch.nn layer inside `module` by its fastseq twin.

    The model is changed in place (children are swapped in their parents) and returned (use
    the return value: a supported root layer is itself replaced by its twin); the
    twins share the original parameters, so optimizers built before the call still apply.  A
    layer used in several places gets one twin.  Only exact torch classes are converted:
    subclasses may override forward.  (_inside: convert the children only; fastseq's own
    modules use it on themselves after building torch's layers.)
    """
    return _convert(module, {}, skip_self=_inside)


def _convert(module: torch.nn.Module, done: Dict[int, torch.nn.Module], skip_self: bool = False) -> torch.nn.Module:
    if id(module) in done:
        return done[id(module)]
    for name, child in list(module._modules.items()):   # every name, shared children too
        if child is None:
            continue
        twin = _convert(child, done)
        if twin is not child:
            setattr(module, name, twin)
    fn = None if skip_self else _CONVERTERS.get(type(module))
    new = fn(module) if fn is not None else module
    done[id(module)] = new
    return new
