"""Triton kernels of the FusionNet branch, with gradients (installed as ``fusionkern.kernels``).

One op per module: ``gabor_conv`` (Gabor generation + conv + ReLU + mixed pooling), ``conv_mixpool`` (3 x 3 conv +
ReLU + mixed pooling, BN folded in inference), ``dilated`` (the dilated block in one pass), ``attention`` (channel
attention). The kernels take tensors and plain parameters and import nothing from :mod:`fusionkern.models`; running
a reference layer on them (``stage_forward``, ``block_forward``, ``attention_forward``, what
``model.to_backend("triton")`` uses) is :mod:`fusionkern.models.fused`. Kernels run on CUDA, or on the CPU under
``TRITON_INTERPRET=1`` (tests). ``sm90`` compiles recorded launches for an H100 without a GPU and reads registers,
spills, occupancy and tensor-core use (every launch the model makes: ``python -m fusionkern.models.launches
--report PATH``).
"""

from fusionkern.kernels._common import UnsupportedOptionError, fold_bn
from fusionkern.kernels.attention import ChannelAttentionFunction, channel_attention
from fusionkern.kernels.conv_mixpool import Conv2dMixPoolFunction, conv2d_mixpool
from fusionkern.kernels.dilated import DilatedAvgBlockFunction, dilated_avg_block
from fusionkern.kernels.gabor_conv import GaborConv2dFunction, gabor_conv2d, gabor_weight

__all__ = [
    "ChannelAttentionFunction", "Conv2dMixPoolFunction", "DilatedAvgBlockFunction", "GaborConv2dFunction",
    "UnsupportedOptionError", "channel_attention", "conv2d_mixpool", "dilated_avg_block", "fold_bn", "gabor_conv2d",
    "gabor_weight",
]  # fmt: skip
