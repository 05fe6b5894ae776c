"""Tolerances for comparing two computations of the same function in floating point.

Two evaluations of one function may sum in a different order: a GEMM kernel blocks differently
with the number of rows in the batch, with the CPU vendor (Intel vs AMD code paths) and with memory
alignment. Each length-K dot product then differs by about sqrt(K)·eps (K·eps at worst), and each
of ``depth`` layers compounds it. Bit-identity is only asserted where it is the point (copies,
the same computation repeated, exact resume in one process).
"""

from __future__ import annotations

import math

import torch


def float_tolerance(dtype: torch.dtype, reduction_size: int, depth: int = 1) -> dict[str, float]:
    """``rtol``/``atol`` for ``torch.testing.assert_close``: 4·eps·sqrt(K)·depth, eps of ``dtype``."""
    tol = 4 * torch.finfo(dtype).eps * math.sqrt(reduction_size) * depth
    return {"rtol": tol, "atol": tol}
