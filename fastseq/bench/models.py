"""Benchmark cases of end-to-end training (issue #9): a model built from torch.nn, and the same
model passed through fastseq.convert, trained step by step on the same batch.

Two models, both E = 512, 8 heads, feed-forward 2048, GELU, vocabulary 8192, random weights:

- GPT-style (GPT-2 shaped, decoder-only): token + learned positional embedding, nn.Dropout(p) on
  their sum, 6 pre-norm nn.TransformerEncoderLayer's (norm_first=True) run causally (the square
  subsequent mask and is_causal=True), a final nn.LayerNorm and an untied LM head
  nn.Linear(512, 8192, bias=False); loss: cross-entropy of each position's next token.
- BERT-style: token + positional embedding, nn.LayerNorm and nn.Dropout(p) on the embeddings, 6
  post-norm layers (norm_first=False), an MLM head nn.Linear(512, 8192); each row is padded at the
  end to a random length of 50-100% of T (src_key_padding_mask, True = pad); loss: cross-entropy
  on 15% of the non-pad positions, drawn at random (ignore_index elsewhere).

Sizes: GPT (B, T) = (8, 256) and (2, 1024), BERT (16, 256), 6 layers; --quick: both at (2, 128)
with 2 layers.  One call is one training step: optimizer.zero_grad(set_to_none=True), forward,
loss, backward, torch.optim.AdamW(lr=1e-4).step().  The two models start from identical weights (a deepcopy) and
see the same batch; dropout p is 0.1 (the layers' dropouts included) or 0.0.  Peer "torch": the
torch.nn model; fastseq: its converted copy (every layer fastseq.convert supports swapped; the
embeddings, the head, the loss and the optimizer are torch's in both).  setup() checks once, on
fresh copies with every dropout at 0, that the two give the same loss on the batch.

Reported: ms per step; tokens/s = B * T / step time, for both (BERT: every position, pads
included, counts); GFLOP/s: 3 x the forward's GEMM and attention FLOPs (backward: twice the
forward), causal attention counted at half, padded positions counted (they are computed).

The profile mode times where a step goes, by op family (dropout, GEMM, attention, layer norm,
activation, loss, optimizer, other), for both models:

    python -m fastseq.bench.models --profile --model gpt --B 8 --T 256 --dropout 0.1 [--layers 6] [--steps 3]

and, for a model of fastseq.models against its torch.nn twin (the twin cases below):

    python -m fastseq.bench.models --profile --twin gpt [--B 8 --T 256] [--steps 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Case, Setup, register

# ELMo's twin runs torch.nn.LSTM with proj_size, which torch computes without oneDNN and says so
# on every call: the warning is filtered here, the case names the twin
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

LAYERS, E, NH, V = 6, 512, 8, 8192
LR = 1e-4
MLM_FRACTION = 0.15


class GPT(nn.Module):
    """Decoder-only LM from torch.nn layers: forward(tokens (B, T), mask (T, T)) -> logits (B, T, V)."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, ctx: int, p: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.drop = nn.Dropout(p)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, p, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.fused_head = False           # loss(): fastseq's linear_cross_entropy instead of head + F.cross_entropy
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.drop(self.tok(tokens) + self.pos.weight[:T])                # (B, T, E)
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.ln_f(x)                                                   # (B, T, E)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens, mask))                           # (B, T, V)

    def loss(self, batch) -> torch.Tensor:
        tokens, targets, mask = batch
        if self.fused_head:                # the (B T, V) logits never formed
            from .. import functional as FF
            h = self.hidden(tokens, mask)
            return FF.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1))
        logits = self(tokens, mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class BERT(nn.Module):
    """Post-norm encoder with an MLM head: forward(tokens (B, T), pad (B, T) bool) -> logits (B, T, V)."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, ctx: int, p: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(p)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, p, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, vocab)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.drop(self.ln(self.tok(tokens) + self.pos.weight[:T]))       # (B, T, E)
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.head(x)                                                   # (B, T, V)

    def loss(self, batch) -> torch.Tensor:
        tokens, targets, pad = batch
        logits = self(tokens, pad)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


MODELS = {"gpt": GPT, "bert": BERT}


def build(model: str, B: int, T: int, p: float, layers: int = LAYERS, dim: int = E, heads: int = NH,
          vocab: int = V, device="cpu", seed: int = 0):
    """(the torch.nn model, its batch) with fixed seeds; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MODELS[model](vocab, dim, heads, layers, T, p).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    if model == "gpt":
        seq = torch.randint(0, vocab, (B, T + 1), generator=g)
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        batch = (seq[:, :-1], seq[:, 1:], mask)                               # next-token targets
    else:
        tokens = torch.randint(1, vocab, (B, T), generator=g)
        lengths = torch.randint((T + 1) // 2, T + 1, (B,), generator=g)       # 50-100% of T
        pad = torch.arange(T)[None, :] >= lengths[:, None]                    # (B, T), True = pad
        tokens[pad] = 0
        chosen = (torch.rand(B, T, generator=g) < MLM_FRACTION) & ~pad
        chosen[torch.arange(B), 0] = True                                     # at least one target per row
        targets = torch.where(chosen, torch.randint(0, vocab, (B, T), generator=g), -100)
        batch = (tokens, targets, pad)
    return net, tuple(t.to(device) for t in batch)


def convert(net: nn.Module) -> nn.Module:
    """fastseq.convert of a deepcopy (same weights, not shared); raises if nothing was converted."""
    import fastseq

    fast = fastseq.convert(copy.deepcopy(net))
    if not any(type(m).__module__.startswith("fastseq.") and not type(m).__module__.startswith(__package__)
               for m in fast.modules()):
        raise RuntimeError(f"fastseq.convert swapped no layer of {type(net).__name__}")
    return fast


def no_dropout(net: nn.Module) -> nn.Module:
    """Every dropout of the (torch.nn) model set to 0, in place: nn.Dropout's and attention's."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return net


def train_step(net: nn.Module, batch):
    """One training step of net on batch with its own AdamW: a callable returning the loss."""
    opt = torch.optim.AdamW(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = net.loss(batch)
        loss.backward()
        opt.step()
        return loss
    return step


def check_same_loss(net: nn.Module, batch, rtol: float = 1e-4) -> Tuple[float, float]:
    """torch's and the converted model's loss on batch agree with every dropout at 0 (train mode),
    on fresh copies of net (net itself is untouched); returns (torch's, fastseq's)."""
    ref = no_dropout(copy.deepcopy(net)).train()
    fast = convert(ref).train()
    with torch.no_grad():
        a, b = ref.loss(batch).item(), fast.loss(batch).item()
    if not abs(a - b) <= rtol * abs(a):
        raise AssertionError(f"{type(net).__name__}: torch's loss {a:.7g} and the converted model's {b:.7g} differ "
                             f"by more than {rtol:g} (relative) at dropout 0")
    return a, b


def train_flops(model: str, B: int, T: int, layers: int = LAYERS, dim: int = E, vocab: int = V) -> float:
    """FLOPs of one training step: 3 x (2 x GEMM parameters x tokens + attention's QK^T and PV,
    4 T^2 E per row and layer, halved when causal)."""
    gemm = layers * 12 * dim * dim + dim * vocab
    attn = 4.0 * T * T * dim * layers * (0.5 if model == "gpt" else 1.0)
    return 3.0 * B * (2.0 * gemm * T + attn)


def _case(model, device, B, T, p, layers):
    def setup():
        net, batch = build(model, B, T, p, layers, device=device)
        check_same_loss(net, batch)
        fast = convert(net)                       # a deepcopy: the two start from the same weights
        return Setup(fastseq=train_step(fast, batch), peers={"torch": train_step(net, batch)},
                     flops=train_flops(model, B, T, layers), grad_enabled=True)
    return setup


def _fused_head_case(device, B, T, p, layers):
    """The converted GPT with its head and loss as fastseq's linear_cross_entropy, against the
    torch.nn model and against the converted model with torch's head + F.cross_entropy."""
    def setup():
        net, batch = build("gpt", B, T, p, layers, device=device)
        fast = convert(net)
        fused = copy.deepcopy(fast)
        fused.fused_head = True
        a, b = no_dropout(copy.deepcopy(fast)).train(), no_dropout(copy.deepcopy(fused)).train()
        with torch.no_grad():
            la, lb = a.loss(batch).item(), b.loss(batch).item()
        if not abs(la - lb) <= 1e-4 * abs(la):
            raise AssertionError(f"fused head loss {lb:.7g} differs from the unfused {la:.7g}")
        return Setup(fastseq=train_step(fused, batch),
                     peers={"torch": train_step(net, batch), "fastseq, unfused head": train_step(fast, batch)},
                     flops=train_flops("gpt", B, T, layers), grad_enabled=True)
    return setup


CASES = [  # (model, B, T, layers, quick)
    ("gpt", 8, 256, LAYERS, False),
    ("gpt", 2, 1024, LAYERS, False),
    ("bert", 16, 256, LAYERS, False),
    ("gpt", 2, 128, 2, True),
    ("bert", 2, 128, 2, True),
]

for _dev in ("cpu", "cuda"):
    for _model, _B, _T, _layers, _quick in CASES:
        for _p in (0.1, 0.0):
            _small = f", {_layers} layers" if _layers != LAYERS else ""
            register(Case("models", f"{_model} step (B={_B}, T={_T}{_small}) dropout {_p}", _dev,
                          _case(_model, _dev, _B, _T, _p, _layers), peers=("torch",), quick=_quick,
                          meta={"model": _model, "B": _B, "T": _T, "layers": _layers, "dropout": _p,
                                "tokens": _B * _T}))
    for _B, _T, _layers, _quick in ((8, 256, LAYERS, False), (2, 128, 2, True)):
        _small = f", {_layers} layers" if _layers != LAYERS else ""
        register(Case("models", f"gpt step (B={_B}, T={_T}{_small}) dropout 0.1, fused head", _dev,
                      _fused_head_case(_dev, _B, _T, 0.1, _layers), peers=("torch", "fastseq, unfused head"),
                      quick=_quick, meta={"model": "gpt", "B": _B, "T": _T, "layers": _layers, "dropout": 0.1,
                                          "tokens": _B * _T, "fused_head": True}))


# ============================================================================ fastseq.models against their twins

# Every model of fastseq.models (issue #11) against its torch.nn twin (fastseq.models.reference):
# one AdamW training step each, same weights (the twin loads the model's state_dict), same batch
# (the model file's example_batch), dropout as configured.  setup() first checks, in eval mode,
# that the two give the same loss.  GPT's cases also report GFLOP/s (train_flops: every FLOP
# the step must do, so the fraction of the sgemm rate bounds what any implementation can reach).
# Padded batches: fastseq's BERT and Transformer seq2seq skip the padded positions (packing.py),
# ELMo's head its rows without a target; the twins compute them, as torch.nn's layers with a
# padding mask do.  Reported: ms per step, tokens/s (B * T per step; for seq2seq
# the source and target tokens; padded batches count real tokens only), the ratio, and the peak
# extra memory of a step.
#   (label, model file, config class, model class, config fields, B, T, quick)
TWIN_CASES = [
    ("gpt", "gpt", "GPTConfig", "GPT",
     dict(vocab_size=8192, max_positions=1024, dim=512, layers=6, heads=8, dropout=0.1), 8, 256, False),
    ("gpt", "gpt", "GPTConfig", "GPT",
     dict(vocab_size=8192, max_positions=1024, dim=512, layers=6, heads=8, dropout=0.1), 2, 1024, False),
    ("gpt", "gpt", "GPTConfig", "GPT",
     dict(vocab_size=2048, max_positions=128, dim=128, layers=2, heads=4, dropout=0.1), 4, 128, True),
    ("bert", "bert", "BERTConfig", "BERT",
     dict(vocab_size=8192, max_positions=512, dim=512, layers=6, heads=8, dropout=0.1), 16, 256, False),
    ("bert", "bert", "BERTConfig", "BERT",
     dict(vocab_size=2048, max_positions=128, dim=128, layers=2, heads=4, dropout=0.1), 4, 128, True),
    ("seq2seq transformer", "seq2seq", "TransformerSeq2SeqConfig", "TransformerSeq2Seq",
     dict(vocab_size=8192, dim=512, layers=3, heads=8, ffn_dim=2048, dropout=0.1), 16, 128, False),
    ("seq2seq transformer", "seq2seq", "TransformerSeq2SeqConfig", "TransformerSeq2Seq",
     dict(vocab_size=2048, dim=128, layers=2, heads=4, ffn_dim=512, dropout=0.1), 4, 32, True),
    ("seq2seq lstm", "seq2seq", "LSTMSeq2SeqConfig", "LSTMSeq2Seq",
     dict(vocab_size=8192, dim=256, hidden=512, layers=1, dropout=0.1), 16, 64, False),
    ("seq2seq lstm", "seq2seq", "LSTMSeq2SeqConfig", "LSTMSeq2Seq",
     dict(vocab_size=2048, dim=64, hidden=128, layers=1, dropout=0.1), 4, 32, True),
    # ELMo's biLM at a quarter of its width (the paper's: 4096 cells projected to 512)
    ("elmo", "elmo", "ELMoConfig", "ELMo",
     dict(vocab_size=8192, dim=256, hidden=1024, layers=2, dropout=0.1), 16, 64, False),
    ("elmo", "elmo", "ELMoConfig", "ELMo",
     dict(vocab_size=2048, dim=64, hidden=256, layers=2, dropout=0.1), 4, 32, True),
    # word_language_model's medium PTB setup: 650 units, 2 layers, dropout 0.5, 35 steps, batch 20
    ("rnnlm lstm", "rnn_lm", "RNNLMConfig", "RNNLM",
     dict(vocab_size=10000, dim=650, hidden=650, layers=2, cell="lstm", dropout=0.5), 20, 35, False),
    ("rnnlm gru", "rnn_lm", "RNNLMConfig", "RNNLM",
     dict(vocab_size=10000, dim=650, hidden=650, layers=2, cell="gru", dropout=0.5), 20, 35, False),
    ("rnnlm layer_norm_lstm", "rnn_lm", "RNNLMConfig", "RNNLM",
     dict(vocab_size=10000, dim=650, hidden=650, layers=2, cell="layer_norm_lstm", dropout=0.5), 20, 35, False),
    ("rnnlm lstm", "rnn_lm", "RNNLMConfig", "RNNLM",
     dict(vocab_size=2048, dim=128, hidden=128, layers=2, cell="lstm", dropout=0.5), 8, 35, True),
    ("rnnlm gru", "rnn_lm", "RNNLMConfig", "RNNLM",
     dict(vocab_size=2048, dim=128, hidden=128, layers=2, cell="gru", dropout=0.5), 8, 35, True),
]


def build_twin(file, config_cls, model_cls, fields, B, T, device="cpu"):
    """(fastseq model, its torch.nn twin holding the same weights, a batch), after checking in
    eval mode that the two give the same loss."""
    import importlib

    mod = importlib.import_module(f"fastseq.models.{file}")
    ref = importlib.import_module(f"fastseq.models.reference.{file}")
    cfg = getattr(mod, config_cls)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fast = getattr(mod, model_cls)(cfg).to(device)
        twin = getattr(ref, "Torch" + model_cls)(cfg).to(device)
    twin.load_state_dict(fast.state_dict())
    batch = mod.example_batch(cfg, B, T, torch.Generator().manual_seed(1), device=device)
    with torch.no_grad():
        a, b = twin.eval().loss(batch).item(), fast.eval().loss(batch).item()
    if not abs(a - b) <= 1e-4 * abs(a):
        raise AssertionError(f"{model_cls}: the twin's loss {a:.7g} and fastseq's {b:.7g} differ (eval mode)")
    return fast.train(), twin.train(), batch


def _twin_setup(file, config_cls, model_cls, fields, B, T, device):
    def setup():
        fast, twin, batch = build_twin(file, config_cls, model_cls, fields, B, T, device)
        flops = train_flops("gpt", B, T, fields["layers"], fields["dim"], fields["vocab_size"]) if file == "gpt" else 0.0
        return Setup(fastseq=train_step(fast, batch), peers={"torch": train_step(twin, batch)}, flops=flops,
                     grad_enabled=True)
    return setup


def _real_tokens(file, config_cls, fields, B, T) -> int:
    """The real tokens of the case's batch: B T, or the rows' lengths where padded (seq2seq:
    the source tokens plus the target tokens)."""
    import importlib

    mod = importlib.import_module(f"fastseq.models.{file}")
    b = mod.example_batch(getattr(mod, config_cls)(**fields), B, T, torch.Generator().manual_seed(1))
    if "src_lengths" in b:
        return int(b["src_lengths"].sum() + (b["tgt_out"] != -100).sum())
    if b.get("lengths") is not None:
        return int(b["lengths"].sum())
    return B * T


def _twin_label(label, fields, B, T):
    size = ", ".join(f"{k}={fields[k]}" for k in ("dim", "hidden", "layers", "vocab_size") if k in fields)
    return f"{label} twin step (B={B}, T={T}; {size}) dropout {fields.get('dropout', 0.0)}"


for _dev in ("cpu", "cuda"):
    for _label, _file, _cfg, _cls, _fields, _B, _T, _quick in TWIN_CASES:
        register(Case("models", _twin_label(_label, _fields, _B, _T), _dev,
                      _twin_setup(_file, _cfg, _cls, _fields, _B, _T, _dev), peers=("torch",), quick=_quick,
                      meta={"model": _label, "B": _B, "T": _T, "tokens": _real_tokens(_file, _cfg, _fields, _B, _T),
                            "memory": True, "twin": True}))


# ============================================================================ profile mode

# op family <- substrings of the lower-cased profiler event name; the first family that matches
# wins.  An event belongs to the family of the OUTERMOST event enclosing it (itself included)
# whose name matches: aten::bmm inside torch's math attention counts as attention, aten::mm
# inside aten::linear as gemm, aten::addcdiv_ inside Optimizer.step as the optimizer, so both
# models' families hold the same work.  Except dropout: an event with a dropout op anywhere
# above it (or itself one) counts as dropout (aten::mul and bernoulli_ inside aten::native_dropout,
# torch's dropout inside its attention).  fastseq's fused ops are autograd Functions recorded
# under their class name (DropoutFunction, BiasActDropoutFunction, LayerNormFunction,
# AttentionFunction; backward "...Backward"): their self time is their kernel's, and a dropout
# fused into another kernel stays in that kernel's family (BiasActDropoutFunction is the
# activation's pass, LayerNormFunction the norm's, AttentionFunction attention's), so "dropout"
# holds the passes that do nothing but drop.  Events matching none:
# "other" (embedding, residual adds, views, autograd bookkeeping).
OP_FAMILIES: List[Tuple[str, Tuple[str, ...]]] = [
    ("activation", ("biasactdropout",)),     # fastseq's bias + activation + dropout: the GELU's pass
    ("dropout", ("dropout", "bernoulli")),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "nllloss")),
    ("optimizer", ("optimizer.", "adamw", "_foreach_", "_fused_adam")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("activation", ("gelu", "relu", "silu", "biasact")),
    ("gemm", ("addmm", "aten::mm", "mmbackward", "bmm", "linear", "matmul")),
]
ANYWHERE = ("dropout",)      # families that claim an event wherever they match on its chain
FAMILY_ORDER = list(dict.fromkeys(f for f, _ in OP_FAMILIES)) + ["other"]


def op_family(name: str) -> Optional[str]:
    """The family of one profiler event name, or None when no pattern matches."""
    low = name.lower()
    for family, keys in OP_FAMILIES:
        if any(k in low for k in keys):
            return family
    return None


def _family_of(evt, memo: Dict[int, Optional[str]]) -> str:
    """The family of evt by the rules above (memo: event id -> its own name's family)."""
    chain = []
    e = evt
    while e is not None:
        if e.id not in memo:
            memo[e.id] = op_family(e.name)
        chain.append(memo[e.id])
        e = e.cpu_parent
    for f in ANYWHERE:
        if f in chain:
            return f
    return next((f for f in reversed(chain) if f is not None), "other")


def profile_steps(step, steps: int = 3, warmup: int = 2) -> dict:
    """Run `warmup` steps, then profile `steps` (CPU activities); returns {"wall_ms": per step,
    "families": {family: {"ms": per step, "pct": of wall, "top": [(op, ms per step), ...]}},
    "in_ops_ms": the self times' sum per step}.  Times are self CPU times of the events (each
    op's own time, its children's excluded), so nothing counts twice; a fused Function's self
    time is its kernel's."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    fam: Dict[str, float] = {f: 0.0 for f in FAMILY_ORDER}
    ops: Dict[str, Dict[str, float]] = {f: {} for f in FAMILY_ORDER}
    memo: Dict[int, Optional[str]] = {}
    for evt in prof.events():
        us = evt.self_cpu_time_total
        if not us:
            continue
        f = _family_of(evt, memo)
        fam[f] += us
        ops[f][evt.name] = ops[f].get(evt.name, 0.0) + us
    per = lambda us: us / 1e3 / steps       # noqa: E731  µs in total -> ms per step
    out = {"wall_ms": wall * 1e3, "in_ops_ms": per(sum(fam.values())), "families": {}}
    for f in FAMILY_ORDER:
        top = sorted(ops[f].items(), key=lambda kv: -kv[1])[:4]
        out["families"][f] = {"ms": per(fam[f]), "pct": per(fam[f]) / (wall * 1e3),
                              "top": [(name, per(us)) for name, us in top]}
    return out


def profile_table(name: str, prof: dict) -> str:
    head = f"{name}: {prof['wall_ms']:.1f} ms per step (wall, under the profiler)"
    lines = [head, f"  {'family':12s} {'ms/step':>9s} {'% wall':>7s}  top ops (ms/step)", "  " + "-" * 72]
    for f in FAMILY_ORDER:
        r = prof["families"][f]
        top = ", ".join(f"{n} {ms:.1f}" for n, ms in r["top"][:3] if ms >= 0.05)
        lines.append(f"  {f:12s} {r['ms']:9.2f} {r['pct']:7.1%}  {top}")
    rest = prof["wall_ms"] - prof["in_ops_ms"]
    lines.append(f"  {'(not in ops)':12s} {rest:9.2f} {rest / prof['wall_ms']:7.1%}  Python, the profiler's own cost")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastseq.bench.models",
                                description="Profile one training step of the models family's GPT / BERT, torch.nn "
                                            "against fastseq.convert, by op family (the timed cases: "
                                            "fastseq-bench --only models)")
    p.add_argument("--profile", action="store_true", help="run the profile (without it nothing runs)")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--E", type=int, default=E, help="model width (heads: --heads)")
    p.add_argument("--heads", type=int, default=NH)
    p.add_argument("--V", type=int, default=V, help="vocabulary")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default=None, help="also write the tables as JSON to this path")
    p.add_argument("--twin", default=None, choices=sorted({c[0] for c in TWIN_CASES}),
                   help="profile this fastseq.models model against its torch.nn twin instead (the first full-size "
                        "TWIN_CASES entry of that label, with its B and T unless --B / --T are given)")
    args = p.parse_args(argv)
    if not args.profile:
        p.print_help()
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.twin:
        label, file, cfg, cls, fields, B, T, _ = next(c for c in TWIN_CASES if c[0] == args.twin and not c[-1])
        given = argv or sys.argv[1:]
        B, T = (args.B if "--B" in given else B), (args.T if "--T" in given else T)
        fast, peer, batch = build_twin(file, cfg, cls, fields, B, T, args.device)
        title = _twin_label(label, fields, B, T)
        config = {"twin": label, "B": B, "T": T, **fields}
    else:
        peer, batch = build(args.model, args.B, args.T, args.dropout, args.layers, args.E, args.heads, args.V,
                            device=args.device)
        check_same_loss(peer, batch)
        fast = convert(peer)
        title = (f"{args.model} training step, B={args.B}, T={args.T}, {args.layers} layers, E={args.E}, "
                 f"V={args.V}, dropout {args.dropout:g}")
        config = vars(args)
    print(f"{title}, {torch.get_num_threads()} threads, {args.device}; self CPU time per op family")
    result = {"config": config | {"threads": torch.get_num_threads()}, "models": {}}
    for name, model in (("torch", peer), ("fastseq", fast)):
        prof = profile_steps(train_step(model, batch), args.steps, args.warmup)
        result["models"][name] = prof
        print(profile_table(name, prof))
    t, f = result["models"]["torch"]["wall_ms"], result["models"]["fastseq"]["wall_ms"]
    print(f"torch / fastseq step time under the profiler: {t / f:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
