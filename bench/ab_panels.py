"""A/B of the recurrent panel kernels (issue 13) against the BLAS-per-step loops they replace, for
the cells without a oneDNN peer to compare against: GRU and RNN (forward from 8 rows a step and
H = 256, backward always) and the layer-normalized LSTM and GRU (each thread's slice of the step
GEMM).  The "blas" side turns the panels off in fastseq.recurrent.cpu; both sides run in this
process, interleaved in rounds, medians of all rounds.

    python bench/ab_panels.py [GRU,RNN,LayerNormLSTM,LayerNormGRU]

Results of a run: bench/results/cpu-lstm-panels/ab-gru-rnn.txt, ab-layer-norm.txt."""
import sys
import time

import numpy as np
import torch

import fastseq
from fastseq.recurrent import cpu

CONFIGS = ((128, 32, 256, 256), (256, 16, 512, 512), (64, 1, 256, 256), (512, 64, 128, 128))


def _off():
    """Turn every panel path off (the LSTM's too, for the layer-normalized cells' projections)."""
    saved = cpu.uses_panels, cpu._ln_panels
    cpu.uses_panels, cpu._ln_panels = (lambda rows, dt: False), (lambda *a: None)
    return saved


def _times(f, reps):
    f()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return out


def main(kinds):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, panels on {cpu.panel_isa()}")
    for kind in kinds:
        for T, B, I, H in CONFIGS:
            for train in (True,) if kind.startswith("LayerNorm") else (False, True):
                torch.manual_seed(0)
                m = getattr(fastseq.nn, kind)(I, H)
                x = torch.randn(T, B, I, requires_grad=train)
                params, dy = [x] + list(m.parameters()), torch.randn(T, B, H)
                if train:
                    def f():
                        torch.autograd.grad(m(x)[0], params, dy)
                else:
                    def f():
                        with torch.no_grad():
                            m(x)
                reps = 3 if T * B * H > 1e6 else 20
                res = {"blas": [], "panels": []}
                for _ in range(3):
                    saved = _off()
                    res["blas"] += _times(f, reps)
                    cpu.uses_panels, cpu._ln_panels = saved
                    res["panels"] += _times(f, reps)
                b, p = np.median(res["blas"]) * 1e3, np.median(res["panels"]) * 1e3
                print(f"{kind} {'train' if train else 'infer'} {(T, B, I, H)}: blas {b:.2f} ms  panels {p:.2f} ms  "
                      f"x{b / p:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["GRU", "RNN", "LayerNormLSTM", "LayerNormGRU"])
