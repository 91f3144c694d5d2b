"""What a decoding step does to the next-token scores before it picks a token.

Each function takes scores (N, V) -- logits for greedy search and sampling, log-probabilities
for beam search, as in Hugging Face's generate -- and returns new scores (N, V); the rows are
the decoder's rows (batch times beams or returned sequences).  `Processors` applies them in
Hugging Face's order: repetition penalty, no-repeat n-gram, minimum new tokens (EOS
suppressed), then, when sampling, temperature, top-k and top-p.

`seqs` (N, L) are the tokens each row holds so far (prompt and generated) and `start` (N,) the
index of each row's first real token (left padding before it is ignored).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


def repetition_penalty(scores: Tensor, seqs: Tensor, start: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): a token already in the row has its score divided by
    `penalty` where positive and multiplied where negative.  Left padding does not count."""
    N, V = scores.shape
    pos = torch.arange(seqs.shape[1], device=seqs.device)
    seen = seqs.masked_fill(pos[None, :] < start[:, None], V)          # padding -> the extra column V
    hit = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
    hit.scatter_(1, seen.clamp(max=V), True)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(hit[:, :V], penalized, scores)


def no_repeat_ngram(scores: Tensor, seqs: Tensor, start: Tensor, n: int) -> Tensor:
    """Ban every token that would complete an n-gram already present in the row (left padding
    excluded)."""
    scores = scores.clone()
    rows = seqs.tolist()
    starts = start.tolist()
    for i, (row, s) in enumerate(zip(rows, starts)):
        toks = row[s:]
        if len(toks) < n:
            continue
        prefix = tuple(toks[len(toks) - n + 1:]) if n > 1 else ()
        banned = [toks[j + n - 1] for j in range(len(toks) - n + 1) if tuple(toks[j:j + n - 1]) == prefix]
        if banned:
            scores[i, banned] = NEG_INF
    return scores


def suppress(scores: Tensor, token_ids: Tensor) -> Tensor:
    """Set the scores of `token_ids` (K,) to -inf (EOS before min_new_tokens)."""
    scores = scores.clone()
    scores[:, token_ids] = NEG_INF
    return scores


def top_k_filter(scores: Tensor, k: int, min_keep: int = 1) -> Tensor:
    """Keep the k best scores of each row (ties with the k-th kept too); the rest become -inf."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most probable tokens
    whose probability sums to at least p; the rest become -inf."""
    ascending, order = torch.sort(scores, dim=-1)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)             # probability of this token and all worse
    drop = mass_below <= 1 - p
    drop[:, -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


class Processors:
    """The step's score pipeline for fixed options; `__call__(scores, seqs, start, new_len)`."""

    def __init__(self, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                 repetition_penalty: float, no_repeat_ngram_size: int, min_new_tokens: int,
                 eos: Optional[Tensor], min_keep: int = 1):
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.penalty, self.ngram, self.min_new, self.eos = repetition_penalty, no_repeat_ngram_size, min_new_tokens, eos
        self.min_keep = min_keep

    def top_k_sampling(self) -> int:
        """k when sampling is filtered by top-k alone (no top-p): the sampler can then draw among
        the k best scores (topk, then a softmax over k) instead of a softmax over the vocabulary,
        and the caller passes top_k=False.  0 otherwise.  The one difference: a score tied with the
        k-th best is kept by top_k_filter (as HF) and left to topk's choice here, which only exact
        ties in the logits can tell apart."""
        return max(self.top_k, self.min_keep) if self.do_sample and self.top_k > 0 and self.top_p >= 1.0 else 0

    def __call__(self, scores: Tensor, seqs: Tensor, start: Tensor, new_len: int, top_k: bool = True) -> Tensor:
        if self.penalty != 1.0:
            scores = repetition_penalty(scores, seqs, start, self.penalty)
        if self.ngram > 0:
            scores = no_repeat_ngram(scores, seqs, start, self.ngram)
        if self.eos is not None and new_len < self.min_new:
            scores = suppress(scores, self.eos)
        if self.do_sample:
            if self.temperature != 1.0:
                scores = scores / self.temperature
            if self.top_k > 0 and top_k:
                scores = top_k_filter(scores, self.top_k, self.min_keep)
            if self.top_p < 1.0:
                scores = top_p_filter(scores, self.top_p, self.min_keep)
        return scores


__all__: List[str] = ["Processors", "repetition_penalty", "no_repeat_ngram", "suppress", "top_k_filter",
                      "top_p_filter"]
