"""Compiled CPU kernels (Cython + OpenMP).  Installed as fastseq._cpu; no torch import here."""
