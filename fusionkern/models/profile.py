"""Parameters and FLOPs per site, counted from the model itself (forward hooks on every convolution and linear).

FLOPs count a multiply-add as two operations and include only convolutions and linear layers (pooling, BN,
activations and attention's element-wise work add well under 1 %). Two counts:

* nominal: every output position times every kernel tap, whatever the tap lands on (what a dense convolution
  computes, padding included);
* effective: only the multiply-adds whose input tap lies inside the (unpadded) input map. On small maps a
  padded kernel lands mostly on zeros: a 3 x 3 convolution with dilation 3 on a 4 x 4 map reaches the map with 16
  of its 144 taps; such products cost time on a dense kernel but do no work. The roofline's share of peak uses the
  effective count, so that it cannot pass 100 % on work that is not done.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fusionkern.models.layers import GaborConv2d
from fusionkern.models.networks import FusionNet


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def taps_inside(in_size: int, out_size: int, kernel: int, stride: int = 1, pad_before: int = 0,
                dilation: int = 1) -> int:  # fmt: skip
    """Along one axis, the (output position, kernel tap) pairs whose tap lies inside the input.

    Output position ``o`` reads input ``o * stride - pad_before + k * dilation`` with tap ``k``; for each tap the
    positions inside ``0 .. in_size - 1`` form one run of ``o``, counted in closed form.

    Args:
        in_size: Input length (unpadded).
        out_size: Output length.
        kernel: Kernel length.
        stride: Stride.
        pad_before: Zero padding before the first input element.
        dilation: Dilation.

    Returns:
        The count; ``out_size * kernel`` when no tap ever reaches the padding.
    """
    total = 0
    for k in range(kernel):
        shift = pad_before - k * dilation  # o * stride >= shift and o * stride <= in_size - 1 + shift
        first = max(0, -(-shift // stride))
        last = min(out_size - 1, (in_size - 1 + shift) // stride)
        total += max(0, last - first + 1)
    return total


def _pad_before(padding: int | str | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Per spatial axis, the zero padding before the input (PyTorch's ``same`` puts the odd pixel after)."""
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        return [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
    return [padding, padding] if isinstance(padding, int) else list(padding)


def _pair(v: int | Sequence[int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def conv_flops(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int], effective: bool = False) -> int:
    """FLOPs of one sample through a 2-D convolution (``nn.Conv2d`` or :class:`GaborConv2d`).

    Args:
        module: The convolution.
        in_shape: Its input's shape, ``(..., H, W)``.
        out_shape: Its output's shape, ``(..., C_out, H', W')``.
        effective: Count only the multiply-adds whose tap lies inside the input (see the module docstring);
            False counts every output position times every tap.
    """
    kernel, stride, dilation = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
    groups = getattr(module, "groups", 1)
    per_tap = 2 * out_shape[-3] * (module.in_channels // groups)
    if not effective:
        return per_tap * out_shape[-2] * out_shape[-1] * kernel[0] * kernel[1]
    pad = _pad_before(module.padding, kernel, dilation)
    rows, cols = (taps_inside(in_shape[a - 2], out_shape[a - 2], kernel[a], stride[a], pad[a], dilation[a])
                  for a in (0, 1))  # fmt: skip
    return per_tap * rows * cols  # a tap is inside when its row and its column are: the count factorises


def count_flops(module: nn.Module, x: torch.Tensor, effective: bool = False) -> int:
    """FLOPs per sample of ``module``'s convolutions and linear layers on input ``x`` (one eval-mode forward).

    Args:
        module: Any module (its training mode is restored afterwards).
        x: An input batch.
        effective: Count only the convolutions' multiply-adds whose input tap lies inside the input map
            (:func:`conv_flops`); False (nominal) counts the padding's too.
    """
    total = 0

    def hook(layer, inputs, out):
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features
        else:
            total += conv_flops(layer, inputs[0].shape, out.shape, effective)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, GaborConv2d, nn.Linear))]  # fmt: skip
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(x)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return total


def flops_per_site(model: nn.Module, input_size: int | None = None, effective: bool = False) -> int:
    """FLOPs of one forward pass for one site (one chip for single-input models) at ``input_size`` px.

    Args:
        model: The model.
        input_size: Input side (default: the model's).
        effective: Count only the convolutions' multiply-adds whose input tap lies inside the input map
            (:func:`conv_flops`); False (nominal) counts the padding's too.
    """
    size = input_size or model.input_size
    shape = (1, 5, 3, size, size) if isinstance(model, FusionNet) else (1, 3, size, size)
    return count_flops(model, torch.rand(shape), effective)


def profile(model: nn.Module, input_size: int | None = None) -> dict[str, float]:
    """``{"params", "gflops_per_site", "gflops_per_site_effective", "input_size"}`` for the README table and
    benchmarks (``gflops_per_site``: nominal, see :func:`flops_per_site`)."""
    size = input_size or model.input_size
    return {
        "params": count_parameters(model),
        "gflops_per_site": flops_per_site(model, size) / 1e9,
        "gflops_per_site_effective": flops_per_site(model, size, effective=True) / 1e9,
        "input_size": size,
    }
