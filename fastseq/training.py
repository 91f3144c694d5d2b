"""Schedules and training helpers.

Learning-rate schedules with warm-up, as torch LR schedulers: each is a
torch.optim.lr_scheduler.LRScheduler, so it works with any optimizer, steps once per update
(`scheduler.step()` after `optimizer.step()`), and its state_dict round-trips.  After n calls to
step() (n = scheduler.last_epoch) a group whose configured lr is `lr` runs at:

    inverse_sqrt_schedule   fairseq's `inverse_sqrt` (Vaswani et al. 2017's "noam" decay):
                            n < warmup:  warmup_init_lr + n (lr - warmup_init_lr) / warmup
                            n >= warmup: lr sqrt(warmup) / sqrt(n)
    cosine_schedule         n < warmup:  lr n / warmup
                            then lr (m + (1 - m) (1 + cos(pi progress)) / 2), progress =
                            (n - warmup) / (total - warmup) capped at 1, m = min_lr_ratio
    linear_schedule         Hugging Face's get_linear_schedule_with_warmup:
                            n < warmup:  lr n / warmup
                            then lr max(0, (total - n) / (total - warmup))

param_groups(model, weight_decay) splits the parameters for AdamW the GPT-2 / BERT way: weight
matrices (Linear, attention projections, embeddings) decay; biases and norm weights (every
parameter of fewer than 2 dims) do not.

Label smoothing conventions
---------------------------
Label smoothing is not a helper here: it lives in the cross-entropy family, and every model's
``loss(batch, label_smoothing=eps, smoothing=...)`` passes it there
(fastseq.functional.cross_entropy / linear_cross_entropy, ``smoothing="torch" | "fairseq"``).
The two conventions mix the one-hot target with a different spread over V classes:

    smoothing="torch"    (F.cross_entropy(label_smoothing=eps), Szegedy et al. 2016)
                         target class 1 - eps + eps / V, every other class eps / V
    smoothing="fairseq"  (fairseq's label_smoothed_cross_entropy criterion)
                         target class 1 - eps, every other class eps / (V - 1)

They differ by O(eps / V) and agree at eps = 0.  smoothing_conventions(eps, V) returns both
distributions' (target, other) probabilities.
"""
import math
from typing import Dict, List, Tuple

import torch
from torch.optim.lr_scheduler import LRScheduler


# ============================================================================ checks

def _int_at_least(where: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _float_in(where: str, name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{where}: {name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


# ============================================================================ schedules

class WarmupSchedule(LRScheduler):
    """An LRScheduler whose lr is a closed form of (the group's configured lr, the step count):
    subclasses define lr_at(base_lr, step).  Every attribute (the schedule's constants and the
    step count) is in state_dict."""

    def lr_at(self, base_lr, step: int):
        raise NotImplementedError

    def get_lr(self):
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()


class InverseSqrtSchedule(WarmupSchedule):
    """fairseq's inverse_sqrt schedule; see inverse_sqrt_schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_init_lr: float = 0.0,
                 last_epoch: int = -1):
        self.warmup_steps = _int_at_least("inverse_sqrt_schedule", "warmup_steps", warmup_steps, 1)
        self.warmup_init_lr = _float_in("inverse_sqrt_schedule", "warmup_init_lr", warmup_init_lr, 0.0, math.inf)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, step: int):
        W = self.warmup_steps
        if step < W:
            return self.warmup_init_lr + step * (base_lr - self.warmup_init_lr) / W
        return base_lr * math.sqrt(W) / math.sqrt(step)


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_init_lr: float = 0.0,
                          last_epoch: int = -1) -> InverseSqrtSchedule:
    """Linear warm-up, then decay with the inverse square root of the step (fairseq's `inverse_sqrt`).

    At step n (the number of step() calls so far), for a group of configured lr `lr`:
    warmup_init_lr + n (lr - warmup_init_lr) / warmup_steps while n < warmup_steps (so step 0
    runs at warmup_init_lr), then lr sqrt(warmup_steps) / sqrt(n) (exactly lr at n = warmup_steps).
    fairseq's --warmup-init-lr default (-1) means 0 when there is a warm-up, as the default here.

    Args:
        optimizer: any torch optimizer; its groups' lr is the peak.
        warmup_steps: int >= 1; warmup_init_lr: the absolute lr at step 0, >= 0 (every group).
        last_epoch: torch's resume argument (-1: a fresh schedule).
    Returns:
        The scheduler (an LRScheduler); call .step() once per optimizer update.
    """
    return InverseSqrtSchedule(optimizer, warmup_steps, warmup_init_lr, last_epoch)


class CosineSchedule(WarmupSchedule):
    """Linear warm-up then half-cosine decay; see cosine_schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        self.warmup_steps, self.total_steps = _warmup_total("cosine_schedule", warmup_steps, total_steps)
        self.min_lr_ratio = _float_in("cosine_schedule", "min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, step: int):
        W, N, m = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < W:
            return base_lr * step / W
        progress = min(1.0, (step - W) / max(1, N - W))
        return base_lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0, last_epoch: int = -1) -> CosineSchedule:
    """Linear warm-up from 0, then a half cosine from lr down to min_lr_ratio * lr at total_steps,
    where it stays.

    At step n: lr n / warmup_steps while n < warmup_steps; then
    lr (m + (1 - m) (1 + cos(pi p)) / 2) with p = min(1, (n - warmup_steps) / (total_steps -
    warmup_steps)) and m = min_lr_ratio (Hugging Face's get_cosine_schedule_with_warmup at m = 0).

    Args:
        optimizer: any torch optimizer; warmup_steps: int >= 0; total_steps: int >= max(1,
        warmup_steps); min_lr_ratio: in [0, 1]; last_epoch: torch's resume argument.
    Returns:
        The scheduler (an LRScheduler); call .step() once per optimizer update.
    """
    return CosineSchedule(optimizer, warmup_steps, total_steps, min_lr_ratio, last_epoch)


class LinearSchedule(WarmupSchedule):
    """Linear warm-up then linear decay to 0; see linear_schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1):
        self.warmup_steps, self.total_steps = _warmup_total("linear_schedule", warmup_steps, total_steps)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, step: int):
        W, N = self.warmup_steps, self.total_steps
        if step < W:
            return base_lr * step / W
        return base_lr * max(0.0, (N - step) / max(1, N - W))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    last_epoch: int = -1) -> LinearSchedule:
    """Linear warm-up from 0 to lr, then linear decay to 0 at total_steps (and 0 after): Hugging
    Face's get_linear_schedule_with_warmup.

    At step n: lr n / warmup_steps while n < warmup_steps, then
    lr max(0, (total_steps - n) / (total_steps - warmup_steps)).

    Args:
        optimizer: any torch optimizer; warmup_steps: int >= 0; total_steps: int >= max(1,
        warmup_steps); last_epoch: torch's resume argument.
    Returns:
        The scheduler (an LRScheduler); call .step() once per optimizer update.
    """
    return LinearSchedule(optimizer, warmup_steps, total_steps, last_epoch)


def _warmup_total(where: str, warmup_steps, total_steps) -> Tuple[int, int]:
    W = _int_at_least(where, "warmup_steps", warmup_steps, 0)
    N = _int_at_least(where, "total_steps", total_steps, 1)
    if N < W:
        raise ValueError(f"{where}: total_steps must be >= warmup_steps, got total_steps={N}, warmup_steps={W}")
    return W, N


# ============================================================================ helpers

def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """The model's trainable parameters as optimizer groups: [{"params": weight matrices,
    "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}] (empty groups left out).

    The GPT-2 / BERT recipe: Linear and attention projection weights and embeddings (every
    parameter of 2 or more dims) decay; biases, LayerNorm / RMSNorm weights and other vectors or
    scalars do not.  A parameter shared by two modules (tied embeddings) appears once.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"param_groups: expected an nn.Module, got {type(model).__name__}")
    weight_decay = _float_in("param_groups", "weight_decay", weight_decay, 0.0, math.inf)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def smoothing_conventions(label_smoothing: float, vocab_size: int) -> Dict[str, Tuple[float, float]]:
    """The smoothed target distributions of the two conventions (module docstring): for each of
    "torch" and "fairseq", (probability of the target class, probability of every other class).
    Pass the convention to fastseq.functional.cross_entropy(..., smoothing=...) or a model's
    loss(batch, label_smoothing=..., smoothing=...)."""
    eps = _float_in("smoothing_conventions", "label_smoothing", label_smoothing, 0.0, 1.0)
    V = _int_at_least("smoothing_conventions", "vocab_size", vocab_size, 2)
    return {"torch": (1.0 - eps + eps / V, eps / V), "fairseq": (1.0 - eps, eps / (V - 1))}
