"""fastseq-train: train the models of fastseq.models on text that needs no download.

    fastseq-train gpt                  # char-level GPT on Python's help text, 10-minute budget
    fastseq-train seq2seq              # dates written many ways -> ISO dates, 10-minute budget
    torchrun --nproc_per_node 2 -m fastseq.trainer gpt      # DistributedDataParallel over gloo

The package, read in this order:
    data.py        Python's help text (or --data FILE), byte / char tokenizers, LM windows
    dates.py       the generated seq2seq task (dates in 15 formats x 3 cases -> ISO)
    tasks.py       per subcommand: config, model, batches, validation, a sample
    loop.py        AdamW + fastseq.training schedules, time budget, DDP, checkpoints, summary
    checkpoint.py  atomic checkpoints; load_model(path) -> (model, tokenizer, checkpoint)
    __main__.py    the command line
"""
from .checkpoint import load_model, read_checkpoint

__all__ = ["load_model", "read_checkpoint"]
