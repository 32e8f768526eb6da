"""The plain-PyTorch reference FusionNet: the ground truth every kernel, engine and backend is tested against."""

from fusionkern import BRANCHES
from fusionkern.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fusionkern.models.layers import (
    ChannelAttention,
    DilatedAvgBlock,
    GaborConv2d,
    MixPool2d,
    gabor_bank,
    gabor_grid,
)
from fusionkern.models.networks import (
    CNN5,
    DCNN5,
    DGCNN,
    GCNN5,
    MPCNN5,
    FIVE_INPUT_MODELS,
    SINGLE_INPUT_MODELS,
    Backbone,
    ConvStage,
    FusionNet,
    PhysicsNet,
    build_model,
    resize_chips,
)
from fusionkern.models.presets import ALPHAS, PRESETS, Preset, get_preset
from fusionkern.models.profile import count_parameters, flops_per_site, profile

__all__ = [
    "ALPHAS", "BRANCHES", "CNN5", "DCNN5", "DGCNN", "FIVE_INPUT_MODELS", "GCNN5", "MPCNN5", "PRESETS",
    "SINGLE_INPUT_MODELS",
    "Backbone", "ChannelAttention", "ConvStage", "DilatedAvgBlock", "FusionNet", "GaborConv2d", "MixPool2d",
    "PhysicsNet", "Preset", "build_model", "count_parameters", "flops_per_site", "gabor_bank", "gabor_grid",
    "get_preset", "load_checkpoint", "profile", "read_checkpoint", "resize_chips", "save_checkpoint",
]  # fmt: skip
