"""fastseq-train: train a model of fastseq.models on data that needs no download.

    fastseq-train gpt                        # char-level GPT on Python's help text, 10 minutes
    fastseq-train seq2seq                    # dates written many ways -> ISO dates, 10 minutes
    fastseq-train seq2seq --arch lstm --steps 2000
    fastseq-train rnnlm --cell gru --minutes 3
    fastseq-train bert --data my.txt --tokenizer byte
    fastseq-train elmo --resume              # continue the run saved in ./fastseq-train-elmo/
    torchrun --nproc_per_node 2 -m fastseq.trainer gpt     # DistributedDataParallel (gloo)

Every option has a small default for a 2-core CPU; ``fastseq-train <model> --help`` lists them.
The run stops after --steps or --minutes (whichever comes first; with neither, the model's
default time budget), evaluates, writes ``<out>/checkpoint.pt`` and ``<out>/summary.json``, and
prints one summary line.
"""
from __future__ import annotations

import argparse
import sys

from .tasks import ModelUnavailable

# Per-model defaults (None: the option does not apply or takes the model's own default).
DEFAULTS = {
    "gpt": dict(dim=192, layers=4, heads=6, ffn_dim=None, seq_len=128, batch_size=32, lr=2e-3, warmup=100,
                schedule="cosine", weight_decay=0.1, dropout=0.0, label_smoothing=0.0, eval_every=100,
                default_minutes=10.0),
    "bert": dict(dim=128, layers=4, heads=4, ffn_dim=None, seq_len=128, batch_size=32, lr=1e-3, warmup=200,
                 schedule="cosine", weight_decay=0.01, dropout=0.1, label_smoothing=0.0, eval_every=200,
                 default_minutes=5.0),
    "seq2seq": dict(dim=128, layers=2, heads=4, ffn_dim=512, hidden=256, batch_size=64, lr=1e-3, warmup=200,
                    schedule="cosine", weight_decay=0.01, dropout=0.1, label_smoothing=0.1, eval_every=250,
                    default_minutes=10.0),
    "elmo": dict(dim=128, hidden=512, layers=2, seq_len=64, batch_size=32, lr=2e-3, warmup=100,
                 schedule="cosine", weight_decay=0.01, dropout=0.1, label_smoothing=0.0, eval_every=200,
                 default_minutes=5.0),
    "rnnlm": dict(dim=256, hidden=None, layers=2, seq_len=128, batch_size=32, lr=2e-3, warmup=100,
                  schedule="cosine", weight_decay=0.01, dropout=0.1, label_smoothing=0.0, eval_every=200,
                  default_minutes=5.0),
}
HELP = {
    "gpt": "GPT-2-style decoder, character-level, on Python's help text (or --data)",
    "bert": "BERT masked-LM pre-training on the same text",
    "seq2seq": "encoder-decoder (--arch transformer|lstm) on the dates task, with held-out exact match",
    "elmo": "ELMo's bidirectional LSTM language model",
    "rnnlm": "LSTM / GRU / layer-norm language model (--cell)",
}
TEXT_MODELS = ("gpt", "bert", "elmo", "rnnlm")


def _common(p: argparse.ArgumentParser, name: str) -> None:
    d = DEFAULTS[name]
    size = p.add_argument_group("model")
    size.add_argument("--dim", type=int, help="embedding width E")
    if "hidden" in d:
        size.add_argument("--hidden", type=int, help="recurrent state width H" + {
            "rnnlm": " (None: --dim, with the output layer tied)", "seq2seq": " (--arch lstm)"}.get(name, ""))
    size.add_argument("--layers", type=int, help="layers (of each stack)")
    if "heads" in d:
        size.add_argument("--heads", type=int, help="attention heads")
        size.add_argument("--ffn-dim", type=int, help="feed-forward width (None: 4 E)")
    size.add_argument("--dropout", type=float, help="dropout probability")
    if name == "seq2seq":
        size.add_argument("--arch", choices=("transformer", "lstm"), default="transformer",
                          help="architecture")
    if name == "rnnlm":
        size.add_argument("--cell", choices=("lstm", "gru", "layer_norm_lstm", "layer_norm_gru"), default="lstm",
                          help="recurrent cell")
    if name == "elmo":
        size.add_argument("--layer-norm", action="store_true", help="LayerNormLSTM layers")

    data = p.add_argument_group("data")
    if name in TEXT_MODELS:
        data.add_argument("--data", metavar="FILE", help="UTF-8 text to train on (None: Python's help text)")
        data.add_argument("--tokenizer", choices=("char", "byte"), default="char",
                          help="tokens: characters or UTF-8 bytes")
        data.add_argument("--seq-len", type=int, help="tokens per training row T")
    else:
        data.add_argument("--train-size", type=int, default=40000, help="training pairs")
        data.add_argument("--heldout-size", type=int, default=2000, help="held-out pairs (dates never trained on)")
    data.add_argument("--batch-size", type=int, help="global batch (split evenly over DDP processes)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="optimizer steps in all, resumed runs included (None: no limit)")
    t.add_argument("--minutes", type=float,
                   help=f"time budget in minutes, resumed runs included (None: {d['default_minutes']:g} "
                        "without --steps, else no limit)")
    t.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps")
    t.add_argument("--schedule", choices=("inverse_sqrt", "cosine", "linear"), help="LR schedule after the warm-up")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices and embeddings)")
    t.add_argument("--label-smoothing", type=float, help="training loss label smoothing (validation: none)")
    t.add_argument("--smoothing", choices=("torch", "fairseq"), default="torch",
                   help="label-smoothing convention")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    t.add_argument("--eval-every", type=int, help="steps between validations (and checkpoints)")
    t.add_argument("--seed", type=int, default=0, help="initialization, batches and the dates task")
    t.add_argument("--threads", type=int, help="torch threads (None: torch's; under torchrun, cores / processes)")
    t.add_argument("--out", help="folder of checkpoint.pt and summary.json")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True,
                   help="print a little generated text at the end")
    p.set_defaults(model=name, out=f"fastseq-train-{name}", **d)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastseq-train", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name in DEFAULTS:
        _common(sub.add_parser(name, help=HELP[name], description=HELP[name],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter), name)
    p.subcommands = sub.choices                    # name -> its parser (an error prints its usage)
    return p


def check(args, error) -> None:
    """Bad settings fail here through ``error`` (argparse's: usage, the message, exit status 2),
    naming the option."""
    positive = ("dim", "layers", "heads", "ffn_dim", "hidden", "seq_len", "batch_size", "steps", "eval_every",
                "threads", "train_size", "heldout_size")
    for k in positive:
        v = getattr(args, k, None)
        if v is not None and v < 1:
            error(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.minutes is not None and not args.minutes > 0:
        error(f"--minutes must be > 0, got {args.minutes}")
    if not args.lr > 0:
        error(f"--lr must be > 0, got {args.lr}")
    if args.warmup < 0:
        error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.weight_decay >= 0:
        error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    for k in ("dropout", "label_smoothing"):
        if not 0.0 <= getattr(args, k) < 1.0:
            error(f"--{k.replace('_', '-')} must be in [0, 1), got {getattr(args, k)}")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    error = p.subcommands[args.model].error
    check(args, error)
    from .loop import OptionError, run
    try:
        run(args)
    except OptionError as e:                       # options the model's config rejects (--dim 100 --heads 6)
        error(str(e))
    except ModelUnavailable as e:
        print(f"fastseq-train {args.model}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
