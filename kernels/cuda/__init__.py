"""Numba CUDA kernels.  Installed as fastseq._cuda; imported only when a CUDA tensor arrives."""
