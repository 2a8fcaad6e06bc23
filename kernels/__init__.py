"""Device code: Numba CPU kernels, Numba CUDA kernels and CUDA C sources.

Installed as ``fused_embedding.kernels``. Nothing here validates arguments or
picks a kernel: the core (``fused_embedding.api``) and the backends do that.
"""
