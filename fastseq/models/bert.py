"""BERT: a post-norm Transformer encoder pre-trained as a masked language model.

Devlin, Chang, Lee and Toutanova, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding" (NAACL 2019), in the shape of the original release:

    x      = LayerNorm(token(tokens) + position(0..T-1) + segment(segments)),  dropout
    x      = post-norm encoder layers (self-attention, GELU feed-forward, LayerNorm after each
             residual add; eps 1e-12)
    logits = LayerNorm(gelu(dense(x))) token^T + bias            the MLM head, tied to the embedding

Padding sits at the end of each row, given by `lengths` (B,).  The layers run on the real tokens
only (fastseq.models.packing): the projections, feed-forward blocks, norms and dropouts on the
N = sum(lengths) real rows, attention on the padded layout with per-row key lengths (padded keys
skipped).  A padded position is never computed (encode() returns zeros there, and a target there
is ignored) and never changes the others' outputs.

The masked-LM objective (mask_tokens): 15% of the non-special, non-pad positions are chosen; of
those 80% become [MASK], 10% a random token, 10% stay; the loss is the cross-entropy at the
chosen positions only.  loss() gathers those rows before the head, so the head (a dense layer, a
norm and the V-way output fused into the loss) runs on ~15% of the tokens, and the (N, V) logits
are never formed (fastseq.functional.linear_cross_entropy).

Batch keys (loss, example_batch):
    "tokens"   (B, T) long  masked inputs (pad_id after each row's length)
    "targets"  (B, T) long  the original token at the chosen positions, -100 elsewhere
    "segments" (B, T) long  optional, sentence A / B ids in [0, type_vocab_size) (default all 0)
    "lengths"  (B,)   long  optional, tokens before the padding of each row (default T)
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as FF
from .. import nn as fnn
from . import packing
from .packing import Rows

IGNORE = -100


# ============================================================================ config

def _positive_int(name, value, where="BERTConfig"):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


def _token_id(name, value, vocab_size):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"BERTConfig: {name} must be a token id in [0, vocab_size={vocab_size}), got {value!r}")


@dataclass
class BERTConfig:
    """BERT's sizes and recipe (defaults: BERT-base, uncased WordPiece vocabulary).

    ffn_dim None means 4 * dim; mask_id None means vocab_size - 1 (BERT's vocabulary has it at 103).
    dropout applies to the embeddings, the attention probabilities and the residual branches, as
    BERT's hidden_dropout_prob = attention_probs_dropout_prob, and also to the feed-forward hidden
    layer, where torch.nn.TransformerEncoderLayer puts one (BERT's release has none there).
    """
    vocab_size: int = 30522
    max_positions: int = 512
    dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: Optional[int] = None
    dropout: float = 0.1
    type_vocab_size: int = 2
    pad_id: int = 0
    mask_id: Optional[int] = None
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "max_positions", "dim", "layers", "heads", "type_vocab_size"):
            _positive_int(name, getattr(self, name))
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        _positive_int("ffn_dim", self.ffn_dim)
        if self.dim % self.heads:
            raise ValueError(f"BERTConfig: dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BERTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.vocab_size < 2:
            raise ValueError(f"BERTConfig: vocab_size must hold at least pad and mask (>= 2), got {self.vocab_size}")
        _token_id("pad_id", self.pad_id, self.vocab_size)
        if self.mask_id is None:
            self.mask_id = self.vocab_size - 1
        _token_id("mask_id", self.mask_id, self.vocab_size)
        if self.mask_id == self.pad_id:
            raise ValueError(f"BERTConfig: mask_id must differ from pad_id, got both {self.pad_id}")
        for name in ("layer_norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"BERTConfig: {name} must be a positive float, got {v!r}")


# ============================================================================ masking

def mask_tokens(tokens: Tensor, lengths: Optional[Tensor], vocab_size: int, mask_id: int,
                special_ids: Sequence[int] = (), probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption, as a pure function (tokens is not modified).

    Each position before its row's length whose token is not in special_ids is chosen with
    `probability`; a chosen position becomes mask_id with probability 0.8, a token drawn uniformly
    from [0, vocab_size) with probability 0.1, and stays as it was otherwise.  If no position of the
    whole batch is chosen (tiny batches), the eligible position with the smallest draw is, so the
    loss is defined.  All draws come from `generator` (torch's default one when None), so a seeded
    generator reproduces the batch.

    Args:
        tokens: (B, T) int64 token ids; lengths: (B,) ints (positions >= length are padding and
            never chosen) or None (no padding); vocab_size: random replacements' range;
        mask_id: the [MASK] id; special_ids: ids never chosen ([CLS], [SEP], pad...);
        probability: the chosen fraction, in [0, 1]; generator: a torch.Generator or None.
    Returns:
        (inputs, targets): inputs (B, T) the corrupted tokens; targets (B, T) the original token
        at the chosen positions and -100 elsewhere.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"mask_tokens: expected tokens of shape (B, T) and dtype int64, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
                         f"{'' if not isinstance(tokens, Tensor) else ' ' + str(tokens.dtype)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"mask_tokens: vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_tokens: mask_id must be in [0, vocab_size={vocab_size}), got {mask_id!r}")
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask_tokens: probability must be in [0, 1], got {probability!r}")
    B, T = tokens.shape
    device = tokens.device
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    if lengths is not None and B:
        _check_lengths("mask_tokens", lengths, B, T, minimum=0)
        eligible &= torch.arange(T, device=device).view(1, T) < lengths.to(device).view(B, 1)
    for s in special_ids:
        eligible &= tokens != int(s)
    gen_device = generator.device if generator is not None else device
    u = torch.rand(B, T, generator=generator, device=gen_device).to(device)          # chosen if < probability
    how = torch.rand(B, T, generator=generator, device=gen_device).to(device)        # 80 / 10 / 10 split
    rnd = torch.randint(vocab_size, (B, T), generator=generator, device=gen_device).to(device)
    chosen = eligible & (u < probability)
    if probability > 0 and not bool(chosen.any()) and bool(eligible.any()):
        chosen.view(-1)[u.masked_fill(~eligible, 2.0).argmin()] = True
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), rnd, inputs)
    targets = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    return inputs, targets


def _check_lengths(where, lengths, B, T, minimum=1) -> int:
    """Checks (B,) integer lengths in [minimum, T]; returns the shortest."""
    if not isinstance(lengths, Tensor) or lengths.shape != (B,) or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool:
        raise ValueError(f"{where}: expected integer lengths of shape ({B},), got "
                         f"{tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__}"
                         f"{' ' + str(lengths.dtype) if isinstance(lengths, Tensor) else ''}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < minimum or hi > T:
        raise ValueError(f"{where}: lengths must lie in [{minimum}, T={T}], got values in [{lo}, {hi}]")
    return lo


# ============================================================================ blocks

class Embeddings(nn.Module):
    """token + learned position + segment embeddings, summed and normalized, then dropout."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        E = config.dim
        self.token = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_id)
        self.position = nn.Embedding(config.max_positions, E)
        self.segment = nn.Embedding(config.type_vocab_size, E)
        self.norm = fnn.LayerNorm(E, eps=config.layer_norm_eps)
        self.p = config.dropout

    def forward(self, tokens: Tensor, positions: Tensor, segments: Optional[Tensor] = None) -> Tensor:
        """tokens, positions, segments: (N,) of the real tokens -> (N, E)."""
        E = self.token.embedding_dim
        seg = self.segment.weight[0] if segments is None else self.segment(segments)          # (E,) or (N, E)
        rest = self.position(positions) + seg                                              # (N, E)
        x = FF.add_layer_norm(self.token(tokens), rest, (E,), self.norm.weight, self.norm.bias, self.norm.eps)
        return FF.dropout(x, self.p, self.training)                                        # (N, E)


class MLMHead(nn.Module):
    """The masked-LM transform LayerNorm(gelu(dense(x))); the output layer is the token embedding
    (passed in) with this module's own bias."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.norm = fnn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, x: Tensor) -> Tensor:
        h = FF.bias_act_dropout(F.linear(x, self.dense.weight), self.dense.bias, "gelu", 0.0, False)   # (*, E)
        return self.norm(h)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialization: normal(0, std) weights for every Linear, Embedding and attention
    input projection, zero biases (the padding row of embeddings too), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            nn.init.normal_(m.in_proj_weight, 0.0, std)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, MLMHead):
            nn.init.zeros_(m.bias)


# ============================================================================ the model

class BERT(nn.Module):
    """BERT with its masked-LM head (module docstring).

    State dict: embeddings.{token,position,segment}.weight, embeddings.norm.*, layers.<i>.* (torch's
    TransformerEncoderLayer keys), head.dense.*, head.norm.*, head.bias; the output weight is
    embeddings.token.weight.
    """

    def __init__(self, config: BERTConfig):
        super().__init__()
        if not isinstance(config, BERTConfig):
            raise ValueError(f"BERT: expected a BERTConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(
            fnn.TransformerEncoderLayer(config.dim, config.heads, config.ffn_dim, config.dropout, activation="gelu",
                                        layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=False)
            for _ in range(config.layers))
        self.head = MLMHead(config)
        init_bert_weights(self, config.init_std)

    def encode_rows(self, tokens: Tensor, segments: Optional[Tensor] = None,
                    lengths: Optional[Tensor] = None) -> Tuple[Tensor, Rows]:
        """The encoder's outputs at the real tokens only, (N, E), and where they sit (packing.Rows):
        every layer but attention runs on the N = sum(lengths) real rows."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"BERT: expected tokens of shape (B, T), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        B, T = tokens.shape
        if T > self.config.max_positions:
            raise ValueError(f"BERT: sequence length {T} exceeds max_positions={self.config.max_positions}")
        if segments is not None and segments.shape != tokens.shape:
            raise ValueError(f"BERT: expected segments of the tokens' shape {tuple(tokens.shape)}, got "
                             f"{tuple(segments.shape)}")
        if lengths is not None and B:
            _check_lengths("BERT", lengths, B, T)
        rows = Rows(lengths, B, T, tokens.device)
        x = self.embeddings(rows.pack(tokens), rows.positions(),
                            None if segments is None else rows.pack(segments))          # (N, E)
        for layer in self.layers:
            x = packing.encoder_layer(layer, x, rows, "gelu")                           # (N, E)
        return x, rows

    def encode(self, tokens: Tensor, segments: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        """The encoder's output (B, T, E), zeros at the padded positions."""
        x, rows = self.encode_rows(tokens, segments, lengths)
        return rows.unpack(x)                                                           # (B, T, E)

    def forward(self, tokens: Tensor, segments: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        """MLM logits.

        Args:
            tokens: (B, T) int64; segments: (B, T) int64 in [0, type_vocab_size) or None (all 0);
            lengths: (B,) ints in [1, T] (padding after them) or None.
        Returns:
            logits (B, T, V).
        """
        h = self.head.transform(self.encode(tokens, segments, lengths))           # (B, T, E)
        return F.linear(h, self.embeddings.token.weight, self.head.bias)          # (B, T, V)

    def loss(self, batch: dict, label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        """Mean masked-LM cross-entropy over the positions whose target is not -100.

        Args:
            batch: the module docstring's keys; label_smoothing, smoothing: as
                fastseq.functional.cross_entropy ("torch" or "fairseq" convention).
        Returns:
            The scalar loss (NaN if no target is set, as torch's mean over nothing).
        """
        tokens, targets = _batch_tensors(batch)
        h, rows = self.encode_rows(tokens, batch.get("segments"), batch.get("lengths"))   # (N, E)
        flat = rows.pack(targets)                                                  # (N,)
        chosen = (flat != IGNORE).nonzero().squeeze(1)                             # (M,)
        h = h.index_select(0, chosen)                                              # (M, E)
        return FF.linear_cross_entropy(self.head.transform(h), self.embeddings.token.weight, flat[chosen],
                                       linear_bias=self.head.bias, ignore_index=IGNORE,
                                       label_smoothing=label_smoothing, smoothing=smoothing)


def _batch_tensors(batch) -> Tuple[Tensor, Tensor]:
    if not isinstance(batch, dict) or "tokens" not in batch or "targets" not in batch:
        raise ValueError(f"BERT.loss: expected a dict with 'tokens' and 'targets', got "
                         f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
    tokens, targets = batch["tokens"], batch["targets"]
    if targets.shape != tokens.shape:
        raise ValueError(f"BERT.loss: expected targets of the tokens' shape {tuple(tokens.shape)}, got "
                         f"{tuple(targets.shape)}")
    return tokens, targets


def example_batch(config: BERTConfig, B: int, T: int, generator: Optional[torch.Generator] = None,
                  device="cpu") -> dict:
    """A random masked-LM batch of the documented form: tokens other than pad / mask, row 0 of
    length T and the others of random length in [max(1, T // 2), T], two segments per row (when
    type_vocab_size > 1), masked by mask_tokens."""
    _positive_int("B", B, "example_batch")
    _positive_int("T", T, "example_batch")
    V = config.vocab_size
    specials = sorted({config.pad_id, config.mask_id})
    if V <= len(specials):
        raise ValueError(f"example_batch: vocab_size={V} leaves no token besides pad and mask")
    if T > config.max_positions:
        raise ValueError(f"example_batch: T={T} exceeds max_positions={config.max_positions}")
    gdev = generator.device if generator is not None else "cpu"
    tokens = torch.randint(V - len(specials), (B, T), generator=generator, device=gdev)
    for s in specials:                                         # skip the special ids
        tokens += (tokens >= s).long()
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=generator, device=gdev)
    lengths[0] = T
    split = (torch.rand(B, generator=generator, device=gdev) * lengths).long().clamp(min=1)     # (B,)
    pos = torch.arange(T, device=gdev).view(1, T)
    tokens = tokens.masked_fill(pos >= lengths.view(B, 1), config.pad_id)
    segments = ((pos >= split.view(B, 1)) & (pos < lengths.view(B, 1))).long()
    if config.type_vocab_size < 2:
        segments.zero_()
    inputs, targets = mask_tokens(tokens, lengths, V, config.mask_id, special_ids=(config.pad_id,),
                                  generator=generator)
    return {k: v.to(device) for k, v in
            {"tokens": inputs, "targets": targets, "segments": segments, "lengths": lengths}.items()}
