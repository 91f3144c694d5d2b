"""pytest-benchmark view of the end-to-end training cases that fastseq-bench runs (same registry,
cases and peers: fastseq/bench/models.py): one AdamW training step of a GPT-style and a
BERT-style model built from torch.nn, and of the same model passed through fastseq.convert.

    pytest bench/bench_models.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_models = family_test("models", rounds=3)
