"""The recurrent kernels' per-step GEMM alone: MKL (the BLAS torch ships) on one thread at the
shapes one thread computes per step for the issue #4 configs, as sgemm GFLOP/s.  The recurrent
part of an LSTM step cannot run faster than this on its core; compare with the machine's sgemm
ceiling (fastseq-bench prints it).

    python bench/step_gemm.py
"""
import time

import numpy as np
import torch


def main():
    torch.set_num_threads(1)
    print(f"{'(T, B, I, H)':22s} {'per-thread GEMM (M, N, K)':28s} {'us':>8s} {'GFLOP/s':>8s}")
    for T, B, I, H in [(128, 32, 256, 256), (256, 16, 512, 512), (64, 1, 256, 256), (512, 64, 128, 128)]:
        M, N, K = B, 4 * H // 2, H                  # two threads: each its half of the 4H gate columns
        a = torch.randn(M, K)
        w = torch.randn(N, K)
        c = torch.zeros(M, N)
        torch.addmm(c, a, w.t(), out=c)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(100):
                torch.addmm(c, a, w.t(), out=c)
            ts.append((time.perf_counter() - t0) / 100)
        t = float(np.median(ts))
        print(f"{str((T, B, I, H)):22s} {str((M, N, K)):28s} {t * 1e6:8.1f} {2 * M * N * K / t / 1e9:8.1f}")


if __name__ == "__main__":
    main()
