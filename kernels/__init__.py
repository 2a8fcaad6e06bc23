"""Device code: Numba CPU kernels, Numba CUDA kernels and CUDA C sources.

Installed as ``fused_embedding.kernels``. Nothing here validates arguments or
picks a kernel: the core (``fused_embedding.api``) and the backends do that.
"""
import numpy as _np

# numba-cuda 0.30 registers an overload for np.row_stack unconditionally, and
# NumPy 2.5 removed that alias of np.vstack: its first CUDA compile then fails
# with "module 'numpy' has no attribute 'row_stack'" (seen on the GPU test
# machine: numpy 2.5.2, numba-cuda 0.30.4). Restore the alias where it is gone,
# before any kernel module imports numba.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
