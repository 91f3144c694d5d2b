"""fastseq.generate: greedy search, sampling and beam search over a decoder with a cache (DESIGN.md §8).

The model protocol: ``cache = model.new_cache(batch_size, max_length)`` preallocates the
decoder's state; ``logits, cache = model(tokens, cache=cache, attention_mask=mask)`` runs the T
new tokens (B, T) -- the whole prompt first, then one token per step -- with mask None or
(B, cache.length + T) (1 = real token, 0 = left padding) and returns their logits (B, T, V);
``cache.reorder(index)`` makes row i the old row index[i] (beam search); an index shorter than
the batch drops the rows it does not name (greedy search and sampling drop the rows that emitted
an EOS, so finished rows leave the work; a cache must accept 1 <= len(index) <= its batch).

Encoder-decoder models (``model.is_encoder_decoder`` True, Hugging Face's flag) follow HF's
convention: input_ids and attention_mask are the sources, encoded once, and the decoder starts
from decoder_start_token_id; the sequences returned are the decoder's (the start token, then the
new tokens).  The protocol:
    memory = model.encode_for_generation(input_ids, attention_mask)   the B sources, once; the
        model takes the mask's padding side it can (1 = token) and rejects the rest
    cache = model.new_cache(N, max_length, memory)                    N = B * g decoder rows, the g
        rows of a source adjacent (its beams, or its samples); what the decoder reads of a source
        (cross-attention keys and values) is computed here, once per source, not per row
    logits, cache = model(tgt_in=tokens, cache=cache)                 the decoder on (N, T) new tokens
    cache.reorder(index)                                              as above
The search loops below see such a model through _EncodedSources, a decoder-only view of it.

Options have Hugging Face's names and meanings, with explicit defaults (top_k=0 means off;
HF's GenerationConfig hides top_k=50).  Differences from HF, on purpose: no_repeat_ngram_size
ignores left padding (HF's repetition penalty does too; its n-gram ban does not); sampling
draws from `generator` so a run is reproducible; pad_token_id=0 fills finished beams with 0 (HF's
beam search takes a pad of 0 for "no pad" and fills with the EOS); for an encoder-decoder
model, decoder_start_token_id has no default from the model's config, attention_mask None means
every source position is a token (HF derives a mask from pad_token_id), and there is no
decoder_input_ids (the decoder always starts from the one start token).  generate runs under
torch.no_grad and leaves the model's mode alone: call model.eval() first (dropout).
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .beam import beam_search
from .logits_processors import Processors


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"generate: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"generate: {name} must be a real number, got {value!r}")
    return float(value)


def _token_ids(name: str, value) -> Optional[List[int]]:
    if value is None:
        return None
    ids = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(ids, Tensor):
        ids = ids.flatten().tolist()
    if not isinstance(ids, Sequence) or len(ids) == 0 or \
            any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
        raise ValueError(f"generate: {name} must be a token id >= 0 or a non-empty list of them, got {value!r}")
    return [int(i) for i in ids]


def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False, num_beams: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, length_penalty: float = 1.0,
             early_stopping: Union[bool, str] = False, num_return_sequences: int = 1,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             streamer=None, output_scores: bool = False, generator: Optional[torch.Generator] = None,
             decoder_start_token_id: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """Continue each prompt of `input_ids` with up to `max_new_tokens` tokens (Hugging Face's
    names and meanings; every default explicit); for an encoder-decoder model, decode each source
    of `input_ids` from decoder_start_token_id.

    Args:
        model: a decoder with the cache protocol (model.new_cache(B, max_length),
            model(tokens, cache=cache, attention_mask=mask) -> (logits, cache), cache.reorder),
            or an encoder-decoder model (is_encoder_decoder; the module docstring's protocol).
        input_ids: the prompts, int64; for an encoder-decoder model, the sources.
        attention_mask: 1 = real token, 0 = left padding (None: all real); for an
            encoder-decoder model 1 = token, 0 = padding on a side its encoder takes.
        decoder_start_token_id (None): the token every decoder row starts from; required for an
            encoder-decoder model (HF reads a default from the model's config: pass it here, for
            fastseq's seq2seq models model.config.bos_id), rejected for a decoder-only one.
        max_new_tokens (20), min_new_tokens (0: EOS is banned until that many tokens are new).
        do_sample (False): greedy / beam search by score, or sampling from softmax(scores), after
            temperature (1.0), top_k (0 = off) and top_p (1.0 = off); draws use `generator`.
        num_beams (1): beam search when > 1, with length_penalty (1.0; finished hypotheses score
            sum log p / new_len ** length_penalty), early_stopping (False, True or "never", as
            HF's BeamHypotheses) and num_return_sequences <= num_beams best hypotheses per
            prompt.  With num_beams 1 and do_sample, num_return_sequences samples per prompt.
        repetition_penalty (1.0 = off), no_repeat_ngram_size (0 = off).
        eos_token_id (None; an int or a list): a row that emits one ends.  pad_token_id fills
            the rows that ended; when None it is the first EOS id (as HF, which warns).
        streamer: put(tokens) is called with the prompt (CPU) and then with each step's new
            tokens, end() once at the end (greedy search and sampling only, as HF).
        output_scores (False): also return the processed scores each step chose from (logits
            for greedy / sampling, log-probabilities for beam search).

    Returns:
        sequences: the prompts then the new tokens, the rows of one prompt adjacent (for an
        encoder-decoder model: the start token then the new tokens, P = 1); or (sequences,
        scores) with output_scores.

    Shapes:
        input_ids, attention_mask: (B, P) (sources: (B, S)); sequences: (B * num_return_sequences, P + new) int64,
        new <= max_new_tokens; scores: one (rows, V) fp32 tensor per step, rows = B (greedy,
        sampling: B * num_return_sequences) or B * num_beams (beam search); streamer tokens:
        (B, P) then (B,) per step.
    """
    encoder_decoder = getattr(model, "is_encoder_decoder", False) is True
    if encoder_decoder and not (callable(getattr(model, "encode_for_generation", None))
                                and callable(getattr(model, "new_cache", None))):
        raise ValueError(f"generate: the encoder-decoder model ({type(model).__name__}) needs encode_for_generation("
                         "input_ids, attention_mask) and new_cache(batch_size, max_length, memory)")
    if not callable(getattr(model, "new_cache", None)):
        raise ValueError(f"generate: the model ({type(model).__name__}) has no new_cache(batch_size, max_length)")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64 \
            or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError("generate: input_ids must be a non-empty (B, P) int64 tensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                         f"{list(getattr(input_ids, 'shape', []))}")
    B, P = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"generate: attention_mask must have input_ids' shape {list(input_ids.shape)}, got "
                             f"{list(getattr(attention_mask, 'shape', []))}")
        attention_mask = attention_mask.to(input_ids.device, torch.int64)
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("generate: attention_mask must hold only 0 and 1")
        if not encoder_decoder and ((attention_mask[:, 1:] < attention_mask[:, :-1]).any()
                                    or (attention_mask[:, -1] == 0).any()):
            raise ValueError("generate: attention_mask must be left padding (0s then 1s, the last position real)")
    if encoder_decoder:
        if decoder_start_token_id is None:
            raise ValueError(f"generate: decoder_start_token_id is required for an encoder-decoder model "
                             f"({type(model).__name__}): the token the decoder starts from (fastseq's seq2seq "
                             "models: model.config.bos_id)")
        start_ids = _token_ids("decoder_start_token_id", decoder_start_token_id)
        if len(start_ids) != 1:
            raise ValueError(f"generate: decoder_start_token_id must be one token id, got {decoder_start_token_id!r}")
    elif decoder_start_token_id is not None:
        raise ValueError(f"generate: decoder_start_token_id is for encoder-decoder models; {type(model).__name__} is "
                         f"a decoder (its prompt is input_ids), got decoder_start_token_id={decoder_start_token_id!r}")
    max_new_tokens = _int("max_new_tokens", max_new_tokens, 1)
    min_new_tokens = _int("min_new_tokens", min_new_tokens, 0)
    num_beams = _int("num_beams", num_beams, 1)
    num_return_sequences = _int("num_return_sequences", num_return_sequences, 1)
    top_k = _int("top_k", top_k, 0)
    no_repeat_ngram_size = _int("no_repeat_ngram_size", no_repeat_ngram_size, 0)
    temperature, top_p = _float("temperature", temperature), _float("top_p", top_p)
    repetition_penalty = _float("repetition_penalty", repetition_penalty)
    length_penalty = _float("length_penalty", length_penalty)
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate: do_sample must be True or False, got {do_sample!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
    if early_stopping not in (True, False, "never") or isinstance(early_stopping, (int, float)) \
            and not isinstance(early_stopping, bool):
        raise ValueError(f"generate: early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not do_sample and num_return_sequences > num_beams:
        raise ValueError(f"generate: num_return_sequences ({num_return_sequences}) must be <= num_beams "
                         f"({num_beams}) without sampling")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"generate: num_return_sequences ({num_return_sequences}) must be <= num_beams "
                         f"({num_beams}) in beam search")
    if streamer is not None:
        if num_beams > 1:
            raise ValueError(f"generate: a streamer works with greedy search and sampling, not num_beams={num_beams}")
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise ValueError(f"generate: streamer must have put() and end(), got {type(streamer).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
    eos_list = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is not None:
        pad_token_id = _token_ids("pad_token_id", pad_token_id)
        if len(pad_token_id) != 1:
            raise ValueError(f"generate: pad_token_id must be one token id, got {pad_token_id}")
        pad_token_id = pad_token_id[0]
    elif eos_list is not None:
        pad_token_id = eos_list[0]                       # as HF: rows that ended repeat the EOS
    eos = None if eos_list is None else torch.tensor(eos_list, dtype=torch.int64, device=input_ids.device)
    fill = 0 if pad_token_id is None else pad_token_id   # only ever written when eos is given

    min_keep = 1 if num_beams == 1 else 1 + (0 if eos is None else eos.numel())
    processors = Processors(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                            min_new_tokens=min_new_tokens, eos=eos, min_keep=min_keep)
    with torch.no_grad():
        if encoder_decoder:                              # encode once; the loops run the decoder
            model = _EncodedSources(model, model.encode_for_generation(input_ids, attention_mask))
            input_ids = torch.full((B, 1), start_ids[0], dtype=torch.int64, device=input_ids.device)
            attention_mask = None
        start = torch.zeros(B, dtype=torch.int64, device=input_ids.device) if attention_mask is None \
            else (attention_mask == 0).sum(1)           # index of each row's first real token
        if num_beams > 1:
            seqs, scores = beam_search(model, input_ids, attention_mask, start, num_beams=num_beams,
                                       max_new_tokens=max_new_tokens, processors=processors, eos=eos, fill=fill,
                                       length_penalty=length_penalty, early_stopping=early_stopping,
                                       num_return_sequences=num_return_sequences, do_sample=do_sample,
                                       generator=generator, output_scores=output_scores)
        else:
            seqs, scores = _greedy_or_sample(model, input_ids, attention_mask, start, max_new_tokens=max_new_tokens,
                                             processors=processors, eos=eos, pad=fill, do_sample=do_sample,
                                             num_return_sequences=num_return_sequences, streamer=streamer,
                                             generator=generator, output_scores=output_scores)
    return (seqs, scores) if output_scores else seqs


class _EncodedSources:
    """An encoder-decoder model's decoder, given B encoded sources, under the decoder-only
    protocol: new_cache(N, max_length) gives the model's cache of N = B * g rows over the B
    sources; a call runs the decoder on the new tokens (no decoder padding: mask always None)."""

    def __init__(self, model, memory):
        self.model, self.memory = model, memory

    def new_cache(self, batch_size: int, max_length: int):
        return self.model.new_cache(batch_size, max_length, self.memory)

    def __call__(self, tokens: Tensor, cache=None, attention_mask: Optional[Tensor] = None):
        return self.model(tgt_in=tokens, cache=cache)


def _greedy_or_sample(model, input_ids: Tensor, mask: Optional[Tensor], start: Tensor, *, max_new_tokens: int,
                      processors: Processors, eos: Optional[Tensor], pad: int, do_sample: bool,
                      num_return_sequences: int, streamer, generator, output_scores: bool):
    """The search loop of greedy search and sampling.  Rows that emit an EOS leave the work: the
    cache drops them (cache.reorder with the running rows) and later steps run the rest only
    (the scores returned with output_scores then cover every row, so then no row leaves)."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    R = num_return_sequences
    if R > 1:                                            # the samples of one prompt are adjacent rows
        input_ids, start = input_ids.repeat_interleave(R, 0), start.repeat_interleave(R, 0)
        mask = None if mask is None else mask.repeat_interleave(R, 0)
    N, P = input_ids.shape
    device = input_ids.device
    seqs = torch.full((N, P + max_new_tokens), pad, dtype=torch.int64, device=device)
    seqs[:, :P] = input_ids
    rows = None                                          # the running rows of seqs (None: all N)
    scores_out: List[Tensor] = []
    k_top = 0 if output_scores else processors.top_k_sampling()   # > 0: sample among the k best only

    cache = model.new_cache(N, P + max_new_tokens)
    logits, cache = model(input_ids, cache=cache, attention_mask=mask)
    running = torch.ones(N, dtype=torch.bool, device=device)    # output_scores: finished rows run on pad
    n = 0
    for step in range(max_new_tokens):
        cur = P + step
        held = seqs[:, :cur] if rows is None else seqs[:, :cur].index_select(0, rows)
        scores = processors(logits[:, -1].float(), held, start, step, top_k=not k_top)
        if output_scores:
            scores_out.append(scores)
        if not do_sample:
            tok = scores.argmax(-1)
        elif k_top:                                      # softmax over the k best, not the vocabulary
            best, ids = torch.topk(scores, min(k_top, scores.shape[-1]), dim=-1)
            tok = ids.gather(1, torch.multinomial(best.softmax(-1), 1, generator=generator)).squeeze(1)
        else:
            tok = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        leave = None
        if eos is not None:
            ended = torch.isin(tok, eos)
            if output_scores:
                tok = torch.where(running, tok, torch.full_like(tok, pad))
                running &= ~ended
                done = not bool(running.any())
            else:
                done = bool(ended.all())
                leave = ended if not done and bool(ended.any()) else None
        else:
            done = False
        if rows is None:
            seqs[:, cur] = tok
        else:
            seqs[rows, cur] = tok
        n = step + 1
        if streamer is not None:
            streamer.put(tok.cpu() if rows is None else seqs[:, cur].cpu())
        if n == max_new_tokens or done:
            break
        if leave is not None:                            # the rows that emitted an EOS leave the work
            keep = (~leave).nonzero().squeeze(1)
            cache.reorder(keep)
            rows = keep if rows is None else rows.index_select(0, keep)
            tok, start = tok.index_select(0, keep), start.index_select(0, keep)
            mask = None if mask is None else mask.index_select(0, keep)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        logits, cache = model(tok[:, None], cache=cache, attention_mask=mask)
    if streamer is not None:
        streamer.end()
    return seqs[:, :P + n], scores_out
