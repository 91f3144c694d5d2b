"""pytest-benchmark view of the decode family's cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/decode.py; `fastseq-bench --only generation` is the same family): a
GPT-style loop on torch's ops and on fastseq's, and fastseq.generate against Hugging Face's
generate, CTranslate2 and a torch loop (greedy, beam 4, top-k), beam-4 translation against
CTranslate2's Translator, LSTM-decoder generation against a torch.nn.LSTMCell loop.  The peers
that are not installed are skipped.

    pytest bench/bench_decode.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_decode = family_test("decode", rounds=3)
