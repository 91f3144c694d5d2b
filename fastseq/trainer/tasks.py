"""What each subcommand trains: its data, its model, its batches and how it is evaluated.

A task is built from the parsed command line (and, on --resume, the saved tokenizer) and gives
the training loop (loop.py) what it needs:

    tokenizer                          the vocabulary (saved in the checkpoint)
    config(args) -> dataclass          the model's config for these settings
    model_from_config(dict, args)      the model (classmethod: checkpoint.load_model uses it)
    global_batch(step) -> dict         step's whole batch; a function of (seed, step) only, so
                                       DDP ranks and resumed runs see the batches of one
                                       uninterrupted run (each rank takes its rows)
    tokens(batch) -> int               input tokens the batch holds (for tokens/s)
    evaluate(model, final) -> dict     {"val_loss": nats per target token, ...}
    sample(model) -> str | None        a little generated text (language models)

The models are imported when their subcommand runs, so a missing model file breaks only its
own subcommand, with a message naming what is missing.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, Optional

import torch
from torch import Tensor

from .data import (build_tokenizer, consecutive_windows, load_text, random_windows, split_text,
                   step_generator, tokenizer_from_state, CharTokenizer)
from .dates import make_dates

EVAL_BATCH = 64                                    # rows per validation forward pass


class ModelUnavailable(RuntimeError):
    """The model file of a subcommand is missing or fails to import."""


def import_model(module: str, *names: str):
    """``names`` from ``fastseq.models.<module>``, or ModelUnavailable saying what failed."""
    try:
        mod = importlib.import_module(f"fastseq.models.{module}")
        return tuple(getattr(mod, n) for n in names)
    except (ImportError, AttributeError) as e:
        raise ModelUnavailable(f"fastseq.models.{module} does not provide {', '.join(names)} "
                               f"({type(e).__name__}: {e}); this subcommand cannot run until it does") from e


def build_config(cls, **candidates):
    """``cls`` (a config dataclass) from those of ``candidates`` that are its fields and not None."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in candidates.items() if k in names and v is not None})


class Task:
    name = ""
    unit = "nats/token"                            # what val_loss is measured in
    find_unused_parameters = False                 # DDP: whether a parameter may get no gradient in a step

    def __init__(self, args, tokenizer_state: Optional[Dict] = None):
        self.args = args

    def tokens(self, batch: Dict[str, Tensor]) -> int:
        return batch["tokens"].numel()

    def sample(self, model) -> Optional[str]:
        return None

    def describe(self, metrics: Dict) -> str:
        """The validation figures as one phrase."""
        return f"validation loss {metrics['val_loss']:.4f} {self.unit}"


# ---------------------------------------------------------------------------------------------
# Language models on text: gpt, rnnlm, elmo, bert
# ---------------------------------------------------------------------------------------------

class TextTask(Task):
    """The corpus (data.py), its tokenizer, random training windows, every validation window."""

    window_extra = 1                               # next-token models read T + 1 ids per row

    def __init__(self, args, tokenizer_state=None):
        super().__init__(args, tokenizer_state)
        train, val = split_text(load_text(args.data))
        self.tokenizer = (tokenizer_from_state(tokenizer_state) if tokenizer_state
                          else build_tokenizer(args.tokenizer, train))
        self.unit = "nats/char" if self.tokenizer.kind == "char" else "nats/byte"
        self.train_ids = torch.tensor(self.tokenizer.encode(train), dtype=torch.long)
        self.val_ids = torch.tensor(self.tokenizer.encode(val), dtype=torch.long)
        self.window = args.seq_len + self.window_extra
        self.val_windows = consecutive_windows(self.val_ids, self.window)            # (N, T + 1)
        random_windows(self.train_ids, 1, self.window, torch.Generator())            # the text is long enough

    def windows_to_batch(self, w: Tensor, generator: Optional[torch.Generator]) -> Dict[str, Tensor]:
        return {"tokens": w[:, :-1], "targets": w[:, 1:]}                           # (B, T) each

    def global_batch(self, step: int) -> Dict[str, Tensor]:
        g = step_generator(self.args.seed, step)
        return self.windows_to_batch(random_windows(self.train_ids, self.args.batch_size, self.window, g), g)

    @torch.no_grad()
    def evaluate(self, model, final: bool = False) -> Dict:
        """Mean loss per target token over every validation window (weighted by target counts)."""
        g = torch.Generator().manual_seed(self.args.seed + 1)                        # fixed masks (bert)
        total = count = 0.0
        for i in range(0, len(self.val_windows), EVAL_BATCH):
            batch = self.windows_to_batch(self.val_windows[i:i + EVAL_BATCH], g)
            n = self.targets_in(batch)
            total += float(model.loss(batch)) * n
            count += n
        return {"val_loss": total / count}

    def targets_in(self, batch) -> int:
        return int((batch["targets"] != -100).sum())

    @torch.no_grad()
    def sample(self, model, prompt: str = "The ", length: int = 240) -> Optional[str]:
        """``length`` tokens sampled (temperature 0.8, a fixed seed) after ``prompt``."""
        g = torch.Generator().manual_seed(self.args.seed)
        ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long)        # (1, P)
        for _ in range(length):
            logits = self.next_logits(model, ids[:, -self.args.seq_len:])          # (1, V)
            probs = torch.softmax(logits.double() / 0.8, dim=-1)
            probs[:, list(self.tokenizer.special_ids)] = 0
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
        return self.tokenizer.decode(ids[0].tolist())

    def next_logits(self, model, ids: Tensor) -> Tensor:
        return model(ids)[:, -1]                                                     # (1, V)


class GPTTask(TextTask):
    name = "gpt"

    def config(self, args):
        (GPTConfig,) = import_model("gpt", "GPTConfig")
        return build_config(GPTConfig, vocab_size=len(self.tokenizer), max_positions=args.seq_len, dim=args.dim,
                            layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim, dropout=args.dropout)

    @classmethod
    def model_from_config(cls, config: Dict, args: Dict):
        GPTConfig, GPT = import_model("gpt", "GPTConfig", "GPT")
        return GPT(GPTConfig(**config))


class RNNLMTask(TextTask):
    name = "rnnlm"

    def config(self, args):
        (RNNLMConfig,) = import_model("rnn_lm", "RNNLMConfig")
        return build_config(RNNLMConfig, vocab_size=len(self.tokenizer), dim=args.dim, hidden=args.hidden or args.dim,
                            layers=args.layers, cell=args.cell, dropout=args.dropout,
                            tie_weights=(args.hidden or args.dim) == args.dim)

    @classmethod
    def model_from_config(cls, config, args):
        RNNLMConfig, RNNLM = import_model("rnn_lm", "RNNLMConfig", "RNNLM")
        return RNNLM(RNNLMConfig(**config))


class ELMoTask(TextTask):
    """Both directions' language models on each window: val_loss is the mean of the forward
    LM's next-character and the backward LM's previous-character losses."""
    name = "elmo"
    window_extra = 0

    def config(self, args):
        (ELMoConfig,) = import_model("elmo", "ELMoConfig")
        return build_config(ELMoConfig, vocab_size=len(self.tokenizer), dim=args.dim, hidden=args.hidden,
                            layers=args.layers, layer_norm=args.layer_norm, dropout=args.dropout)

    @classmethod
    def model_from_config(cls, config, args):
        ELMoConfig, ELMo = import_model("elmo", "ELMoConfig", "ELMo")
        return ELMo(ELMoConfig(**config))

    def windows_to_batch(self, w, generator):
        return {"tokens": w}                                                         # (B, T)

    def targets_in(self, batch) -> int:
        B, T = batch["tokens"].shape
        return B * (T - 1)                                                           # per direction

    def next_logits(self, model, ids):
        return model(ids)[0][:, -1]                                                  # the forward LM's


class BERTTask(TextTask):
    """Masked-LM on windows of the text (BERT's 15% / 80-10-10 recipe, fastseq.models.bert.
    mask_tokens); val_loss is per masked character, with a fixed masking of the validation text."""
    name = "bert"
    window_extra = 0

    def config(self, args):
        (BERTConfig,) = import_model("bert", "BERTConfig")
        t = self.tokenizer
        return build_config(BERTConfig, vocab_size=len(t), max_positions=args.seq_len, dim=args.dim,
                            layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim, dropout=args.dropout,
                            pad_id=t.pad_id, mask_id=t.mask_id)

    @classmethod
    def model_from_config(cls, config, args):
        BERTConfig, BERT = import_model("bert", "BERTConfig", "BERT")
        return BERT(BERTConfig(**config))

    def windows_to_batch(self, w, generator):
        (mask_tokens,) = import_model("bert", "mask_tokens")
        t = self.tokenizer
        inputs, targets = mask_tokens(w, None, len(t), t.mask_id, special_ids=t.special_ids, generator=generator)
        return {"tokens": inputs, "targets": targets}

    def sample(self, model, text: str = "The return statement leaves the current function call.") -> str:
        """``text`` with every fifth character masked, then filled in by the model (argmax)."""
        t = self.tokenizer
        text = text[:self.args.seq_len]
        ids = torch.tensor([t.encode(text)], dtype=torch.long)                      # (1, T)
        masked = ids.clone()
        masked[:, 2::5] = t.mask_id
        with torch.no_grad():
            guess = model(masked).argmax(-1)                                         # (1, T)
        filled = torch.where(masked == t.mask_id, guess, ids)
        shown = "".join("_" if m == t.mask_id else c for m, c in zip(masked[0].tolist(), text))
        return f"masked: {shown}\nfilled: {t.decode(filled[0].tolist())}"


# ---------------------------------------------------------------------------------------------
# seq2seq: dates written many ways -> ISO dates
# ---------------------------------------------------------------------------------------------

class Seq2SeqTask(Task):
    """The dates task (dates.py) on one character vocabulary; val_loss per target character
    (end of sequence included), and held-out exact match of greedy decoding."""
    name = "seq2seq"
    unit = "nats/char"

    def __init__(self, args, tokenizer_state=None):
        super().__init__(args, tokenizer_state)
        train, held = make_dates(args.train_size, args.heldout_size, seed=args.seed)
        self.tokenizer = (tokenizer_from_state(tokenizer_state) if tokenizer_state
                          else CharTokenizer.from_text("".join(s + t for s, t in train)))
        self.train = self._encode(train)
        self.held = self._encode(held)
        self.held_targets = [t for _, t in held]
        self.max_target = max(len(t) for _, t in train + held) + 1                 # + eos

    def _encode(self, pairs):
        t = self.tokenizer
        src = [t.encode(s) for s, _ in pairs]
        tgt = [t.encode(x) for _, x in pairs]
        S, T = max(map(len, src)), max(map(len, tgt)) + 1
        out = {"src": torch.full((len(pairs), S), t.pad_id, dtype=torch.long),
               "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long),
               "tgt_in": torch.full((len(pairs), T), t.pad_id, dtype=torch.long),
               "tgt_out": torch.full((len(pairs), T), -100, dtype=torch.long)}
        for i, (s, x) in enumerate(zip(src, tgt)):
            out["src"][i, :len(s)] = torch.tensor(s)
            out["tgt_in"][i, :len(x) + 1] = torch.tensor([t.bos_id] + x)
            out["tgt_out"][i, :len(x) + 1] = torch.tensor(x + [t.eos_id])
        return out

    @staticmethod
    def _rows(data: Dict[str, Tensor], index) -> Dict[str, Tensor]:
        b = {k: v[index] for k, v in data.items()}
        S = int(b["src_lengths"].max())
        b["src"] = b["src"][:, :S]                                                   # (B, S): no all-pad columns
        return b

    def global_batch(self, step):
        g = step_generator(self.args.seed, step)
        n = self.train["src"].shape[0]
        return self._rows(self.train, torch.randint(0, n, (self.args.batch_size,), generator=g))

    def tokens(self, batch):
        return int(batch["src_lengths"].sum()) + int((batch["tgt_out"] != -100).sum())

    def config(self, args):
        t = self.tokenizer
        common = dict(vocab_size=len(t), pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id, dim=args.dim,
                      dropout=args.dropout, share_embeddings=True, tie_weights=True)     # one vocabulary
        if args.arch == "transformer":
            (C,) = import_model("seq2seq", "TransformerSeq2SeqConfig")
            return build_config(C, **common, encoder_layers=args.layers, decoder_layers=args.layers,
                                layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim,
                                max_positions=max(64, 2 * self.max_target, self.train["src"].shape[1] + 8))
        (C,) = import_model("seq2seq", "LSTMSeq2SeqConfig")
        return build_config(C, **common, hidden=args.hidden, encoder_layers=args.layers, decoder_layers=args.layers,
                            layers=args.layers)

    @classmethod
    def model_from_config(cls, config, args):
        name = "TransformerSeq2Seq" if args.get("arch", "transformer") == "transformer" else "LSTMSeq2Seq"
        C, M = import_model("seq2seq", name + "Config", name)
        return M(C(**config))

    @torch.no_grad()
    def evaluate(self, model, final: bool = False) -> Dict:
        """Held-out loss per target character, and greedy exact match (all of the held-out set
        at the end, its first 500 examples in between)."""
        n = self.held["src"].shape[0] if final else min(500, self.held["src"].shape[0])
        total = count = 0.0
        correct = 0
        for i in range(0, n, 250):
            b = self._rows(self.held, slice(i, min(n, i + 250)))
            k = int((b["tgt_out"] != -100).sum())
            total += float(model.loss(b)) * k
            count += k
            out = model.greedy_decode(b["src"], b["src_lengths"], self.max_target)
            for j, row in enumerate(out.tolist()):
                end = row.index(self.tokenizer.eos_id) if self.tokenizer.eos_id in row else len(row)
                correct += self.tokenizer.decode(row[:end]) == self.held_targets[i + j]
        return {"val_loss": total / count, "exact_match": correct / n, "heldout": n}

    def describe(self, metrics):
        return (f"validation loss {metrics['val_loss']:.4f} {self.unit}, held-out exact match "
                f"{100 * metrics['exact_match']:.2f}% of {metrics['heldout']}")

    def sample(self, model, k: int = 4) -> str:
        """The first k held-out examples: source -> greedy output."""
        b = self._rows(self.held, slice(0, k))
        out = model.greedy_decode(b["src"], b["src_lengths"], self.max_target).tolist()
        t = self.tokenizer
        lines = []
        for i, row in enumerate(out):
            end = row.index(t.eos_id) if t.eos_id in row else len(row)
            src = t.decode(b["src"][i, :int(b["src_lengths"][i])].tolist())
            lines.append(f"{src!r:>34} -> {t.decode(row[:end])}")
        return "\n".join(lines)


TASKS = {t.name: t for t in (GPTTask, BERTTask, Seq2SeqTask, ELMoTask, RNNLMTask)}
