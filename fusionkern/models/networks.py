"""FusionNet and the paper's ablation ladder, assembled from :mod:`fusionkern.models.layers`.

* :class:`Backbone`: five convolution stages (optionally a Gabor first layer, mixed pooling, a dilated block).
* Single-input classifiers (B, 3, H, W) -> (B, 2): :class:`CNN5`, :class:`MPCNN5`, :class:`GCNN5`,
  :class:`DCNN5`, :class:`DGCNN` (paper Table II).
* :class:`FusionNet`: five branches (``BRANCHES`` order) -> concatenation -> :class:`ChannelAttention` -> CNN5 head
  (paper Fig. 2, Table III).

Every model keeps its constructor arguments in ``self.config`` so that a checkpoint can rebuild it.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern import BRANCHES
from fusionkern.errors import ConfigError, InputError, MissingDependencyError
from fusionkern.models.layers import BACKENDS, ChannelAttention, DilatedAvgBlock, GaborConv2d, MixPool2d
from fusionkern.models.presets import Preset, get_preset, resolve_alphas, scale_width

ORDERS = ("bn_pool", "pool_bn")


class ConvStage(nn.Module):
    """One stage: ``conv -> ReLU`` then ``BN -> pool`` (CNN5 order) or ``pool -> BN`` (DGCNN order).

    ``pool`` and ``bn`` may be ``None`` (the last stage before a dilated block has neither).
    """

    def __init__(self, conv: nn.Module, pool: nn.Module | None, bn: nn.BatchNorm2d | None, order: str):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.conv, self.pool, self.bn, self.order = conv, pool, bn, order

    backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from fusionkern.models.fused import stage_forward

            return stage_forward(self, x)
        x = F.relu(self.conv(x))
        first, second = (self.bn, self.pool) if self.order == "bn_pool" else (self.pool, self.bn)
        if first is not None:
            x = first(x)
        if second is not None:
            x = second(x)
        return x


class Backbone(nn.Module):
    """A stack of :class:`ConvStage` and an optional :class:`DilatedAvgBlock`; returns the feature map.

    Args:
        in_channels: input channels (3 dates for a branch, 5 x branch width for the fusion head).
        widths: output channels of each convolution.
        pools: whether a 2 x 2 pool follows each convolution.
        kernel_sizes: each convolution's kernel size (padding ``k // 2`` keeps the size).
        gabor: make the first convolution a :class:`GaborConv2d` (no bias).
        mixpool: :class:`MixPool2d` instead of max-pooling, initial alphas from ``alphas``.
        dilations: append a dilated block with these dilations (the last stage then has no BN of its own).
        order: ``"bn_pool"`` (CNN5) or ``"pool_bn"`` (DGCNN).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        pools: Sequence[bool],
        kernel_sizes: Sequence[int] | None = None,
        *,
        gabor: bool = False,
        mixpool: bool = False,
        alphas: str | Sequence[float] = "paper",
        dilations: Sequence[int] | None = None,
        order: str = "bn_pool",
        gabor_init: str = "grid",
        gabor_grid: str = "centered",
    ):
        super().__init__()
        kernel_sizes = tuple(kernel_sizes or (3,) * len(widths))
        alpha_iter = iter(resolve_alphas(alphas, sum(pools)) if mixpool else ())
        stages, c = [], in_channels
        for i, (w, pool, k) in enumerate(zip(widths, pools, kernel_sizes)):
            if gabor and i == 0:
                conv = GaborConv2d(c, w, k, padding=k // 2, init=gabor_init, grid=gabor_grid)
            else:
                conv = nn.Conv2d(c, w, k, padding=k // 2)
            pool_layer = (MixPool2d(2, 2, next(alpha_iter)) if mixpool else nn.MaxPool2d(2)) if pool else None
            last_before_block = dilations is not None and i == len(widths) - 1
            bn = None if last_before_block else nn.BatchNorm2d(w)
            stages.append(ConvStage(conv, pool_layer, bn, order))
            c = w
        self.stages = nn.Sequential(*stages)
        self.dilated = DilatedAvgBlock(c, dilations) if dilations is not None else None
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        x = self.stages(x)
        return self.dilated(x) if self.dilated is not None else x


# The ablation ladder (paper Table II): which components each single-input model has.
ABLATIONS = {
    "cnn5": dict(gabor=False, mixpool=False, dilated=False, order="bn_pool"),
    "mpcnn5": dict(gabor=False, mixpool=True, dilated=False, order="bn_pool"),
    "gcnn5": dict(gabor=True, mixpool=False, dilated=False, order="bn_pool"),
    "dcnn5": dict(gabor=False, mixpool=False, dilated=True, order="bn_pool"),
    "dgcnn": dict(gabor=True, mixpool=True, dilated=True, order="pool_bn"),
}


def make_backbone(
    kind: str,
    preset: Preset,
    width: float = 1.0,
    in_channels: int = 3,
    alphas: str | Sequence[float] = "paper",
    gabor_init: str = "grid",
    gabor_grid: str = "centered",
) -> Backbone:
    """The feature extractor of one ablation model (``cnn5`` ... ``dgcnn``) at a preset's shapes."""
    try:
        parts = ABLATIONS[kind]
    except KeyError:
        raise ConfigError(f"unknown backbone {kind!r}; choose one of {sorted(ABLATIONS)}") from None
    return Backbone(
        in_channels,
        [scale_width(w, width) for w in preset.widths],
        preset.pools,
        gabor=parts["gabor"],
        mixpool=parts["mixpool"],
        alphas=alphas,
        dilations=preset.dilations if parts["dilated"] else None,
        order=parts["order"],
        gabor_init=gabor_init,
        gabor_grid=gabor_grid,
    )


def check_backend_available(backend: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` cannot run on ``device`` here."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "torch":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingDependencyError("triton", "kernels", "The triton backend") from None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"the triton backend runs on a CUDA device, but the model is on {device}: move it with .cuda() first "
            "(TRITON_INTERPRET=1 runs the kernels on the CPU interpreter, slowly, for testing only)"
        )


class BackendMixin:
    """``model.to_backend("triton" | "torch")``: run the same weights on the fused kernels or the reference."""

    backend = "torch"
    channels_last = False

    def to_backend(self, backend: str, channels_last: bool | None = None) -> "BackendMixin":
        """Switch every stage, dilated block and attention layer to ``backend``; the state_dict is unchanged.

        Call it after moving the model to its device (the kernels run where the weights are). ``channels_last``
        (FusionNet on the triton backend; None keeps the setting): the branches' activations run channels-last
        (NHWC) from the first layer on, so the fused convolutions reduce over runs of adjacent input channels, which
        16-bit inputs need for pipelined (cp.async) loads on a GPU. The outputs are the same either way.
        """
        param = next(self.parameters())
        check_backend_available(backend, param.device)
        for module in self.modules():
            if isinstance(module, (ConvStage, DilatedAvgBlock, ChannelAttention)):
                module.backend = backend
        self.backend = backend
        if channels_last is not None:
            self.channels_last = bool(channels_last)
        return self


def _check_size(h: int, w: int, minimum: int, who: str) -> None:
    if min(h, w) < minimum:
        raise InputError(
            f"{who} needs inputs of at least {minimum} x {minimum} px, got {h} x {w}"
            " (chips are resized to the preset's input size with model.prepare())"
        )


def resize_chips(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of the last two axes of (..., C, H, W) chips to ``size x size`` (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-3:])


class _SingleInput(BackendMixin, nn.Module):
    """A single-input classifier: backbone -> global average pooling -> Linear(C, num_classes)."""

    kind = ""

    def __init__(
        self,
        preset: str = "paper",
        width: float = 1.0,
        num_classes: int = 2,
        in_channels: int = 3,
        alphas: str | Sequence[float] = "paper",
        gabor_init: str = "grid",
        gabor_grid: str = "centered",
    ):
        super().__init__()
        self.config = dict(
            preset=preset, width=width, num_classes=num_classes, in_channels=in_channels,
            alphas=alphas if isinstance(alphas, str) else list(alphas), gabor_init=gabor_init, gabor_grid=gabor_grid,
        )  # fmt: skip
        self.preset = get_preset(preset)
        self.features = make_backbone(self.kind, self.preset, width, in_channels, alphas, gabor_init, gabor_grid)
        self.fc = nn.Linear(self.features.out_channels, num_classes)

    @property
    def input_size(self) -> int:
        return self.preset.input_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (B, 3, h, w) chips to the preset's input size."""
        return resize_chips(x, self.input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C)
        if x.dim() != 4:
            raise InputError(f"{type(self).__name__} takes (B, 3, H, W) input, got shape {tuple(x.shape)}")
        _check_size(x.shape[-2], x.shape[-1], self.preset.branch_min_input, type(self).__name__)
        return self.features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes) logits
        return self.fc(self.forward_features(x))


class CNN5(_SingleInput):
    """Five conv layers (conv -> ReLU -> BN -> max-pool), global average pooling, Linear. The plain baseline."""

    kind = "cnn5"


class MPCNN5(_SingleInput):
    """CNN5 with mixed max/average pooling."""

    kind = "mpcnn5"


class GCNN5(_SingleInput):
    """CNN5 with a trainable Gabor first layer."""

    kind = "gcnn5"


class DCNN5(_SingleInput):
    """CNN5 with the averaged dilated block after the fifth convolution."""

    kind = "dcnn5"


class DGCNN(_SingleInput):
    """Dilated Gabor MixPool CNN: the FusionNet branch, as a single-input classifier."""

    kind = "dgcnn"


SINGLE_INPUT_MODELS = {cls.kind: cls for cls in (CNN5, MPCNN5, GCNN5, DCNN5, DGCNN)}


class FusionNet(BackendMixin, nn.Module):
    """Intermediate fusion of five branches: (B, 5, 3, H, W) in ``BRANCHES`` order -> (B, num_classes) logits.

    Each branch (``backbone="dgcnn"``, or ``"cnn5"`` for Table III's other row) maps its 3-date input to a feature
    map; the five maps are concatenated, recalibrated by :class:`ChannelAttention` and classified by a CNN5 head
    (conv -> ReLU -> BN -> max-pool stages, global average pooling, Linear).

    Args:
        preset: ``"paper"`` (256 px input, the authors' widths) or ``"native"`` (35 px chips, no upsampling).
        backbone: the branch network, ``"dgcnn"`` or ``"cnn5"``.
        width: channel multiplier for branches and head (tests build small models with e.g. 0.25).
        alphas: initial MixPool alphas, ``"paper"`` (1.0, 0.8, 0.6, 0.4), ``"authors"`` or explicit values.
    """

    def __init__(
        self,
        preset: str = "paper",
        backbone: str = "dgcnn",
        width: float = 1.0,
        num_classes: int = 2,
        alphas: str | Sequence[float] = "paper",
        gabor_init: str = "grid",
        gabor_grid: str = "centered",
        reduction: int = 2,
    ):
        super().__init__()
        if backbone not in ("dgcnn", "cnn5"):
            raise ConfigError(f"FusionNet backbone must be 'dgcnn' or 'cnn5', got {backbone!r}")
        self.config = dict(
            preset=preset, backbone=backbone, width=width, num_classes=num_classes,
            alphas=alphas if isinstance(alphas, str) else list(alphas), gabor_init=gabor_init,
            gabor_grid=gabor_grid, reduction=reduction,
        )  # fmt: skip
        self.preset = get_preset(preset)
        self.branches = nn.ModuleDict(
            {b: make_backbone(backbone, self.preset, width, 3, alphas, gabor_init, gabor_grid) for b in BRANCHES}
        )
        fused = sum(m.out_channels for m in self.branches.values())
        self.attention = ChannelAttention(fused, reduction)
        self.head = Backbone(
            fused,
            [scale_width(w, width) for w in self.preset.head_widths],
            self.preset.head_pools,
            self.preset.head_kernels,
            order="bn_pool",
        )
        self.fc = nn.Linear(self.head.out_channels, num_classes)

    @property
    def input_size(self) -> int:
        return self.preset.input_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (B, 5, 3, h, w) chips to the preset's input size (35 -> 256 for ``paper``)."""
        return resize_chips(x, self.input_size)

    @staticmethod
    def stack_branches(x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A dict keyed by branch name -> (B, 5, 3, H, W) in ``BRANCHES`` order."""
        missing = [b for b in BRANCHES if b not in x]
        if missing:
            raise InputError(f"FusionNet input is missing branch(es) {missing}; expected keys {list(BRANCHES)}")
        return torch.stack([x[b] for b in BRANCHES], dim=1)

    def fuse(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Branch maps, concatenated and recalibrated by channel attention: (B, 5 * C_branch, h, w)."""
        if isinstance(x, Mapping):
            x = self.stack_branches(x)
        if x.dim() != 5 or x.shape[1] != len(BRANCHES) or x.shape[2] != 3:
            raise InputError(f"FusionNet takes (B, 5, 3, H, W) input in {BRANCHES} order, got {tuple(x.shape)}")
        _check_size(x.shape[-2], x.shape[-1], self.preset.min_input, f"FusionNet(preset={self.preset.name!r})")
        if self.backend == "triton":  # each stage of the five branches in one grouped launch
            from fusionkern.models.fused import branches_forward

            return self.attention(branches_forward(list(self.branches.values()), x, channels_last=self.channels_last))
        maps = [branch(x[:, i]) for i, branch in enumerate(self.branches.values())]
        return self.attention(torch.cat(maps, dim=1))

    def forward_features(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:  # -> (B, C_head)
        return self.head(self.fuse(x)).mean((2, 3))

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:  # -> (B, num_classes)
        return self.fc(self.forward_features(x))


class PhysicsNet(nn.Module):
    """A small verifier on the bands in physical units: the five inputs' fifteen channels together, three conv
    layers (conv -> ReLU -> BN, the first two max-pooled), global max pooling, Linear.

    The scanner's FusionNet sees each chip channel stretched to its own min..max; this network is meant to be
    trained on :func:`~fusionkern.data.transforms.physical_scale` chips (``fusionkern train --model physicsnet
    --scaling physical``), with works of other heavy industry among its negatives, and used only as a verifier of
    candidates (``fusionkern scan --verify``). The global maximum asks "is there such a works anywhere in the
    chip", which suits chips re-centred on a candidate's peak. It runs on torch only (no fused kernels).

    Args:
        preset: ``native`` (35 px chips; the only one: the scan's chips at 30 m).
        width: Channel multiplier (32, 64, 64 at 1.0).
        num_classes: Output classes.
    """

    backend = "torch"

    def __init__(self, preset: str = "native", width: float = 1.0, num_classes: int = 2):
        super().__init__()
        if preset != "native":
            raise ConfigError(f"PhysicsNet takes the scan's 35 px chips (preset native), not preset {preset!r}")
        self.config = dict(preset=preset, width=width, num_classes=num_classes)
        self.preset = get_preset(preset)
        c1, c2, c3 = (max(4, int(round(c * width))) for c in (32, 64, 64))
        channels = len(BRANCHES) * 3

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.features = nn.Sequential(*block(channels, c1, True), *block(c1, c2, True), *block(c2, c3, False))
        self.fc = nn.Linear(c3, num_classes)

    @property
    def input_size(self) -> int:
        return self.preset.input_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 5, 3, h, w) chips at the preset's input size (35 px chips pass unchanged)."""
        return resize_chips(x, self.input_size)

    def to_backend(self, backend: str) -> "PhysicsNet":
        if backend != "torch":
            raise ConfigError(f"PhysicsNet runs on the torch backend only, not {backend!r}")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 5, 3, H, W) -> (B, num_classes)
        if x.dim() != 5 or x.shape[1:3] != (len(BRANCHES), 3):
            raise InputError(f"PhysicsNet takes (B, {len(BRANCHES)}, 3, H, W) chips, got shape {tuple(x.shape)}")
        features = self.features(x.flatten(1, 2))
        return self.fc(torch.amax(features, dim=(2, 3)))


FIVE_INPUT_MODELS = {"fusionnet": FusionNet, "physicsnet": PhysicsNet}
"""Models that take all five inputs, (B, 5, 3, H, W), by ``fusionkern train --model`` name."""


def takes_all_branches(model: nn.Module) -> bool:
    """Whether ``model`` takes all five inputs (a :data:`FIVE_INPUT_MODELS` class), not one branch."""
    return isinstance(model, tuple(FIVE_INPUT_MODELS.values()))


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "FusionNet": FusionNet,
    "PhysicsNet": PhysicsNet,
    **{cls.__name__: cls for cls in SINGLE_INPUT_MODELS.values()},
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: ``fusionnet`` or one of the single-input models (case-insensitive)."""
    key = name.lower()
    if key in FIVE_INPUT_MODELS:
        return FIVE_INPUT_MODELS[key](**kwargs)
    if key in SINGLE_INPUT_MODELS:
        return SINGLE_INPUT_MODELS[key](**kwargs)
    raise ConfigError(f"unknown model {name!r}; choose fusionnet, physicsnet or one of {sorted(SINGLE_INPUT_MODELS)}")
