"""Shared pieces of the Numba CUDA kernels: streams, zero-copy views, block reductions.

The simulator (NUMBA_ENABLE_CUDASIM=1) has no warp shuffles, so reductions go through shared
memory.  Block sizes are powers of two no larger than MAX_THREADS.
"""
import numba
from numba import cuda

MAX_THREADS = 256


def torch_stream():
    """torch's current CUDA stream, as a Numba stream: our launches queue behind torch's work."""
    import torch

    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def on_device(device):
    """Make `device` current for torch (streams) and for Numba (context) while launching."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(cuda.gpus[torch.device(device).index or 0])
    return stack


def as_array(t):
    """Zero-copy Numba view of a CUDA torch tensor (through __cuda_array_interface__)."""
    return cuda.as_cuda_array(t.detach(), sync=False)


def block_size(n, cap=MAX_THREADS):
    """The power of two >= min(n, cap), at least 32 (one warp)."""
    t = 32
    while t < n and t < cap:
        t *= 2
    return t


def accumulator(dtype):
    """fp64 accumulation for fp64 data, fp32 for fp32 and fp16 (DESIGN.md section 5)."""
    return numba.float64 if str(dtype) == "float64" else numba.float32


def make_block_sum(acc):
    """A device function summing one value per thread over the block, for accumulator `acc`.
    `red` is a shared array of MAX_THREADS accumulators; every thread gets the total."""

    @cuda.jit(device=True)
    def block_sum(red, val):
        tid = cuda.threadIdx.x
        red[tid] = val
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                red[tid] += red[tid + stride]
            cuda.syncthreads()
            stride //= 2
        total = red[0]
        cuda.syncthreads()          # red is reused by the next call
        return total

    return block_sum
