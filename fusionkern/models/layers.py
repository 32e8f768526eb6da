"""The FusionNet layers in plain PyTorch: the reference every kernel, engine and backend is compared to.

Each layer is written as close to the paper's equations as possible:

* :func:`gabor_bank` and :class:`GaborConv2d`: eq. (1)-(3), a trainable Gabor function per (output, input) pair.
* :class:`MixPool2d`: eq. (4), ``alpha * maxpool + (1 - alpha) * avgpool`` with a trainable scalar ``alpha``.
* :class:`DilatedAvgBlock`: eq. (5), ``H = H_1 + mean(H_d for the other dilations)``, then BatchNorm and ReLU.
* :class:`ChannelAttention`: ``F + F * sigmoid(MLP(avgpool F) + MLP(maxpool F))``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern.gabor import GRIDS, LEGACY_SIGMA_EPS, gabor_grid

BACKENDS = ("torch", "triton")
"""Where a layer's forward pass runs: the plain-PyTorch reference or the fused Triton kernels (same weights)."""

# The paper's initial bank (eq. 2 and 3): five frequencies and eight orientations.
GABOR_FREQS = tuple(math.pi / 2 * math.sqrt(2) ** -(n - 1) for n in range(1, 6))
GABOR_THETAS = tuple(math.pi / 8 * (m - 1) for m in range(1, 9))


def gabor_bank(
    freq: torch.Tensor,  # (out, in)
    theta: torch.Tensor,  # (out, in)
    sigma: torch.Tensor,  # (out, in)
    psi: torch.Tensor,  # (out, in)
    kernel_size: int,
    grid: str = "centered",
) -> torch.Tensor:
    """A bank of Gabor filters, shape (out, in, k, k), differentiable in all four parameters.

    Element ``[o, i, r, c]`` is ``exp(-(x'^2 + y'^2) / (2 sigma^2)) * cos(freq * x' + psi)`` with
    ``x' = x cos(theta) + y sin(theta)``, ``y' = -x sin(theta) + y cos(theta)``, ``(x, y)`` from
    :func:`gabor_grid` and the parameters taken at ``[o, i]``. ``grid="legacy"`` reproduces the authors' bank:
    their off-centre grid, ``sigma + 1e-3`` in the exponent and the ``1 / (2 pi sigma^2)`` normalisation.
    """
    x, y = gabor_grid(kernel_size, grid, device=freq.device, dtype=freq.dtype)
    f, t, s, p = (v[..., None, None] for v in (freq, theta, sigma, psi))
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    xr = x * cos_t + y * sin_t
    yr = -x * sin_t + y * cos_t
    if grid == "legacy":
        g = torch.exp(-(xr**2 + yr**2) / (2 * (s + LEGACY_SIGMA_EPS) ** 2)) * torch.cos(f * xr + p)
        return g / (2 * math.pi * s**2)
    return torch.exp(-(xr**2 + yr**2) / (2 * s**2)) * torch.cos(f * xr + p)


class GaborConv2d(nn.Module):
    """A convolution whose weights are Gabor functions with trainable ``freq``, ``theta``, ``sigma``, ``psi``.

    Each parameter has shape (out_channels, in_channels); the weight is rebuilt from them on every forward pass
    (vectorised, so the gradient reaches all four). No bias, as in the paper.

    Args:
        init: ``"grid"`` cycles through the paper's 5 x 8 frequency/orientation grid over the (out, in) pairs;
            ``"random"`` draws frequency and orientation from that grid at random per pair, as the authors' code.
            Either way ``sigma = pi / freq`` and ``psi ~ U(0, pi)``.
        grid: sampling grid of the kernel, ``"centered"`` (default) or ``"legacy"`` (see :func:`gabor_bank`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        init: str = "grid",
        grid: str = "centered",
    ):
        super().__init__()
        if init not in ("grid", "random"):
            raise ValueError(f"init must be 'grid' or 'random', got {init!r}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.init, self.grid = init, grid
        shape = (out_channels, in_channels)
        self.freq = nn.Parameter(torch.empty(shape))
        self.theta = nn.Parameter(torch.empty(shape))
        self.sigma = nn.Parameter(torch.empty(shape))
        self.psi = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n_pairs = self.out_channels * self.in_channels
        freqs = torch.tensor(GABOR_FREQS)
        thetas = torch.tensor(GABOR_THETAS)
        if self.init == "grid":
            cell = torch.arange(n_pairs) % (len(freqs) * len(thetas))
            fi, ti = cell // len(thetas), cell % len(thetas)
        else:
            fi = torch.randint(len(freqs), (n_pairs,))
            ti = torch.randint(len(thetas), (n_pairs,))
        shape = (self.out_channels, self.in_channels)
        self.freq.copy_(freqs[fi].view(shape))
        self.theta.copy_(thetas[ti].view(shape))
        self.sigma.copy_(math.pi / self.freq)
        self.psi.uniform_(0.0, math.pi)

    def weight(self) -> torch.Tensor:
        """The current filter bank, (out, in, k, k)."""
        return gabor_bank(self.freq, self.theta, self.sigma, self.psi, self.kernel_size, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H', W')
        return F.conv2d(x, self.weight(), None, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, grid={self.grid!r}"
        )


class MixPool2d(nn.Module):
    """Mixed pooling, eq. (4): ``alpha * maxpool(x) + (1 - alpha) * avgpool(x)``, ``alpha`` a trainable scalar.

    ``alpha`` is left unconstrained (as the authors' code does); it starts in [0, 1] and training may move it out.
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2, alpha: float = 1.0):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H // 2, W // 2)
        mx = F.max_pool2d(x, self.kernel_size, self.stride)
        av = F.avg_pool2d(x, self.kernel_size, self.stride)
        return self.alpha * mx + (1 - self.alpha) * av

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class DilatedAvgBlock(nn.Module):
    """Averaged dilated convolutions, eq. (5): ``H = H_d0 + mean(H_d for d in dilations[1:])``, then BN, ReLU.

    Parallel 3 x 3 convolutions (with bias) of the same input with 'same' padding, one per dilation. There is no
    identity skip of the block input.
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 3, 6, 9), out_channels: int | None = None):
        super().__init__()
        if len(dilations) < 2:
            raise ValueError(f"DilatedAvgBlock needs at least two dilations, got {tuple(dilations)}")
        out_channels = out_channels or channels
        self.dilations = tuple(int(d) for d in dilations)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, out_channels, 3, padding=d, dilation=d) for d in self.dilations
        )
        self.bn = nn.BatchNorm2d(out_channels)

    backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C_out, H, W)
        if self.backend == "triton":
            from fusionkern.models.fused import block_forward

            return block_forward(self, x)
        h = [conv(x) for conv in self.convs]
        return F.relu(self.bn(h[0] + torch.stack(h[1:]).mean(0)))


class ChannelAttention(nn.Module):
    """Channel attention over the fused map: ``F + F * sigmoid(MLP(avgpool F) + MLP(maxpool F))``.

    The MLP is two bias-free 1 x 1 convolutions ``C -> C / reduction -> C`` with a ReLU between, shared by the
    average- and max-pooled descriptors.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def attention(self, f: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 1, 1)
        avg = F.adaptive_avg_pool2d(f, 1)
        mx = F.adaptive_max_pool2d(f, 1)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    backend = "torch"

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.backend == "triton":
            from fusionkern.models.fused import attention_forward

            return attention_forward(self, f)
        return f + f * self.attention(f)
