"""The export-safe form of a fusionkern model: the same function, written only in standard ONNX operators.

:func:`exportable` turns a reference model (:class:`~fusionkern.models.FusionNet` or one of the single-input
classifiers) into a plain ``nn.Module`` that computes the same logits in inference mode and that both exporters
turn into a small, standard graph:

* :class:`~fusionkern.models.GaborConv2d` -> ``Conv`` with the Gabor bank materialised as a constant weight.
* BatchNorm (inference statistics) is folded wherever an exact fold exists, and is otherwise a per-channel affine
  ``Mul`` + ``Add`` (:class:`ChannelAffine`):

  - in the dilated block (convolutions -> sum -> BN -> ReLU) into the convolutions themselves;
  - before a convolution without padding (the native head's 1 x 1 layers) into that convolution;
  - before the final global average pooling into the classifier (the mean commutes with a per-channel affine).

  A BN that follows a ReLU and precedes a pool or a padded convolution cannot be folded exactly: a negative
  scale does not commute with max-pooling, and zero padding of ``a * x + b`` is not ``a * pad(x) + b``.
* :class:`~fusionkern.models.MixPool2d` -> ``MaxPool`` and ``AveragePool`` mixed with constant alphas
  (:class:`ConstMixPool2d`); an alpha of exactly 1 or 0 leaves only the pool it selects.
* :class:`~fusionkern.models.layers.ChannelAttention` -> ``GlobalAveragePool`` / ``GlobalMaxPool``, two 1 x 1
  ``Conv`` shared by both descriptors, ``Sigmoid``, ``Mul``, ``Add``.
* FusionNet's five branches stay five branch graphs by default. ``fuse_branches=True`` makes them one branch
  network over the 15 stacked input channels, every convolution grouped by branch (``group=5``): grouped
  convolution computes exactly the per-branch sums, in the reference's concatenation order. On onnxruntime's CPU
  provider the grouped form was slower at batch 16 and 64 (1.33x and 1.20x eager, against 1.63x and 1.46x for five
  branches, native preset, one thread) and equal at batch 1, hence the default.
* No Python-side shape or type checks: the traced graph is the arithmetic only. Inputs must already be at the
  model's input size (``model.prepare`` resizes chips; the export records that size).

The export-safe module is frozen (eval mode, no parameter requires a gradient): a snapshot of the reference model's
inference function, rebuilt from it whenever needed, never trained or saved on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern import BRANCHES
from fusionkern.errors import ConfigError
from fusionkern.models.layers import ChannelAttention, DilatedAvgBlock, GaborConv2d, MixPool2d
from fusionkern.models.networks import Backbone, ConvStage, FusionNet, _SingleInput

__all__ = [
    "ChannelAffine",
    "ConstMixPool2d",
    "DilatedSum",
    "ExportAttention",
    "ExportClassifier",
    "ExportFusionNet",
    "Fp16Body",
    "exportable",
]

_FOLD_DTYPE = torch.float64  # folds are computed in double precision, then rounded once to float32


# --------------------------------------------------------------------------------------------------------------
# Export-safe layers
# --------------------------------------------------------------------------------------------------------------


class ChannelAffine(nn.Module):
    """Inference-mode BatchNorm as ``x * scale + shift`` with per-channel constants of shape (C, 1, 1)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.reshape(-1, 1, 1).float().clone())
        self.register_buffer("shift", shift.reshape(-1, 1, 1).float().clone())

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> ChannelAffine:
        scale, shift = _bn_affine(bn)
        return cls(scale, shift)

    @classmethod
    def concat(cls, parts: Iterable[ChannelAffine]) -> ChannelAffine:
        parts = list(parts)
        return cls(torch.cat([p.scale for p in parts]), torch.cat([p.shift for p in parts]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x * self.scale + self.shift


class ConstMixPool2d(nn.Module):
    """Mixed pooling with constant alphas: ``alpha * MaxPool(x) + (1 - alpha) * AveragePool(x)``.

    ``alpha`` is a scalar or one value per channel (branches fused into one graph keep their own alphas). When
    every alpha is exactly 1 (or 0) only the max (or average) pool is computed, which is the same result.
    """

    def __init__(self, kernel_size: int, stride: int, alpha: torch.Tensor):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        alpha = alpha.detach().float().reshape(-1)
        self.mode = "max" if bool((alpha == 1).all()) else "avg" if bool((alpha == 0).all()) else "mix"
        if alpha.numel() > 1 and bool((alpha == alpha[0]).all()):
            alpha = alpha[:1]
        shape = (-1, 1, 1) if alpha.numel() > 1 else ()
        # (1 - alpha) is rounded in float32 exactly as the reference computes it.
        self.register_buffer("alpha", alpha.reshape(shape).clone())
        self.register_buffer("beta", (1 - alpha).reshape(shape).clone())

    @classmethod
    def from_mixpool(cls, pools: Iterable[MixPool2d], channels: Iterable[int]) -> ConstMixPool2d:
        """One pool for channel blocks ``channels[i]`` wide, each mixed with ``pools[i].alpha``."""
        pools = list(pools)
        ks = {(p.kernel_size, p.stride) for p in pools}
        if len(ks) != 1:
            raise ConfigError(f"cannot fuse MixPool2d layers of different shapes {sorted(ks)}")
        alpha = torch.cat([p.alpha.detach().reshape(1).expand(c) for p, c in zip(pools, channels)])
        ((k, s),) = ks
        return cls(k, s, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H // 2, W // 2)
        if self.mode == "max":
            return F.max_pool2d(x, self.kernel_size, self.stride)
        if self.mode == "avg":
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        mx = F.max_pool2d(x, self.kernel_size, self.stride)
        av = F.avg_pool2d(x, self.kernel_size, self.stride)
        return self.alpha * mx + self.beta * av

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode}"


class DilatedSum(nn.Module):
    """The dilated block with its BatchNorm folded in: ``ReLU(sum_d conv_d(x))`` (eq. 5's mean is in the weights)."""

    def __init__(self, convs: Iterable[nn.Conv2d]):
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs[0](x)
        for conv in self.convs[1:]:
            h = h + conv(x)
        return F.relu(h)


class ExportAttention(nn.Module):
    """Channel attention as ``F * (1 + sigmoid(MLP(GlobalAveragePool F) + MLP(GlobalMaxPool F)))``."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def mlp(self, d: torch.Tensor) -> torch.Tensor:
        return self.expand(F.relu(self.reduce(d)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        avg = F.adaptive_avg_pool2d(f, 1)
        mx = F.adaptive_max_pool2d(f, 1)
        return f * (1 + torch.sigmoid(self.mlp(avg) + self.mlp(mx)))


def _global_average(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ExportClassifier(nn.Module):
    """A single-input model: ``features`` -> global average pooling -> ``fc``. Input (B, 3, S, S) -> logits."""

    def __init__(self, features: nn.Sequential, fc: nn.Linear):
        super().__init__()
        self.features, self.fc = features, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_global_average(self.features(x)))


class ExportFusionNet(nn.Module):
    """FusionNet: branches -> attention -> head -> global average pooling -> fc. Input (B, 5, 3, S, S) -> logits.

    With ``branches`` a single ``nn.Sequential`` the five branches run as one grouped network on the input viewed
    as (B, 15, S, S); with an ``nn.ModuleList`` of five, each branch gets its own slice of the input.
    """

    def __init__(self, branches: nn.Module, attention: ExportAttention, head: nn.Sequential, fc: nn.Linear):
        super().__init__()
        self.branches, self.attention, self.head, self.fc = branches, attention, head, fc
        self.fused = isinstance(branches, nn.Sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            maps = self.branches(torch.flatten(x, 1, 2))
        else:
            maps = torch.cat([branch(x.narrow(1, i, 1).squeeze(1)) for i, branch in enumerate(self.branches)], dim=1)
        return self.fc(_global_average(self.head(self.attention(maps))))


class Fp16Body(nn.Module):
    """Runs ``body`` in float16 between float32 inputs and outputs (a ``Cast`` at either end of the graph)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body.half()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.half()).float()


# --------------------------------------------------------------------------------------------------------------
# Folding helpers (double precision, one rounding at the end)
# --------------------------------------------------------------------------------------------------------------


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` in inference mode, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f"cannot export {bn}: it has no running statistics (track_running_stats=False)")
    var = bn.running_var.detach().to(_FOLD_DTYPE)
    mean = bn.running_mean.detach().to(_FOLD_DTYPE)
    gamma = bn.weight.detach().to(_FOLD_DTYPE) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(_FOLD_DTYPE) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _plain_conv(weight: torch.Tensor, bias: torch.Tensor | None, *, stride=1, padding=0, dilation=1, groups=1):
    """An ``nn.Conv2d`` holding ``weight`` (out, in / groups, kh, kw) and ``bias``, rounded to float32 once."""
    out_c, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_c, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias is not None)  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        if bias is not None:
            conv.bias.copy_(bias.float())
    return conv


def _conv_weight(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a plain or Gabor convolution, in float64."""
    if isinstance(conv, GaborConv2d):
        with torch.no_grad():
            return gabor_weight(conv).to(_FOLD_DTYPE), None
    bias = conv.bias.detach().to(_FOLD_DTYPE) if conv.bias is not None else None
    return conv.weight.detach().to(_FOLD_DTYPE), bias


def gabor_weight(conv: GaborConv2d) -> torch.Tensor:
    """The Gabor bank exactly as the reference computes it for a forward pass (same dtype, same rounding)."""
    return conv.weight().detach()


def _conv_geometry(conv: nn.Module) -> dict:
    if isinstance(conv, GaborConv2d):
        return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": 1}
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ConfigError(f"cannot export {conv}: only numeric zero padding is supported")
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}


def _fused_conv(convs: list[nn.Module]) -> nn.Conv2d:
    """One convolution for ``convs`` side by side: grouped by branch when there are several.

    The weights are taken as the reference uses them (a Gabor bank is not recomputed in double precision, so that
    the exported constant is bit-identical to the reference's weight).
    """
    geoms = [_conv_geometry(c) for c in convs]
    if any(g != geoms[0] for g in geoms) or geoms[0]["groups"] != 1:
        raise ConfigError("cannot fuse branch convolutions of different shapes or grouped convolutions")
    weights, biases = [], []
    for c in convs:
        if isinstance(c, GaborConv2d):
            weights.append(gabor_weight(c).float())
            biases.append(None)
        else:
            weights.append(c.weight.detach().float())
            biases.append(c.bias.detach().float() if c.bias is not None else None)
    bias = (
        None
        if all(b is None for b in biases)
        else torch.cat([b if b is not None else torch.zeros(w.shape[0]) for b, w in zip(biases, weights)])
    )
    g = dict(geoms[0], groups=len(convs))
    return _plain_conv(torch.cat(weights), bias, **g)


# --------------------------------------------------------------------------------------------------------------
# Building the export-safe form
# --------------------------------------------------------------------------------------------------------------


def _stage_ops(stages: list[ConvStage]) -> list[nn.Module]:
    """The plain op sequence of one stage position across ``stages`` (one per branch, fused side by side)."""
    first = stages[0]
    conv = _fused_conv([s.conv for s in stages])
    widths = [_out_channels(s.conv) for s in stages]
    ops: list[nn.Module] = [conv, nn.ReLU()]
    pool = None
    if first.pool is not None:
        if isinstance(first.pool, MixPool2d):
            pool = ConstMixPool2d.from_mixpool([s.pool for s in stages], widths)
        elif isinstance(first.pool, nn.MaxPool2d):
            pool = copy.deepcopy(first.pool)
        else:
            raise ConfigError(f"cannot export pooling layer {first.pool}")
    bn = ChannelAffine.concat(ChannelAffine.from_batchnorm(s.bn) for s in stages) if first.bn is not None else None
    ordered = (bn, pool) if first.order == "bn_pool" else (pool, bn)
    ops.extend(op for op in ordered if op is not None)
    return ops


def _out_channels(conv: nn.Module) -> int:
    return conv.out_channels


def _dilated_ops(blocks: list[DilatedAvgBlock]) -> list[nn.Module]:
    """The dilated blocks (one per branch) with BN and the mean folded into the convolutions."""
    n_other = len(blocks[0].dilations) - 1
    per_dilation: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in blocks[0].dilations]
    for block in blocks:
        scale, shift = _bn_affine(block.bn)
        for j, conv in enumerate(block.convs):
            w, b = _conv_weight(conv)
            factor = scale if j == 0 else scale / n_other
            w = w * factor[:, None, None, None]
            b = b * factor if b is not None else torch.zeros_like(scale)
            if j == 0:
                b = b + shift
            per_dilation[j].append((w, b))
    convs = []
    for j, d in enumerate(blocks[0].dilations):
        w = torch.cat([wb[0] for wb in per_dilation[j]])
        convs.append(_plain_conv(w, None, padding=d, dilation=d, groups=len(blocks)))
    # All biases (and the BN shift) go onto the first convolution, as one sum: fewer rounding steps.
    bias = sum(torch.cat([wb[1] for wb in per_dilation[j]]) for j in range(len(convs)))
    with torch.no_grad():
        convs[0].bias = nn.Parameter(bias.float())
    return [DilatedSum(convs)]


def _backbone_ops(backbones: list[Backbone]) -> list[nn.Module]:
    ops: list[nn.Module] = []
    for stages in zip(*(b.stages for b in backbones)):
        ops.extend(_stage_ops(list(stages)))
    if backbones[0].dilated is not None:
        ops.extend(_dilated_ops([b.dilated for b in backbones]))
    return ops


def _fold_affine_into_conv(affine: ChannelAffine, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv(affine(x))`` as one convolution; exact only without padding, which the caller checks."""
    w = conv.weight.detach().to(_FOLD_DTYPE)
    scale = affine.scale.reshape(-1).to(_FOLD_DTYPE)
    shift = affine.shift.reshape(-1).to(_FOLD_DTYPE)
    groups = conv.groups
    in_per_group = w.shape[1]
    out_per_group = w.shape[0] // groups
    # Input channel of weight [o, i]: group(o) * in_per_group + i.
    group_of_out = torch.arange(w.shape[0]) // out_per_group
    in_index = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    new_w = w * scale[in_index][:, :, None, None]
    bias = conv.bias.detach().to(_FOLD_DTYPE) if conv.bias is not None else torch.zeros(w.shape[0], dtype=_FOLD_DTYPE)
    bias = bias + (w * shift[in_index][:, :, None, None]).sum((1, 2, 3))
    return _plain_conv(new_w, bias, stride=conv.stride, padding=0, dilation=conv.dilation, groups=groups)


def _peephole(ops: list[nn.Module]) -> list[nn.Module]:
    """Fold every :class:`ChannelAffine` directly followed by an unpadded convolution into that convolution."""
    out: list[nn.Module] = []
    for op in ops:
        if isinstance(op, nn.Conv2d) and out and isinstance(out[-1], ChannelAffine) and all(p == 0 for p in op.padding):
            out[-1] = _fold_affine_into_conv(out[-1], op)
            continue
        out.append(op)
    return out


def _fold_tail_affine(ops: list[nn.Module], fc: nn.Linear) -> tuple[list[nn.Module], nn.Linear]:
    """Fold a trailing :class:`ChannelAffine` through the global average pool into the classifier."""
    w = fc.weight.detach().to(_FOLD_DTYPE)
    b = fc.bias.detach().to(_FOLD_DTYPE) if fc.bias is not None else torch.zeros(w.shape[0], dtype=_FOLD_DTYPE)
    if ops and isinstance(ops[-1], ChannelAffine):
        affine = ops.pop()
        scale = affine.scale.reshape(-1).to(_FOLD_DTYPE)
        shift = affine.shift.reshape(-1).to(_FOLD_DTYPE)
        b = b + w @ shift
        w = w * scale[None, :]
    new_fc = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        new_fc.weight.copy_(w.float())
        new_fc.bias.copy_(b.float())
    return ops, new_fc


def _attention(att: ChannelAttention) -> ExportAttention:
    reduce, _, expand = att.mlp
    return ExportAttention(_plain_conv(reduce.weight.detach(), None), _plain_conv(expand.weight.detach(), None))


def _freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the export-safe form is a snapshot, never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def exportable(model: nn.Module, *, fuse_branches: bool = False) -> nn.Module:
    """An export-safe copy of ``model`` with the same inference-mode outputs (see the module docstring).

    Args:
        model: A :class:`~fusionkern.models.FusionNet` (either backbone, either preset) or a single-input model
            (``CNN5`` ... ``DGCNN``). It is not modified; BatchNorm uses its running statistics whatever mode the
            model is in.
        fuse_branches: FusionNet only: run the five branches as one grouped network, or as five (default).

    Returns:
        A float32 module in eval mode taking (B, 5, 3, S, S) (FusionNet) or (B, 3, S, S) inputs at the model's
        input size ``S`` and returning (B, num_classes) logits. Its ``config`` records the source model.
    """
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()  # the caller's model stays where it is
    if isinstance(model, FusionNet):
        backbones = [model.branches[b] for b in BRANCHES]
        if fuse_branches:
            branches: nn.Module = nn.Sequential(*_peephole(_backbone_ops(backbones)))
        else:
            branches = nn.ModuleList(nn.Sequential(*_peephole(_backbone_ops([b]))) for b in backbones)
        head_ops = _peephole(_backbone_ops([model.head]))
        head_ops, fc = _fold_tail_affine(head_ops, model.fc)
        out: nn.Module = ExportFusionNet(branches, _attention(model.attention), nn.Sequential(*head_ops), fc)
    elif isinstance(model, _SingleInput):
        ops = _peephole(_backbone_ops([model.features]))
        ops, fc = _fold_tail_affine(ops, model.fc)
        out = ExportClassifier(nn.Sequential(*ops), fc)
    else:
        raise ConfigError(
            f"cannot make an export-safe form of a {type(model).__name__}: expected FusionNet or a single-input "
            "fusionkern model (CNN5, MPCNN5, GCNN5, DCNN5, DGCNN)"
        )
    out.source_class = type(model).__name__
    out.config = dict(getattr(model, "config", {}))
    out.input_size = model.input_size
    return _freeze(out)
