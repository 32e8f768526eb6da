"""The reference layers run on the Triton kernels: the glue between modules and the kernels' tensor APIs.

The kernels (:mod:`fusionkern.kernels`) take tensors and plain parameters only; the functions here read a
reference module's weights and options and call them, giving the module's own result, train and eval:

* :func:`stage_forward`: a :class:`~fusionkern.models.networks.ConvStage` (Gabor or plain conv, ReLU, mixed or
  max pooling, BatchNorm in either order) on ``gabor_conv2d`` / ``conv2d_mixpool``;
* :func:`block_forward`: a :class:`~fusionkern.models.layers.DilatedAvgBlock` on ``dilated_avg_block``;
* :func:`attention_forward`: a :class:`~fusionkern.models.layers.ChannelAttention` on ``channel_attention``;
* :func:`branches_forward`: the five branches of a FusionNet, each stage of all five in one grouped launch.

``model.to_backend("triton")`` makes those layers call these. Importing this module imports Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern.kernels import channel_attention, conv2d_mixpool, dilated_avg_block, fold_bn, gabor_conv2d
from fusionkern.kernels._common import square_int, unsupported
from fusionkern.models.layers import GaborConv2d, MixPool2d
from fusionkern.models.networks import ConvStage

__all__ = ["attention_forward", "block_forward", "branches_forward", "can_group_stages", "grouped_blocks_forward",
           "stage_forward"]

_LAYER_NOTES: contextvars.ContextVar[list | None] = contextvars.ContextVar("fusionkern_layer_notes", default=None)


@contextlib.contextmanager
def layer_notes(sink: list) -> Iterator[None]:
    """Append to ``sink`` the name of each grouped layer :func:`branches_forward` runs (for launch records, which
    otherwise name a layer by its module's forward hook: grouped stages run no module of their own)."""
    token = _LAYER_NOTES.set(sink)
    try:
        yield
    finally:
        _LAYER_NOTES.reset(token)


def _note(name: str) -> None:
    sink = _LAYER_NOTES.get()
    if sink is not None:
        sink.append(name)


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
    fold = _fold_decision(bn_mod)
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
    weights, biases, dilations, bn = _block_parts(block)
    if not _block_folds(bn):
        h = dilated_avg_block(x, weights, biases, dilations, bn=None, relu=False, allow_tf32=allow_tf32)
        return F.relu(bn(h))
    return dilated_avg_block(
        x, weights, biases, dilations, bn=fold_bn(bn, differentiable=True), relu=True, allow_tf32=allow_tf32
    )


def _block_folds(bn: nn.BatchNorm2d) -> bool:
    """Whether a dilated block's BatchNorm folds into the kernel's epilogue (eval mode with running statistics)."""
    return not (bn.training or bn.running_mean is None)


def _block_parts(block: nn.Module) -> tuple[list, list | None, tuple, nn.BatchNorm2d]:
    """``(weights, biases or None, dilations, bn)`` of a ``DilatedAvgBlock``-shaped module, checked."""
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
    return weights, (None if biases[0] is None else biases), tuple(dilations), bn


def grouped_blocks_forward(
    blocks: Sequence[nn.Module], x: torch.Tensor, *, allow_tf32: bool | None = None
) -> torch.Tensor | None:
    """Dilated blocks of several branches (same dilations and shapes) on ``x`` = their inputs concatenated along
    channels, as one grouped launch; their outputs concatenated along channels, as
    ``torch.cat([block_forward(b, x_g) ...], 1)``. ``None`` when the blocks differ and must run one by one."""
    parts = [_block_parts(b) for b in blocks]
    weights0, biases0, dilations0, bn0 = parts[0]
    folded = _block_folds(bn0)
    for weights, biases, dilations, bn in parts[1:]:
        if dilations != dilations0 or (biases is None) != (biases0 is None):
            return None
        if [tuple(w.shape) for w in weights] != [tuple(w.shape) for w in weights0]:
            return None
        if _block_folds(bn) != folded:
            return None
    G = len(blocks)
    n = len(dilations0)
    weights = [torch.cat([p[0][j] for p in parts]) for j in range(n)]
    biases = None if biases0 is None else [torch.cat([p[1][j] for p in parts]) for j in range(n)]
    if not folded:
        h = dilated_avg_block(x, weights, biases, dilations0, bn=None, relu=False, allow_tf32=allow_tf32, groups=G)
        return F.relu(_per_group([p[3] for p in parts], h))
    pairs = [fold_bn(p[3], differentiable=True) for p in parts]
    bn = (torch.cat([q[0] for q in pairs]), torch.cat([q[1] for q in pairs]))
    return dilated_avg_block(x, weights, biases, dilations0, bn=bn, relu=True, allow_tf32=allow_tf32, groups=G)


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


# --------------------------------------------------------------------------------------------------------------
# Branch-batched stages: one grouped launch per stage for all branches
# --------------------------------------------------------------------------------------------------------------

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _same(values: Sequence) -> bool:
    return all(v == values[0] for v in values[1:])


def _fold_decision(bn_mod: nn.Module | None) -> bool:
    """Whether a stage's BatchNorm folds into the kernel's epilogue (:func:`stage_forward`, grouped stages)."""
    return (
        bn_mod is not None
        and not bn_mod.training
        and bn_mod.track_running_stats
        and not (torch.is_grad_enabled() and any(p.requires_grad for p in bn_mod.parameters()))
    )


def can_group_stages(stages: Sequence[nn.Module]) -> bool:
    """Whether these stages (one per branch, same position) can run as one grouped launch: the same kind of conv
    with the same shape and options, the same pool kind and BN arrangement, each supported by :func:`stage_forward`."""
    if not stages or not all(isinstance(s, ConvStage) for s in stages):
        return False
    convs = [s.conv for s in stages]
    kinds = {type(c) for c in convs}
    if len(kinds) != 1 or not kinds <= {GaborConv2d, nn.Conv2d}:
        return False
    if isinstance(convs[0], GaborConv2d):
        attrs = ("kernel_size", "stride", "padding", "dilation", "grid")
        if not all(_same([getattr(c, a) for c in convs]) for a in attrs) or not _same([c.freq.shape for c in convs]):
            return False
    else:
        if not all(_same([getattr(c, a) for c in convs]) for a in _CONV_ATTRS) or convs[0].groups != 1:
            return False
        if isinstance(convs[0].padding, str) or convs[0].padding_mode != "zeros":
            return False
        if not _same([c.bias is None for c in convs]):
            return False
    pools = [s.pool for s in stages]
    if not _same([type(p) for p in pools]) or not _same([s.order for s in stages]):
        return False
    if pools[0] is not None and not isinstance(pools[0], (MixPool2d, nn.MaxPool2d)):
        return False
    bns = [s.bn for s in stages]
    if not _same([b is None for b in bns]):
        return False
    if bns[0] is not None:
        if not all(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in bns):
            return False
        if not _same([_fold_decision(b) for b in bns]):
            return False
    return True


def _grouped_call(stages: Sequence[ConvStage], x: torch.Tensor, pooled: bool, folded: bool,
                  allow_tf32: bool | None) -> torch.Tensor:  # fmt: skip
    """conv -> ReLU -> [pool] -> [folded BN] of every stage as one grouped kernel launch."""
    G = len(stages)
    alphas = [_pool_alpha(s.pool) for s in stages] if pooled else None
    if alphas is None:
        alpha = None
    elif isinstance(alphas[0], torch.Tensor):
        alpha = torch.stack([a.reshape(()) for a in alphas])
    else:
        alpha = 1.0  # MaxPool2d(2) in every branch
    bn = None
    if folded:
        pairs = [fold_bn(s.bn) for s in stages]
        bn = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    convs = [s.conv for s in stages]
    first = convs[0]
    if isinstance(first, GaborConv2d):
        params = [torch.cat([getattr(c, name) for c in convs]) for name in ("freq", "theta", "sigma", "psi")]
        return gabor_conv2d(
            x, *params, first.kernel_size, first.stride, first.padding, first.dilation, relu=True, pool_alpha=alpha,
            grid=first.grid, bn=bn, groups=G, allow_tf32=allow_tf32,
        )  # fmt: skip
    weight = torch.cat([c.weight for c in convs])
    bias = None if first.bias is None else torch.cat([c.bias for c in convs])
    return conv2d_mixpool(
        x, weight, bias, alpha, stride=first.stride, padding=first.padding, dilation=first.dilation, relu=True,
        bn=bn, groups=G, allow_tf32=allow_tf32,
    )  # fmt: skip


def _per_group(modules: Sequence[nn.Module], y: torch.Tensor) -> torch.Tensor:
    """Each module on its group's channels of ``y`` (BatchNorm in training, a pool), concatenated back."""
    c = y.shape[1] // len(modules)
    return torch.cat([m(y[:, g * c : (g + 1) * c]) for g, m in enumerate(modules)], dim=1)


def grouped_stage_forward(
    stages: Sequence[nn.Module], x: torch.Tensor, *, allow_tf32: bool | None = None
) -> torch.Tensor:
    """The same stage of several branches (:func:`can_group_stages`) on ``x`` = their inputs concatenated along
    channels, in one grouped launch; returns their outputs concatenated along channels. Equals
    ``torch.cat([stage_forward(s, x_g) for ...], 1)``: BatchNorm folds into the launch in eval mode and runs per
    branch as the torch op in training (its running statistics stay each branch's own)."""
    if not can_group_stages(stages):
        unsupported("stages", "the branches' stages differ in kind, shape or options; run them one by one")
    first = stages[0]
    pooled = first.pool is not None
    has_bn = first.bn is not None
    fold = has_bn and _fold_decision(first.bn)
    bn_between = first.order == "bn_pool" and has_bn and pooled
    if not bn_between:
        y = _grouped_call(stages, x, pooled, fold, allow_tf32)
        return _per_group([s.bn for s in stages], y) if (has_bn and not fold) else y
    y = _grouped_call(stages, x, False, fold, allow_tf32)
    if not fold:
        y = _per_group([s.bn for s in stages], y)
    if isinstance(first.pool, nn.MaxPool2d):
        return first.pool(y)  # the same pool in every branch
    return _per_group([s.pool for s in stages], y)


def branches_forward(
    backbones: Sequence[nn.Module], x: torch.Tensor, *, allow_tf32: bool | None = None, channels_last: bool = False
) -> torch.Tensor:
    """FusionNet's branches on the kernels: ``x`` (B, G, C, H, W), branch ``g`` reading ``x[:, g]`` -> their feature
    maps concatenated along channels, (B, G * C_out, h, w), as ``torch.cat([backbone_g(x[:, g]) ...], 1)``.

    Each stage of all branches, and their dilated blocks, run as one grouped launch each (``groups`` = branches), so
    the launch grid holds every branch's tiles instead of one branch's; stages or blocks that cannot be grouped
    (:func:`can_group_stages`, blocks of other shapes) run branch by branch on their channel slices. With
    ``channels_last`` the grouped input is laid out NHWC and the kernels keep that layout from layer to layer.
    """
    G = len(backbones)
    B = x.shape[0]
    h = x.reshape(B, G * x.shape[2], *x.shape[3:])
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    for i, stages in enumerate(zip(*(b.stages for b in backbones))):
        if can_group_stages(stages):
            _note(f"branches.stages.{i}")
            h = grouped_stage_forward(stages, h, allow_tf32=allow_tf32)
        else:
            h = _per_group(stages, h)  # each stage module on its branch's channels (its own backend)
    blocks = [b.dilated for b in backbones]
    if all(block is not None for block in blocks):
        _note("branches.dilated")
        grouped = grouped_blocks_forward(blocks, h, allow_tf32=allow_tf32)
        h = grouped if grouped is not None else _per_group(blocks, h)
    elif any(block is not None for block in blocks):
        h = _per_group([b if b is not None else nn.Identity() for b in blocks], h)
    return h
