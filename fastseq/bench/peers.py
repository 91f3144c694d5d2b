"""The optional peers of fastseq.generate (issue #12): CTranslate2 and a plain torch loop, on the
weights of the model fastseq decodes.

- CTranslate2, GPT-2 (`ct2_gpt2`, `ct2_generate`): a Hugging Face GPT2LMHeadModel saved with
  save_pretrained beside a tokenizer made offline (a WordLevel vocabulary of made-up strings: "t<id>",
  and "<|endoftext|>" at the config's EOS id, or the last id, as BOS / EOS / UNK), converted with
  CTranslate2's TransformersConverter in fp32 and loaded as a ctranslate2.Generator.
- CTranslate2, seq2seq (`ct2_seq2seq`, `ct2_translate`): a ctranslate2.Translator holding the
  weights of a fastseq.models.TransformerSeq2Seq, built from TransformerSpec.from_config and
  filled from the model's state_dict.  The model's position table goes in as an explicit table:
  CTranslate2's built-in sinusoids are laid out otherwise (sin | cos halves, timescales
  10000^(-i / (E/2 - 1)), positions from 1), the model's are Vaswani's (sin, cos interleaved,
  10000^(-2i / E), positions from 0).
  `ct2_translate(..., stop_at_eos=False)` passes no end token: every row runs to max_len.
- `TorchLoopGPT2`: GPT-2 decoded with a preallocated KV cache the way a PyTorch user writes it
  (F.layer_norm, F.linear, F.scaled_dot_product_attention, tanh-GELU), on the HF model's weights.
- `TorchLoopLSTMSeq2Seq`: a fastseq.models.LSTMSeq2Seq decoded greedily the way a PyTorch user
  writes it: its encoder as a torch.nn.LSTM, its decoder as torch.nn.LSTMCell layers (the same
  weights loaded), input feeding and dot-product attention written out per step.

Each peer imports its package when first called and raises registry.Skipped ("skipped:
ctranslate2 is not installed ...") when it is missing.  Conversions are cached per process, per
model object (and thread count): after changing a model's weights, convert it again
(`ct2_gpt2(model, cache=False)`, `ct2_seq2seq(model, cache=False)`), which replaces the cached copy.

Matching conventions.  Greedy search and sampling agree with fastseq.generate exactly (sampling
only in distribution).  CTranslate2's beam search (Generator and Translator) agrees with Hugging
Face's (and fastseq's) when no hypothesis can end before max_new_tokens, i.e. without an EOS
(`eos_token_id=None` / `stop_at_eos=False` here, end_token=[] there): every step keeps the best
num_beams of num_beams x V continuations, and the result is the best sum of log-probabilities
(all lengths equal, so length_penalty cannot reorder).
With an EOS they differ by convention: CTranslate2 removes disabled tokens (min_length's EOS ban)
before the log-softmax, HF after it; CTranslate2 keeps every hypothesis that finished and stops an
item once num_beams of them did (as HF's early_stopping=True), or as soon as the best beam
finishes when length_penalty is 0; HF keeps the num_beams best and by default (early_stopping=False)
stops when no running beam can beat them.  (Both count the EOS in a hypothesis's length.)
"""
from __future__ import annotations

import importlib
import os
import tempfile
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Skipped

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {key: converted peer}


def require(module: str, pip_name: Optional[str] = None):
    """Import an optional package or raise Skipped saying it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skipped(f"skipped: {module} is not installed (pip install {pip_name or module})") from e


def _cached(model, key, build, cache: bool):
    per_model = _CACHE.setdefault(model, {})
    if not cache or key not in per_model:
        per_model[key] = build()
    return per_model[key]


def _threads(threads: Optional[int]) -> int:
    return torch.get_num_threads() if threads is None else int(threads)


def _pad_rows(rows: List[List[int]], width: int, pad: int) -> Tensor:
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


# ============================================================================ CTranslate2, GPT-2

class CT2GPT2:
    """A ctranslate2.Generator converted from a GPT2LMHeadModel, with its token strings."""

    def __init__(self, generator, tokens: List[str], eos_id: int):
        self.generator = generator
        self.tokens = tokens              # id -> the made-up string the CTranslate2 vocabulary holds
        self.eos_id = eos_id              # the vocabulary's EOS (also BOS and UNK)


def _gpt2_vocabulary(config) -> tuple:
    V = config.vocab_size
    eos = config.eos_token_id
    eos = eos if isinstance(eos, int) and 0 <= eos < V else V - 1
    return [("<|endoftext|>" if i == eos else f"t{i}") for i in range(V)], eos


def _convert_gpt2(hf_model, threads: int) -> CT2GPT2:
    ctranslate2 = require("ctranslate2")
    require("tokenizers")
    transformers = require("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokens, eos = _gpt2_vocabulary(hf_model.config)
    special = tokens[eos]
    with tempfile.TemporaryDirectory(prefix="fastseq-ct2-") as d:
        hf_dir, ct2_dir = os.path.join(d, "hf"), os.path.join(d, "ct2")
        hf_model.save_pretrained(hf_dir)
        tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=special))
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                             unk_token=special).save_pretrained(hf_dir)
        ctranslate2.converters.TransformersConverter(hf_dir).convert(ct2_dir, quantization="float32", force=True)
        generator = ctranslate2.Generator(ct2_dir, device="cpu", intra_threads=threads, inter_threads=1)
    return CT2GPT2(generator, tokens, eos)                # the Generator holds the weights in memory


def ct2_gpt2(hf_model, threads: Optional[int] = None, cache: bool = True) -> CT2GPT2:
    """CTranslate2's Generator (fp32, CPU) on a Hugging Face GPT-2's weights, converted once per
    process and model (and thread count).

    Args:
        hf_model: a transformers.GPT2LMHeadModel.
        threads: CTranslate2's intra_threads (None: torch.get_num_threads()).
        cache: reuse this process's conversion of the same model object; False: convert
            anew (the weights changed) and keep that one.

    Returns:
        a CT2GPT2 (.generator, .tokens: id -> vocabulary string, .eos_id).

    Raises:
        Skipped: ctranslate2 or tokenizers is not installed.
    """
    threads = _threads(threads)
    return _cached(hf_model, ("gpt2", threads), lambda: _convert_gpt2(hf_model, threads), cache)


def ct2_generate(hf_model, prompts: Tensor, max_new_tokens: int, *, num_beams: int = 1, top_k: int = 1,
                 temperature: float = 1.0, length_penalty: float = 1.0, eos_token_id: Optional[int] = None,
                 min_new_tokens: int = 0, pad_token_id: Optional[int] = None,
                 threads: Optional[int] = None) -> Tensor:
    """Continue equal-length prompts with CTranslate2's Generator on hf_model's weights: greedy
    (top_k=1), top-k sampling (top_k > 1, softmax(logits / temperature) over the k best) or beam
    search (num_beams > 1, finished hypotheses scored sum log p / length ** length_penalty).

    Args:
        hf_model: a transformers.GPT2LMHeadModel (converted once: ct2_gpt2).
        prompts: the prompt token ids, no padding.
        max_new_tokens: tokens to generate (CTranslate2's max_length with include_prompt_in_result=False).
        num_beams, top_k, temperature, length_penalty: CTranslate2's beam_size, sampling_topk,
            sampling_temperature, length_penalty.
        eos_token_id: None: no end token (end_token=[]), every row runs to max_new_tokens; an id:
            a row ends at it (kept in the output, as fastseq.generate), banned for the first
            min_new_tokens tokens (min_length).
        pad_token_id: fills the rows that ended (None: eos_token_id).
        threads: as ct2_gpt2.
        Sampling draws from CTranslate2's per-thread generator, seeded once per worker thread at
        its first draw (ctranslate2.set_random_seed before that), so a call cannot be replayed.

    Returns:
        the new tokens, int64, rows that ended padded.

    Shapes:
        prompts: (B, P); returns (B, max_new_tokens) without an EOS, else (B, longest row).
    """
    if not isinstance(prompts, Tensor) or prompts.dim() != 2 or prompts.numel() == 0:
        raise ValueError(f"ct2_generate: prompts must be a non-empty (B, P) tensor of token ids, got "
                         f"{type(prompts).__name__} of shape {list(getattr(prompts, 'shape', []))}")
    m = ct2_gpt2(hf_model, threads)
    start = [[m.tokens[i] for i in row] for row in prompts.tolist()]
    results = m.generator.generate_batch(
        start, max_length=max_new_tokens, min_length=min_new_tokens if eos_token_id is not None else 0,
        end_token=[] if eos_token_id is None else [int(eos_token_id)], return_end_token=True,
        include_prompt_in_result=False, beam_size=num_beams, patience=1, num_hypotheses=1,
        length_penalty=length_penalty, sampling_topk=top_k, sampling_temperature=temperature)
    rows = [r.sequences_ids[0] for r in results]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    return _pad_rows(rows, max(len(r) for r in rows), pad)


# ============================================================================ CTranslate2, seq2seq

_ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_tanh": "GELUTanh", "silu": "SWISH"}


class CT2Seq2Seq:
    """A ctranslate2.Translator holding a TransformerSeq2Seq's weights, with its token strings."""

    def __init__(self, translator, tokens: List[str], pad_id: int):
        self.translator = translator
        self.tokens = tokens                              # id -> made-up vocabulary string
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.pad_id = pad_id


def _seq2seq_vocabulary(c) -> List[str]:
    names = {c.pad_id: "<pad>", c.bos_id: "<s>", c.eos_id: "</s>"}
    return [names.get(i, f"w{i}") for i in range(c.vocab_size)]


def _seq2seq_spec(model):
    """TransformerSpec filled from the model's state_dict (torch.nn Transformer layer keys)."""
    ctranslate2 = require("ctranslate2")
    from ctranslate2.specs import common_spec, transformer_spec

    c = model.config
    E = c.dim
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    spec = transformer_spec.TransformerSpec.from_config(
        (c.encoder_layers, c.decoder_layers), c.heads, pre_norm=c.norm_first,
        activation=getattr(common_spec.Activation, _ACTIVATIONS[c.activation]))
    positions = model.positions.detach().cpu().float().numpy()       # (max_positions, E), row p = position p

    def norm(s, prefix):
        s.gamma, s.beta = sd[prefix + ".weight"], sd[prefix + ".bias"]

    def linear(s, prefix, rows=slice(None)):
        w = sd.get(prefix + ".weight", sd.get(prefix + "_weight"))
        b = sd.get(prefix + ".bias", sd.get(prefix + "_bias"))
        s.weight = w[rows]
        if b is not None:
            s.bias = b[rows]

    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = sd["encoder_embed.weight"]
    dec.embeddings.weight = sd["decoder_embed.weight"]
    enc.scale_embeddings = dec.scale_embeddings = True                # x sqrt(E)
    enc.position_encodings.encodings = positions
    dec.position_encodings.encodings = positions
    dec.projection.weight = sd["output_proj.weight"] if "output_proj.weight" in sd else sd["decoder_embed.weight"]
    for i, s in enumerate(enc.layer):
        p = f"encoder_layers.{i}."
        norm(s.self_attention.layer_norm, p + "norm1")
        linear(s.self_attention.linear[0], p + "self_attn.in_proj")                  # q, k, v stacked (3E, E)
        linear(s.self_attention.linear[1], p + "self_attn.out_proj")
        norm(s.ffn.layer_norm, p + "norm2")
        linear(s.ffn.linear_0, p + "linear1")
        linear(s.ffn.linear_1, p + "linear2")
    for i, s in enumerate(dec.layer):
        p = f"decoder_layers.{i}."
        norm(s.self_attention.layer_norm, p + "norm1")
        linear(s.self_attention.linear[0], p + "self_attn.in_proj")
        linear(s.self_attention.linear[1], p + "self_attn.out_proj")
        norm(s.attention.layer_norm, p + "norm2")
        linear(s.attention.linear[0], p + "multihead_attn.in_proj", slice(0, E))      # q (E, E)
        linear(s.attention.linear[1], p + "multihead_attn.in_proj", slice(E, None))   # k, v stacked (2E, E)
        linear(s.attention.linear[2], p + "multihead_attn.out_proj")
        norm(s.ffn.layer_norm, p + "norm3")
        linear(s.ffn.linear_0, p + "linear1")
        linear(s.ffn.linear_1, p + "linear2")
    if c.norm_first:
        norm(enc.layer_norm, "encoder_norm")
        norm(dec.layer_norm, "decoder_norm")

    tokens = _seq2seq_vocabulary(c)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    cfg = spec.config
    cfg.bos_token, cfg.eos_token, cfg.decoder_start_token = "<s>", "</s>", "<s>"
    cfg.unk_token = "<pad>"               # the model has no UNK; CTranslate2 needs one in the vocabulary
    cfg.add_source_bos = cfg.add_source_eos = False
    cfg.layer_norm_epsilon = c.layer_norm_eps
    return ctranslate2, spec, tokens


def _convert_seq2seq(model, threads: int) -> CT2Seq2Seq:
    ctranslate2, spec, tokens = _seq2seq_spec(model)
    spec.validate()
    spec.optimize(quantization=None)                      # aliases tied weights; stays fp32
    with tempfile.TemporaryDirectory(prefix="fastseq-ct2-") as d:
        spec.save(d)
        translator = ctranslate2.Translator(d, device="cpu", intra_threads=threads, inter_threads=1)
    return CT2Seq2Seq(translator, tokens, model.config.pad_id)


def ct2_seq2seq(model, threads: Optional[int] = None, cache: bool = True) -> CT2Seq2Seq:
    """CTranslate2's Translator (fp32, CPU) holding a TransformerSeq2Seq's weights, built once per
    process and model (and thread count).

    Args:
        model: a fastseq.models.TransformerSeq2Seq (post- or pre-norm, shared / tied embeddings).
        threads: CTranslate2's intra_threads (None: torch.get_num_threads()).
        cache: reuse this process's conversion of the same model object; False: convert
            anew (the weights changed) and keep that one.

    Returns:
        a CT2Seq2Seq (.translator, .tokens: id -> vocabulary string, .ids, .pad_id).

    Raises:
        Skipped: ctranslate2 is not installed.
    """
    threads = _threads(threads)
    return _cached(model, ("seq2seq", threads), lambda: _convert_seq2seq(model, threads), cache)


def ct2_translate(model, src: Tensor, src_lengths: Tensor, max_len: int, *, num_beams: int = 1,
                  length_penalty: float = 1.0, stop_at_eos: bool = True, threads: Optional[int] = None) -> Tensor:
    """Decode each source with CTranslate2's Translator on the model's weights, from bos_id to
    eos_id or max_len tokens, in TransformerSeq2Seq.greedy_decode's output form.

    Args:
        model: a fastseq.models.TransformerSeq2Seq (converted once: ct2_seq2seq).
        src: right-padded sources; src_lengths: their lengths.
        max_len: at most this many tokens per row, eos_id included.
        num_beams: 1: greedy search (the same tokens as model.greedy_decode); > 1: CTranslate2's
            beam search with length_penalty (finished hypotheses: sum log p / length ** penalty).
        stop_at_eos: True: a row ends at eos_id; False: no end token (end_token=[]), eos_id is a
            token like any other and every row runs to max_len (fastseq.generate with
            eos_token_id=None: then beam search agrees too, see the module docstring).
        threads: as ct2_seq2seq.

    Returns:
        each row's tokens ending at its eos_id (kept) with pad_id after it, int64.

    Shapes:
        src: (B, S); src_lengths: (B,); returns (B, L), L <= max_len the longest row (L = max_len
        without stop_at_eos).
    """
    m = ct2_seq2seq(model, threads)
    source = [[m.tokens[t] for t in row[:n]] for row, n in zip(src.tolist(), src_lengths.tolist())]
    results = m.translator.translate_batch(
        source, beam_size=num_beams, patience=1, num_hypotheses=1, length_penalty=length_penalty,
        max_decoding_length=max_len, min_decoding_length=0, max_input_length=0, return_end_token=True,
        end_token=None if stop_at_eos else [])
    rows = [[m.ids[t] for t in r.hypotheses[0]] for r in results]
    return _pad_rows(rows, max(1, max(len(r) for r in rows)), m.pad_id)


# ============================================================================ a plain torch loop

class TorchLoopGPT2:
    """GPT-2 decoded with a preallocated KV cache, written the way a PyTorch user writes it, on a
    Hugging Face GPT2LMHeadModel's weights (its Conv1D weights are (in, out): transposed once)."""

    def __init__(self, hf_model):
        c = hf_model.config
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        self.E, self.NH, self.eps = c.n_embd, c.n_head, c.layer_norm_epsilon
        self.wte, self.wpe = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
        self.head = sd.get("lm_head.weight", self.wte)                       # (V, E), tied
        self.ln_f = (sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])

        def lin(k):                                                          # Conv1D -> F.linear's (out, in)
            return sd[k + ".weight"].t().contiguous(), sd[k + ".bias"]
        self.layers = [dict(ln_1=(sd[f"transformer.h.{i}.ln_1.weight"], sd[f"transformer.h.{i}.ln_1.bias"]),
                            ln_2=(sd[f"transformer.h.{i}.ln_2.weight"], sd[f"transformer.h.{i}.ln_2.bias"]),
                            qkv=lin(f"transformer.h.{i}.attn.c_attn"), proj=lin(f"transformer.h.{i}.attn.c_proj"),
                            fc=lin(f"transformer.h.{i}.mlp.c_fc"), out=lin(f"transformer.h.{i}.mlp.c_proj"))
                       for i in range(c.n_layer)]

    def step(self, tokens: Tensor, pos: int, kv: List[Tensor]) -> Tensor:
        """tokens (B, T) at positions pos.. -> logits of the last one (B, V); writes K / V at pos.."""
        B, T = tokens.shape
        E, NH = self.E, self.NH
        x = self.wte[tokens] + self.wpe[pos:pos + T]                                  # (B, T, E)
        for L, (k_cache, v_cache) in zip(self.layers, kv):
            h = F.layer_norm(x, (E,), *L["ln_1"], self.eps)
            q, k, v = F.linear(h, *L["qkv"]).view(B, T, 3, NH, E // NH).permute(2, 0, 3, 1, 4)   # 3 x (B, NH, T, D)
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            a = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + T], v_cache[:, :, :pos + T], is_causal=T > 1)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, E), *L["proj"])        # (B, T, E)
            h = F.layer_norm(x, (E,), *L["ln_2"], self.eps)
            x = x + F.linear(F.gelu(F.linear(h, *L["fc"]), approximate="tanh"), *L["out"])
        return F.linear(F.layer_norm(x[:, -1], (E,), *self.ln_f, self.eps), self.head)   # (B, V)

    @torch.no_grad()
    def generate(self, prompts: Tensor, max_new_tokens: int, top_k: int = 0, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy decoding (top_k 0), or sampling from softmax(logits / temperature) over the top_k
        best tokens, of equal-length prompts; no EOS (every row runs to max_new_tokens).

        Args:
            prompts: token ids, no padding; max_new_tokens: tokens to add; generator: for sampling.

        Returns:
            the new tokens, int64.

        Shapes:
            prompts: (B, P) -> (B, max_new_tokens).
        """
        B, P = prompts.shape
        shape = (B, self.NH, P + max_new_tokens, self.E // self.NH)                  # (B, NH, L, D)
        kv = [(self.wte.new_empty(shape), self.wte.new_empty(shape)) for _ in self.layers]   # K, V per layer
        out = prompts.new_empty(B, max_new_tokens)
        tokens, pos = prompts, 0
        for t in range(max_new_tokens):
            logits = self.step(tokens, pos, kv)                                       # (B, V)
            pos += tokens.shape[1]
            if top_k:
                best, idx = logits.topk(top_k, dim=-1)                                # (B, k)
                pick = torch.multinomial(F.softmax(best / temperature, dim=-1), 1, generator=generator)
                out[:, t] = idx.gather(1, pick).squeeze(1)
            else:
                out[:, t] = logits.argmax(-1)
            tokens = out[:, t:t + 1]
        return out


# ============================================================================ a plain torch loop, LSTM seq2seq

class TorchLoopLSTMSeq2Seq:
    """fastseq.models.LSTMSeq2Seq (fairseq's `lstm`: bidirectional encoder, LSTMCell decoder with
    input feeding and dot-product attention) decoded greedily the way a PyTorch user writes it, on
    the model's weights: torch.nn.LSTM over the packed source, torch.nn.LSTMCell layers, and per
    step the attention of fairseq's AttentionLayer, q = W_a h, s = enc . q (pads -inf),
    context = softmax(s) enc, a = tanh(W_c [context; h]), logits = W_out a, argmax."""

    def __init__(self, model):
        c = model.config
        E, H, L = c.dim, c.hidden, c.layers
        self.encoder = torch.nn.LSTM(E, H // 2, L, batch_first=True, bidirectional=True).eval()
        self.encoder.load_state_dict(model.encoder.state_dict())                  # torch.nn.LSTM's keys
        self.cells = []
        for i, src_cell in enumerate(model.decoder_cells):
            cell = torch.nn.LSTMCell(2 * E if i == 0 else H, H).eval()
            cell.load_state_dict(src_cell.state_dict())
            self.cells.append(cell)
        for p in [*self.encoder.parameters(), *(p for cell in self.cells for p in cell.parameters())]:
            p.requires_grad_(False)
        self.src_embed = model.encoder_embed.weight.detach()                      # (V, E)
        self.tgt_embed = model.decoder_embed.weight.detach()                      # (V, E)
        self.w_a = model.attention_proj.weight.detach()                           # (H, H)
        self.w_c = model.attention_out.weight.detach()                            # (E, 2H), context columns first
        self.w_out = model.output_weight.detach()                                 # (V, E)
        self.E, self.bos_id = E, c.bos_id

    @torch.no_grad()
    def generate(self, src: Tensor, src_lengths: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding of right-padded sources from bos_id, no EOS (every row runs to
        max_new_tokens).

        Args:
            src: the source token ids, right-padded; src_lengths: their lengths.
            max_new_tokens: tokens to generate.

        Returns:
            the new tokens (the start token left out), int64.

        Shapes:
            src: (B, S); src_lengths: (B,); returns (B, max_new_tokens).
        """
        if not isinstance(src, Tensor) or src.dim() != 2 or src.numel() == 0:
            raise ValueError(f"TorchLoopLSTMSeq2Seq.generate: src must be a non-empty (B, S) tensor of token ids, "
                             f"got shape {list(getattr(src, 'shape', []))}")
        B, S = src.shape
        L = len(self.cells)
        x = F.embedding(src, self.src_embed)                                     # (B, S, E)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = self.encoder(packed)                                    # h_n, c_n (2 L, B, H/2)
        enc = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=S)[0]   # (B, S, H)
        pads = torch.arange(S, device=src.device).view(1, S) >= src_lengths.to(src.device).view(B, 1)   # (B, S)
        hs = [torch.cat((h_n[2 * i], h_n[2 * i + 1]), 1) for i in range(L)]      # (B, H): [forward; backward]
        cs = [torch.cat((c_n[2 * i], c_n[2 * i + 1]), 1) for i in range(L)]
        feed = enc.new_zeros(B, self.E)                                           # (B, E): a_0
        tok = torch.full((B,), self.bos_id, dtype=torch.int64, device=src.device)
        new = torch.empty(B, max_new_tokens, dtype=torch.int64, device=src.device)
        for t in range(max_new_tokens):
            h = torch.cat((F.embedding(tok, self.tgt_embed), feed), 1)           # (B, 2E): input feeding
            for i, cell in enumerate(self.cells):
                hs[i], cs[i] = cell(h, (hs[i], cs[i]))
                h = hs[i]                                                         # (B, H)
            q = F.linear(h, self.w_a)                                             # (B, H)
            s = torch.bmm(enc, q.unsqueeze(2)).squeeze(2).masked_fill_(pads, float("-inf"))   # (B, S)
            context = torch.bmm(torch.softmax(s, -1).unsqueeze(1), enc).squeeze(1)          # (B, H)
            feed = torch.tanh(F.linear(torch.cat((context, h), 1), self.w_c))     # (B, E)
            tok = F.linear(feed, self.w_out).argmax(-1)                           # (B,)
            new[:, t] = tok
        return new
