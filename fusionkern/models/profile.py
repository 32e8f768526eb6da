"""Parameters and FLOPs per site, counted from the model itself (forward hooks on every convolution and linear).

FLOPs count a multiply-add as two operations and include only convolutions and linear layers (pooling, BN,
activations and attention's element-wise work add well under 1 %).
"""

from __future__ import annotations

import torch
from torch import nn

from fusionkern.models.layers import GaborConv2d
from fusionkern.models.networks import FusionNet


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_flops(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, GaborConv2d):
        k, groups, cin = module.kernel_size, 1, module.in_channels
    else:
        k, groups, cin = module.kernel_size[0] * module.kernel_size[1], module.groups, module.in_channels
        return 2 * out.numel() // out.shape[0] * (cin // groups) * k
    return 2 * out.numel() // out.shape[0] * cin * k * k


def flops_per_site(model: nn.Module, input_size: int | None = None) -> int:
    """FLOPs of one forward pass for one site (one chip for single-input models) at ``input_size`` px."""
    size = input_size or model.input_size
    shape = (1, 5, 3, size, size) if isinstance(model, FusionNet) else (1, 3, size, size)
    total = 0

    def hook(module, _inputs, out):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        else:
            total += _conv_flops(module, out)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, GaborConv2d, nn.Linear))]  # fmt: skip
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.rand(shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def profile(model: nn.Module, input_size: int | None = None) -> dict[str, float]:
    """``{"params": ..., "gflops_per_site": ..., "input_size": ...}`` for the README table and benchmarks."""
    size = input_size or model.input_size
    return {
        "params": count_parameters(model),
        "gflops_per_site": flops_per_site(model, size) / 1e9,
        "input_size": size,
    }
