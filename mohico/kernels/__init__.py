"""Hot-path kernels with PyTorch references: fused memory-bank NCE and MotionSqueeze correlation.

Each op takes ``impl=None`` (dispatch: Triton on CUDA, chunked PyTorch elsewhere),
``"torch"``, ``"reference"`` (naive, the test oracle) or ``"triton"``.
"""
from .bank_nce import KernelUnavailableError, bank_lse, bank_nce
from .correlation import local_correlation_softargmax

__all__ = ["bank_nce", "bank_lse", "local_correlation_softargmax", "KernelUnavailableError"]
