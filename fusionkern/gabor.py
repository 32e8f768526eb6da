"""Where a Gabor filter's taps sit: the sampling grid shared by the reference layers and the kernels.

Both :mod:`fusionkern.models.layers` (the reference bank) and :mod:`fusionkern.kernels.gabor_conv` (the bank
generated in-kernel) read the tap positions from :func:`gabor_grid`, so the two agree bit for bit. This module
imports nothing from the project.
"""

from __future__ import annotations

import math

import torch

GRIDS = ("centered", "legacy")
"""The sampling grids: ``centered`` (default) and ``legacy`` (the authors' grid and normalisation)."""

LEGACY_SIGMA_EPS = 1e-3
"""The authors' code adds this to sigma in the exponent of the legacy bank."""


def gabor_grid(
    kernel_size: int, grid: str = "centered", *, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions ``(x, y)`` of a ``k x k`` kernel, each of shape (k, k), indexed ``[row, col]``.

    ``centered``: ``x = col - (k-1)/2`` (column offset), ``y = row - (k-1)/2`` (row offset).
    ``legacy``: the authors' grid ``linspace(-ceil(k/2)+1, ceil(k/2), k)`` (``[-1, 0.5, 2]`` for k = 3), laid out
    as their ``meshgrid(..., indexing="ij")`` does: ``x`` varies along rows and ``y`` along columns.
    """
    if grid == "centered":
        off = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
        return off.expand(kernel_size, kernel_size), off[:, None].expand(kernel_size, kernel_size)
    if grid == "legacy":
        half = math.ceil(kernel_size / 2)
        lin = torch.linspace(-half + 1, half, kernel_size, device=device, dtype=dtype)
        return lin[:, None].expand(kernel_size, kernel_size), lin.expand(kernel_size, kernel_size)
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
