"""pytest-benchmark view of the decoding-loop cases that fastseq-bench runs (same registry, cases
and peers: fastseq/bench/decode.py): a GPT-style model decoded greedily on torch's ops and on
fastseq's.

    pytest bench/bench_decode.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
from fastseq.bench.pytest_view import family_test

test_decode = family_test("decode", rounds=3)
