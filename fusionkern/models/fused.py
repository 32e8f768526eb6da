"""The reference layers run on the Triton kernels: the glue between modules and the kernels' tensor APIs.

The kernels (:mod:`fusionkern.kernels`) take tensors and plain parameters only; the functions here read a
reference module's weights and options and call them, giving the module's own result, train and eval:

* :func:`stage_forward`: a :class:`~fusionkern.models.networks.ConvStage` (Gabor or plain conv, ReLU, mixed or
  max pooling, BatchNorm in either order) on ``gabor_conv2d`` / ``conv2d_mixpool``;
* :func:`block_forward`: a :class:`~fusionkern.models.layers.DilatedAvgBlock` on ``dilated_avg_block``;
* :func:`attention_forward`: a :class:`~fusionkern.models.layers.ChannelAttention` on ``channel_attention``.

``model.to_backend("triton")`` makes those layers call these. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern.kernels import channel_attention, conv2d_mixpool, dilated_avg_block, fold_bn, gabor_conv2d
from fusionkern.kernels._common import square_int, unsupported
from fusionkern.models.layers import GaborConv2d, MixPool2d
from fusionkern.models.networks import ConvStage

__all__ = ["attention_forward", "block_forward", "stage_forward"]


def _pool_alpha(pool: nn.Module | None) -> torch.Tensor | float | None:
    """MixPool2d -> its trainable alpha; MaxPool2d(2) -> the constant 1.0; None -> no pooling."""
    if pool is None:
        return None
    if isinstance(pool, MixPool2d):
        if square_int("pool.kernel_size", pool.kernel_size, minimum=1) != 2 or square_int(
            "pool.stride", pool.stride, minimum=1
        ) != 2:
            unsupported("pool", f"only 2 x 2 / stride 2 pooling is supported, got {pool}")
        return pool.alpha
    if isinstance(pool, nn.MaxPool2d):
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        ok = (
            square_int("pool.kernel_size", pool.kernel_size, minimum=1) == 2
            and square_int("pool.stride", stride, minimum=1) == 2
            and square_int("pool.padding", pool.padding, minimum=0) == 0
            and square_int("pool.dilation", pool.dilation, minimum=1) == 1
            and not pool.ceil_mode
            and not pool.return_indices
        )
        if not ok:
            unsupported("pool", f"only MaxPool2d(2) (2 x 2, stride 2, no padding, floor mode) is supported, got {pool}")
        return 1.0
    unsupported("pool", f"expected MixPool2d, MaxPool2d or None, got {type(pool).__name__}")


def _conv_call(conv: nn.Module, x: torch.Tensor, alpha, bn, allow_tf32: bool | None) -> torch.Tensor:
    """conv -> ReLU -> [pool alpha] -> [folded bn] on the kernels, for a GaborConv2d or an nn.Conv2d."""
    if isinstance(conv, GaborConv2d):
        return gabor_conv2d(
            x, conv.freq, conv.theta, conv.sigma, conv.psi, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, relu=True, pool_alpha=alpha, grid=conv.grid, bn=bn, allow_tf32=allow_tf32,
        )  # fmt: skip
    if isinstance(conv, nn.Conv2d):
        if conv.padding_mode != "zeros":
            unsupported("conv.padding_mode", f"only 'zeros' is supported, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            unsupported("conv.padding", f"string padding {conv.padding!r} is not supported; give an int")
        return conv2d_mixpool(
            x, conv.weight, conv.bias, alpha, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            relu=True, bn=bn, groups=conv.groups, allow_tf32=allow_tf32,
        )  # fmt: skip
    raise NotImplementedError(
        f"stage_forward supports GaborConv2d and nn.Conv2d convolutions, got {type(conv).__name__}"
    )


def stage_forward(stage: nn.Module, x: torch.Tensor, *, allow_tf32: bool | None = None) -> torch.Tensor:
    """Run a reference :class:`fusionkern.models.networks.ConvStage` on the kernels; same result, train and eval.

    What runs where:

    * ``pool_bn`` order (DGCNN) or no BN: conv + ReLU + pool in one kernel; the BN is folded into the kernel's
      epilogue in eval mode and runs as a separate torch op (batch statistics, running-stat updates) in training.
      An eval-mode BN whose weight or bias requires a gradient (with grad enabled) also runs as a torch op, so
      its affine parameters still get gradients; under ``torch.no_grad()`` or with frozen BN it folds.
    * ``bn_pool`` order (CNN5) with both BN and a pool: BN sits between ReLU and the pool and cannot move past a
      max: conv + ReLU run in one kernel (with the BN folded into it in eval mode), then torch BN (training only)
      and the stage's own pool module.

    ``MixPool2d`` pools with its trainable alpha; ``nn.MaxPool2d(2)`` is mixed pooling with alpha fixed at 1 (no
    alpha gradient). ``allow_tf32`` as in :func:`~fusionkern.kernels.conv2d_mixpool` (default: follow torch's cuDNN
    setting). Other pools, grouped or non-square convs raise :class:`UnsupportedOptionError`.
    """
    if not isinstance(stage, ConvStage):
        raise NotImplementedError(f"stage_forward runs a ConvStage, got {type(stage).__name__}")
    alpha = _pool_alpha(stage.pool)
    bn_mod = stage.bn
    if bn_mod is not None and not isinstance(bn_mod, nn.modules.batchnorm._BatchNorm):
        unsupported("stage.bn", f"expected a BatchNorm module or None, got {type(bn_mod).__name__}")
    # Eval-mode BN folds into the epilogue unless its affine parameters need gradients (fine-tuning with frozen
    # statistics): then it runs as a torch op on the running statistics, which gives the same values.
    fold = (
        bn_mod is not None
        and not bn_mod.training
        and bn_mod.track_running_stats
        and not (torch.is_grad_enabled() and any(p.requires_grad for p in bn_mod.parameters()))
    )
    folded = fold_bn(bn_mod) if fold else None
    bn_between = stage.order == "bn_pool" and bn_mod is not None and alpha is not None
    if not bn_between:
        y = _conv_call(stage.conv, x, alpha, folded, allow_tf32)
        return bn_mod(y) if (bn_mod is not None and not fold) else y
    y = _conv_call(stage.conv, x, None, folded, allow_tf32)
    if not fold:
        y = bn_mod(y)
    return stage.pool(y)


def block_forward(block: nn.Module, x: torch.Tensor, *, allow_tf32: bool | None = None) -> torch.Tensor:
    """Run a reference :class:`fusionkern.models.layers.DilatedAvgBlock` on the kernel, same result as ``block(x)``.

    Training mode (or a BatchNorm without running statistics): the kernel computes ``H`` (bias included), then the
    block's own BatchNorm module runs as the torch op (batch statistics, running-stat and ``num_batches_tracked``
    updates exactly as in ``block(x)``), then ``F.relu``. Eval mode: BN (folded with
    :func:`~fusionkern.kernels.fold_bn`) and ReLU run in the kernel's epilogue, one launch for the whole block.

    Raises:
        UnsupportedOptionError (a ValueError): ``block`` is not shaped like a ``DilatedAvgBlock`` (3 x 3 convs with
            'same' padding equal to their dilation, stride 1, no groups, a BatchNorm2d), or ``x`` is not supported
            by the kernel.
    """
    convs = getattr(block, "convs", None)
    bn = getattr(block, "bn", None)
    dilations = getattr(block, "dilations", None)
    if convs is None or bn is None or dilations is None:
        unsupported("block", f"expected a DilatedAvgBlock (convs, bn, dilations), got {type(block).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        unsupported("block", f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if len(convs) != len(dilations):
        unsupported("block", f"has {len(convs)} convs for {len(dilations)} dilations")
    for j, (conv, d) in enumerate(zip(convs, dilations)):
        if not isinstance(conv, nn.Conv2d):
            unsupported("block", f"convs[{j}] must be an nn.Conv2d, got {type(conv).__name__}")
        if (
            conv.kernel_size != (3, 3)
            or conv.stride != (1, 1)
            or conv.groups != 1
            or conv.dilation != (d, d)
            or conv.padding != (d, d)
            or conv.padding_mode != "zeros"
        ):
            unsupported(
                "block",
                f"convs[{j}] must be a 3x3, stride-1, ungrouped conv with zero padding = dilation = {d}, got {conv}",
            )
    biases = [conv.bias for conv in convs]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        unsupported("block", "either every conv has a bias or none does")
    weights = [conv.weight for conv in convs]
    biases = None if biases[0] is None else biases
    if bn.training or bn.running_mean is None:
        h = dilated_avg_block(x, weights, biases, dilations, bn=None, relu=False, allow_tf32=allow_tf32)
        return F.relu(bn(h))
    return dilated_avg_block(
        x, weights, biases, dilations, bn=fold_bn(bn, differentiable=True), relu=True, allow_tf32=allow_tf32
    )


def attention_forward(att: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """Run a reference :class:`fusionkern.models.layers.ChannelAttention` on the kernels, same result as ``att(f)``
    (train and eval mode alike: the layer has no mode-dependent parts).

    Raises:
        UnsupportedOptionError (a ValueError): ``att.mlp`` is not ``Sequential(Conv2d 1x1 no bias, ReLU, Conv2d 1x1
            no bias)``, or ``f`` is not supported by the kernels.
    """
    mlp = getattr(att, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
        unsupported("att", f"expected a ChannelAttention with mlp = Sequential(conv, ReLU, conv), got {att}")
    first, act, second = mlp
    if not isinstance(act, nn.ReLU):
        unsupported("att", f"the MLP's activation must be nn.ReLU, got {type(act).__name__}")
    for j, conv in ((0, first), (2, second)):
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            unsupported("att", f"mlp[{j}] must be an ungrouped 1x1 stride-1 nn.Conv2d, got {conv}")
        if conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1):
            unsupported("att", f"mlp[{j}] must have no padding, got {conv}")
        if conv.bias is not None:
            unsupported("att", f"mlp[{j}] must be bias-free (the kernels implement the paper's bias-free MLP)")
    return channel_attention(f, first.weight, second.weight)
