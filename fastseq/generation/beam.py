"""Beam search with Hugging Face's semantics (DESIGN.md §8).

Each batch item keeps `num_beams` running hypotheses, scored by the sum of their tokens'
log-probabilities (after the processors), and up to `num_beams` finished ones, scored by
sum_logprobs / new_len ** length_penalty, where new_len counts the generated tokens including the
EOS.  A step scores every (beam, token) continuation, keeps the best K = max(2, 1 + #eos) *
num_beams of them (or samples K when do_sample), moves the ones among the best num_beams that
end in EOS (or reach max_new_tokens) to the finished set when they beat its worst member, and
continues the best num_beams that did not finish.  An item is done (HF's BeamHypotheses.is_done):

- early_stopping=True: as soon as it holds num_beams finished hypotheses;
- early_stopping=False: when it is full and the best running score divided by the current new
  length ** length_penalty cannot beat its worst finished score;
- early_stopping="never": the same, but with the longest possible length (max_new_tokens) when
  length_penalty > 0, so it only stops when no running hypothesis can improve.

An item that is done cannot change any more: its rows leave the work (the cache drops them with
the reorder of that step) and the others search on (with output_scores every row keeps running,
so that each step's scores cover them all).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits_processors import Processors

_NEG = -1.0e9                     # "impossible" score, as HF's fp32 beam search uses


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, K, ...) and index (B, J) -> (B, J, ...): x[b, index[b, j]]."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def beam_search(model, input_ids: Tensor, mask: Optional[Tensor], start: Tensor, *, num_beams: int,
                max_new_tokens: int, processors: Processors, eos: Optional[Tensor], fill: int,
                length_penalty: float, early_stopping: Union[bool, str], num_return_sequences: int,
                do_sample: bool, generator, output_scores: bool) -> Tuple[Tensor, List[Tensor]]:
    B, P = input_ids.shape
    nb, dev = num_beams, input_ids.device
    N, L = B * nb, P + max_new_tokens
    K = max(2, 1 + (0 if eos is None else eos.numel())) * nb
    in_top = torch.arange(K, device=dev) < nb                          # rank < num_beams may finish

    seqs = torch.full((N, L), fill, dtype=torch.int64, device=dev)    # running rows (B * nb, L)
    seqs[:, :P] = input_ids.repeat_interleave(nb, 0)
    start = start.repeat_interleave(nb, 0)
    mask = None if mask is None else mask.repeat_interleave(nb, 0)

    running = torch.zeros(B, nb, device=dev)
    running[:, 1:] = _NEG                                              # beams start identical: only beam 0 counts
    done_seqs = torch.full((B, nb, L), fill, dtype=torch.int64, device=dev)
    done_scores = torch.full((B, nb), _NEG, device=dev)
    done_full = torch.zeros(B, nb, dtype=torch.bool, device=dev)      # slot holds a finished hypothesis
    done_len = torch.zeros(B, nb, dtype=torch.int64, device=dev)
    may_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    items = None                                                       # the items still searching (None: all B)
    scores_out: List[Tensor] = []

    # the finished sets of the items still searching, (b, nb, ...); written back when items leave
    f_seqs, f_scores, f_full, f_len = done_seqs, done_scores, done_full, done_len

    cache = model.new_cache(N, L)
    logits, cache = model(seqs[:, :P], cache=cache, attention_mask=mask)
    for step in range(max_new_tokens):
        cur = P + step                                                 # tokens held per row
        b = running.shape[0]                                           # items still searching
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        logp = processors(logp, seqs[:, :cur], start, step)
        if output_scores:
            scores_out.append(logp)
        V = logp.shape[-1]
        total = (logp.view(b, nb, V) + running[:, :, None]).view(b, nb * V)
        if do_sample:
            pick = torch.multinomial(total.softmax(-1), K, generator=generator)
            top = total.gather(1, pick)
            top, order = top.sort(dim=-1, descending=True)
            pick = pick.gather(1, order)
        else:
            top, pick = torch.topk(total, K)                          # (b, K)
        beam, tok = pick // V, pick % V
        cand = _gather(seqs.view(b, nb, L), beam).clone()             # (b, K, L)
        cand[:, :, cur] = tok
        ends = torch.zeros_like(tok, dtype=torch.bool) if eos is None else torch.isin(tok, eos)
        ends |= cur + 1 >= L

        # the best num_beams continuations that did not end run on
        live = top + ends.float() * _NEG
        keep = torch.topk(live, nb).indices                           # (b, nb)
        running = _gather(live, keep)
        seqs = _gather(cand, keep).view(b * nb, L)
        src_rows = (_gather(beam, keep) + (torch.arange(b, device=dev) * nb)[:, None]).view(b * nb)

        # the ones that ended join the finished set if they beat its worst member
        fin = top / ((step + 1) ** length_penalty)
        fin += (f_full.all(1, keepdim=True) & (early_stopping is True)).float() * _NEG
        fin += (~may_improve).float() * _NEG
        just = ends & in_top[None, :]
        fin += (~just).float() * _NEG
        merged = torch.topk(torch.cat([f_scores, fin], 1), nb).indices
        f_seqs = _gather(torch.cat([f_seqs, cand], 1), merged)
        f_scores = _gather(torch.cat([f_scores, fin], 1), merged)
        f_full = _gather(torch.cat([f_full, just], 1), merged)
        f_len = _gather(torch.cat([f_len, torch.full_like(tok, step + 1)], 1), merged)

        # is_done: can the best running hypothesis still beat the worst finished one?
        n_new = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else step + 1
        best_possible = running[:, :1] / (n_new ** length_penalty)
        worst = torch.where(f_full, f_scores.min(1, keepdim=True).values, torch.full_like(f_scores, _NEG))
        may_improve &= (best_possible > worst).any(1, keepdim=True)
        searching = may_improve[:, 0] & ~(f_full.all(1) & (early_stopping is True))   # (b,)
        if not bool(searching.any()) or bool(ends.all()) or step + 1 == max_new_tokens:
            cache.reorder(src_rows)
            break
        if output_scores or bool(searching.all()):
            cache.reorder(src_rows)
        else:                                   # items that are done leave the work (they cannot change)
            if items is None:
                items = torch.arange(B, device=dev)
            done_seqs[items], done_scores[items], done_full[items], done_len[items] = f_seqs, f_scores, f_full, f_len
            left = searching.nonzero().squeeze(1)                      # (b',)
            rows = (left[:, None] * nb + torch.arange(nb, device=dev)).view(-1)
            cache.reorder(src_rows.index_select(0, rows))
            items = items.index_select(0, left)
            running, may_improve = running.index_select(0, left), may_improve.index_select(0, left)
            f_seqs, f_scores = f_seqs.index_select(0, left), f_scores.index_select(0, left)
            f_full, f_len = f_full.index_select(0, left), f_len.index_select(0, left)
            seqs, start = seqs.index_select(0, rows), start.index_select(0, rows)
            mask = None if mask is None else mask.index_select(0, rows)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        logits, cache = model(seqs[:, cur:cur + 1], cache=cache, attention_mask=mask)

    if items is None:
        done_seqs, done_scores, done_full, done_len = f_seqs, f_scores, f_full, f_len
    else:
        done_seqs[items], done_scores[items], done_full[items], done_len[items] = f_seqs, f_scores, f_full, f_len
    R = num_return_sequences
    out_len = P + int(done_len[:, :R].max())
    return done_seqs[:, :R].reshape(B * R, L)[:, :out_len], scores_out
