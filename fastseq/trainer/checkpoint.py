"""Checkpoints: one file, ``<out>/checkpoint.pt``, written atomically (a temporary file in the
same folder, then ``os.replace``), so an interrupted write never leaves a broken checkpoint.

It is a plain dict that ``torch.load(path, weights_only=True)`` reads:

    model        the subcommand ("gpt", "seq2seq", ...)
    config       the model's config as a dict (``<Name>Config(**config)`` rebuilds it)
    model_state  the model's state_dict
    optimizer    the optimizer's state_dict;  scheduler: the LR scheduler's state_dict
    step         optimizer steps taken;  total_steps: the schedule's length;  elapsed: seconds
    tokenizer    the tokenizer's state (``data.tokenizer_from_state``)
    args         the command line's settings (a resumed run reuses them)
    metrics      the latest validation figures
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Tuple

import torch

FILENAME = "checkpoint.pt"


def checkpoint_path(out: str) -> str:
    return os.path.join(out, FILENAME)


def save_checkpoint(path: str, checkpoint: Dict) -> None:
    """torch.save ``checkpoint`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path: str) -> Dict:
    """The checkpoint dict at ``path`` (a file, or a --out folder holding checkpoint.pt)."""
    if os.path.isdir(path):
        path = checkpoint_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(path: str) -> Tuple[torch.nn.Module, object, Dict]:
    """(model in eval mode with the saved weights, tokenizer, checkpoint dict) from a checkpoint
    file or a --out folder: what a user needs to run a trained model."""
    from .data import tokenizer_from_state
    from .tasks import TASKS
    ckpt = read_checkpoint(path)
    name = ckpt["model"]
    if name not in TASKS:
        raise ValueError(f"checkpoint {path!r} is of an unknown model {name!r}")
    dtype = getattr(torch, ckpt["args"].get("dtype", "float32"))
    model = TASKS[name].model_from_config(ckpt["config"], ckpt["args"]).to(dtype)
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), tokenizer_from_state(ckpt["tokenizer"]), ckpt
