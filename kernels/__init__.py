"""Triton kernels of fusedres, installed as ``fusedres.kernels``.

One file per op (kernel, launcher and its torch.library registration); the Triton backend
is not implemented yet, so this package holds none.
"""
