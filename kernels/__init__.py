# Dilated block (kernel 3) and channel attention (kernel 4); their `fold_bn` stays in `fusionkern.kernels.dilated`.
from .attention import ChannelAttentionFunction, attention_forward, channel_attention  # noqa: E402, F401
from .dilated import DilatedAvgBlockFunction, block_forward, dilated_avg_block  # noqa: E402, F401
# Gabor conv (kernel 1) and conv + mixed pooling (kernel 2), the ConvStage runner and the inference BN fold.
from ._common import UnsupportedOptionError  # noqa: E402, F401
from .conv_mixpool import Conv2dMixPoolFunction, conv2d_mixpool, fold_bn, stage_forward  # noqa: E402, F401
from .gabor_conv import GaborConv2dFunction, gabor_conv2d, gabor_weight  # noqa: E402, F401
