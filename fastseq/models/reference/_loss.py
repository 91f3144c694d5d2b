"""The twins' loss: logits formed whole, then torch's cross-entropy (fairseq's label-smoothing
convention written out, torch has only its own)."""
import torch.nn.functional as F
from torch import Tensor


def token_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                        smoothing: str = "torch", ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), ignore_index skipped.

    torch:   (1 - eps) * nll + eps / V * sum_v -log p_v
    fairseq: (1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * sum_v -log p_v
             (fairseq's label_smoothed_nll_loss: the eps mass spread over the V - 1 wrong classes)"""
    V = logits.shape[-1]
    z, t = logits.reshape(-1, V), targets.reshape(-1)
    if smoothing == "torch":
        return F.cross_entropy(z, t, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if smoothing != "fairseq":
        raise ValueError(f"smoothing must be 'torch' or 'fairseq', got {smoothing!r}")
    live = t != ignore_index
    logp = F.log_softmax(z[live], dim=-1)                                   # (N live, V)
    nll = -logp.gather(-1, t[live, None]).squeeze(-1)
    eps_i = label_smoothing / (V - 1)
    return ((1.0 - label_smoothing - eps_i) * nll - eps_i * logp.sum(-1)).mean()
