"""Triton kernels of the FusionNet branch, with gradients (installed as ``fusionkern.kernels``).

One op per module: ``gabor_conv`` (Gabor generation + conv + ReLU + mixed pooling), ``conv_mixpool`` (3 x 3 conv +
ReLU + mixed pooling, BN folded in inference), ``dilated`` (the dilated block in one pass), ``attention`` (channel
attention). ``stage_forward``, ``block_forward`` and ``attention_forward`` run a reference layer on the kernels;
``model.to_backend("triton")`` uses them. Kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
``sm90`` compiles every launch the model makes for an H100 without a GPU and reads registers, spills, occupancy and
tensor-core use (``python -m fusionkern.kernels.sm90 --report PATH``).
"""

from fusionkern.kernels._common import UnsupportedOptionError
from fusionkern.kernels.attention import ChannelAttentionFunction, attention_forward, channel_attention
from fusionkern.kernels.conv_mixpool import Conv2dMixPoolFunction, conv2d_mixpool, fold_bn, stage_forward
from fusionkern.kernels.dilated import DilatedAvgBlockFunction, block_forward, dilated_avg_block
from fusionkern.kernels.gabor_conv import GaborConv2dFunction, gabor_conv2d, gabor_weight

__all__ = [
    "ChannelAttentionFunction", "Conv2dMixPoolFunction", "DilatedAvgBlockFunction", "GaborConv2dFunction",
    "UnsupportedOptionError", "attention_forward", "block_forward", "channel_attention", "conv2d_mixpool",
    "dilated_avg_block", "fold_bn", "gabor_conv2d", "gabor_weight", "stage_forward",
]  # fmt: skip
