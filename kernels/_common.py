"""Shared pieces of the convolution kernels: argument checks, block sizes, autotune configs, sm_90 compilation.

Host side:

* :class:`UnsupportedOptionError` and :func:`unsupported`: the one error every launcher raises for an option the
  kernels do not implement (a ``ValueError`` that also reaches the CLI as a one-line :class:`ConfigError`).
* :func:`check_tensor`, :func:`square_int`, :func:`check_alpha`, :func:`check_bn`, :func:`check_int32_indexable`,
  :func:`conv_geometry`: argument validation.
* :func:`interpreting`, :func:`pow2_block`, :func:`tune_configs`, :func:`make_configs`,
  :func:`prune_block_configs`, :func:`conv_autotune`: one small deterministic config on the Triton CPU interpreter,
  a short autotune list (pruned to the problem size) on a GPU; :data:`CONV_TUNE_KEY` and :func:`size_bucket`: what
  the autotuners key on (the output pixel count bucketed to a power of two, so a new batch size in the same bucket
  does not re-tune). :data:`TRITON_CONFIG_EXCEPTIONS`, :func:`apply_config_exceptions`, :func:`release_configs`: the
  configs a kernel replaces or drops under one Triton release, each with the compiled figures that made the choice.
* :func:`torch_conv_allows_tf32`, :func:`resolve_allow_tf32`, :func:`dot_precision`: the fp32 precision of one
  call, following PyTorch's own convolution settings unless the caller says otherwise.
* :func:`conv_backward`: ``dL/dx`` and ``dL/dw`` of a convolution at the precision the call resolved, without
  touching PyTorch's process-global TF32 switches.
* :func:`cudnn_fp32_precision`: scopes cuDNN's TF32 switch for a *reference* computation (tests, GPU checks); the
  kernels themselves never flip it.
* :class:`KernelSpec`, :func:`compile_sm90` and :func:`compile_sm90_isolated`: compile a ``@triton.jit`` kernel
  for an H100 (sm_90) without a GPU, so that a kernel that would not lower for an H100 fails on any machine.
* :class:`ConvGeometry`: output sizes, launch grid and partial-sum rows of one fused convolution.

Device side (``@triton.jit`` helpers used by :mod:`.gabor_conv` and :mod:`.conv_mixpool`):

* :func:`_window_pixels`: a program's output pixels and the input position of their first tap.
* :func:`_window_rows`: the implicit GEMM's rows, the four window positions of every output pixel when pooling,
  so that one ``tl.dot`` per reduction chunk (M = 4 x BLOCK_P, a Hopper ``wgmma`` at BLOCK_P = 16) covers them;
  :func:`_split_windows` turns its accumulator back into the four positions' tiles.
* :func:`_x_tile`: one implicit-GEMM operand tile of the input, rows = conv positions, columns = reduction
  indices ``(ci, kh, kw)`` flattened.
* :func:`_mixpool_fwd` and :func:`_mixpool_bwd`: the 2 x 2 mixed pooling of four pre-pool tiles and its gradient.
* :func:`_conv_fwd_epilogue`, :func:`_conv_bwd_epilogue`, :func:`_store_grad_z`: ReLU -> pool -> affine on the
  accumulators, and ``dL/dz`` of the same chain.
* :func:`_pool_record` and :func:`_pool_record_bwd_kernel` (:func:`pool_record_backward`): a byte per pooled value
  (first-maximum position, ReLU signs) and ``max - avg``, written by the forward in training, from which the
  backward gets ``dL/dz`` without recomputing the convolution.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, NoReturn, Sequence

import torch
import triton
import triton.language as tl
from torch import nn

from fusionkern.errors import ConfigError

# Dtypes the convolution kernels accept. float64 exists for verification (gradcheck); fp32/bf16/fp16 are the
# production types, all accumulated in fp32 (float64 accumulates in float64).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Kernels index with int32 offsets (cheaper address arithmetic on the GPU); larger tensors are refused.
INT32_LIMIT = 2**31 - 1

# The smallest BLOCK_P of any config below: partial-sum buffers are sized for it.
MIN_BLOCK_P = 16


class UnsupportedOptionError(ConfigError, ValueError):
    """An argument or option the Triton kernels do not implement; the message names the parameter."""


def unsupported(param: str, message: str) -> NoReturn:
    """Raise :class:`UnsupportedOptionError` as ``"<param>: <message>"``."""
    raise UnsupportedOptionError(f"{param}: {message}")


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = SUPPORTED_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check a tensor argument, raising :class:`UnsupportedOptionError` that names ``name`` on any mismatch."""
    if not isinstance(t, torch.Tensor):
        unsupported(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        unsupported(name, f"expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        unsupported(name, f"expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        unsupported(name, f"dtype {str(t.dtype).replace('torch.', '')} is not supported (supported: {names})")
    if device is not None and t.device != device:
        unsupported(name, f"is on {t.device} but the input is on {device}; all tensors must share one device")
    return t


def check_device(name: str, t: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, except on the CPU interpreter (which needs CPU tensors)."""
    if interpreting():
        if t.device.type != "cpu":
            unsupported(name, f"is on {t.device}; under TRITON_INTERPRET=1 the kernels run on CPU tensors only")
    elif t.device.type != "cuda":
        unsupported(name, f"is on {t.device}; the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)")


def square_int(name: str, value: Any, *, minimum: int) -> int:
    """An int, or a pair of equal ints (as torch accepts), at least ``minimum``; anything else is refused."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            unsupported(name, f"only square values are supported (an int or an equal pair), got {tuple(value)}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        unsupported(name, f"expected an int, got {value!r}")
    if value < minimum:
        unsupported(name, f"must be at least {minimum}, got {value}")
    return value


def check_alpha(pool_alpha, x: torch.Tensor, name: str, groups: int = 1) -> torch.Tensor | None:
    """``None`` (no pooling), or a tensor: a float becomes a constant 0-d tensor (no gradient). With ``groups`` > 1
    a ``(groups,)`` tensor gives each group its own alpha; a single value is shared by all."""
    if pool_alpha is None:
        return None
    if isinstance(pool_alpha, (int, float)) and not isinstance(pool_alpha, bool):
        return torch.tensor(float(pool_alpha), device=x.device, dtype=compute_dtype(x.dtype))
    check_tensor(name, pool_alpha, device=x.device)
    if pool_alpha.numel() != 1 and not (groups > 1 and tuple(pool_alpha.shape) == (groups,)):
        each = f" or a ({groups},) tensor, one per group" if groups > 1 else ""
        unsupported(name, f"must be a 0-d (or one-element) tensor{each}, got shape {tuple(pool_alpha.shape)}")
    return pool_alpha


def check_groups(groups: Any, in_channels: int, out_channels: int) -> int:
    """Validate ``groups`` against the input and output channel counts (both divisible, as in ``F.conv2d``)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        unsupported("groups", f"must be a positive int, got {groups!r}")
    if in_channels % groups or out_channels % groups:
        unsupported("groups", f"{groups} groups must divide the input ({in_channels}) and output ({out_channels}) "
                              "channels")  # fmt: skip
    return groups


def group_alpha(alpha: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The pooling alpha of each group, ``(groups,)`` contiguous in ``dtype`` (detached; a kernel argument)."""
    return alpha.detach().reshape(-1).to(dtype).expand(groups).contiguous()


def alpha_grad(grad: torch.Tensor, like: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """The per-group ``dL/dalpha`` (``(groups,)``) shaped as the alpha the caller gave: summed when it was shared."""
    shape, dtype = like
    if shape.numel() == 1:
        grad = grad.sum()
    return grad.to(dtype).reshape(shape)


def fold_bn(bn: nn.BatchNorm2d, *, differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as a per-channel affine ``(scale, shift)``: ``bn(h) == h * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale`` (weight 1 and bias 0 when
    the module has no affine parameters), computed in float32 (float64 for a float64 module). By default the pair is
    detached: a constant inference epilogue. With ``differentiable=True`` it is built from differentiable torch ops,
    so gradients of ``scale`` and ``shift`` reach ``bn.weight`` and ``bn.bias`` (eval-mode fine-tuning through the
    dilated block).

    Raises:
        UnsupportedOptionError (a ValueError): ``bn`` is in training mode or keeps no running statistics (it then
            normalises with batch statistics, which no fixed affine can reproduce).
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        unsupported("bn", f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.training:
        unsupported(
            "bn",
            "is in training mode, where BatchNorm normalises with batch statistics; fold it only in eval mode and "
            "run it as a separate op in training",
        )
    if bn.running_mean is None or bn.running_var is None:
        unsupported("bn", "has no running statistics (track_running_stats=False), so it cannot be folded")
    dtype = compute_dtype(bn.running_var.dtype)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        inv_std = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        scale = inv_std if bn.weight is None else bn.weight.to(dtype) * inv_std
        shift = -bn.running_mean.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
    return scale.contiguous(), shift.contiguous()


def check_bn(bn, out_channels: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Validate a folded BatchNorm ``(scale, shift)`` pair (see :func:`fold_bn`)."""
    if bn is None:
        return None, None
    if not isinstance(bn, (tuple, list)) or len(bn) != 2:
        unsupported("bn", "expected a (scale, shift) pair of (C_out,) tensors, e.g. from fold_bn(bn_module)")
    scale, shift = bn
    for name, t in (("bn scale", scale), ("bn shift", shift)):
        check_tensor(name, t, shape=(out_channels,), device=x.device)
        if t.requires_grad and torch.is_grad_enabled():
            unsupported(
                name,
                "a folded BatchNorm is a constant inference epilogue and gets no gradient; in training run "
                "BatchNorm as a separate op after the kernel",
            )
    return scale.contiguous(), shift.contiguous()


def check_int32_indexable(name: str, t: torch.Tensor) -> None:
    """Refuse tensors whose largest element offset does not fit the kernels' int32 index arithmetic."""
    reach = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    if reach > INT32_LIMIT:
        unsupported(name, f"spans {reach + 1} elements; the kernels index with int32 (at most {INT32_LIMIT + 1})")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_conv_allows_tf32() -> bool:
    """Whether PyTorch's own fp32 convolutions (cuDNN) may use TF32 under the current settings.

    Reads ``torch.backends.cudnn.conv.fp32_precision`` where it exists, walking up to ``cudnn.fp32_precision`` and
    ``torch.backends.fp32_precision`` while the value is ``"none"`` (inherit); older releases have only
    ``torch.backends.cudnn.allow_tf32``. Both default to TF32, so by default the fused kernels do as cuDNN does.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for level in (conv, torch.backends.cudnn, torch.backends):
            precision = getattr(level, "fp32_precision", "none")
            if precision != "none":
                return precision == "tf32"
        return False
    return bool(torch.backends.cudnn.allow_tf32)


def resolve_allow_tf32(allow_tf32: bool | None) -> bool:
    """``allow_tf32`` of a call: ``None`` follows PyTorch's convolution setting (:func:`torch_conv_allows_tf32`).

    Resolved once, when the forward runs, and stored with the call: its backward uses the same precision even if
    the global setting changes in between, and nothing global is written.
    """
    if allow_tf32 is None:
        return torch_conv_allows_tf32()
    if not isinstance(allow_tf32, bool):
        unsupported("allow_tf32", f"expected True, False or None (follow torch's setting), got {allow_tf32!r}")
    return allow_tf32


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype ``torch.autocast`` asks for on ``t``'s device, or None where it is off."""
    try:
        if not torch.is_autocast_enabled(t.device.type):
            return None
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(t.device.type)


def _lowered(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype == torch.float32 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_lowered(v, dtype) for v in value)
    return value


def follows_autocast(*names: str):
    """Decorate a fused op so that under ``torch.autocast`` it runs as torch's own convolutions do there: the
    float32 tensors among the arguments ``names`` (tensors or sequences of them) are cast to autocast's dtype
    (bf16 or fp16; a differentiable cast, so float32 parameters still get float32 gradients), the op runs on them
    with autocast off inside, and returns that dtype. The first argument's device decides; other arguments (a
    folded BatchNorm pair, Gabor parameters, ``alpha``) stay as given, the kernels read them at full precision."""

    def wrap(fn):
        signature = inspect.signature(fn)
        leading = next(iter(signature.parameters))

        @functools.wraps(fn)
        def op(*args, **kwargs):
            first = args[0] if args else kwargs.get(leading)
            low = autocast_dtype(first) if isinstance(first, torch.Tensor) else None
            if low is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                if name in bound.arguments:
                    bound.arguments[name] = _lowered(bound.arguments[name], low)
            with torch.autocast(first.device.type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return op

    return wrap


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D ``t`` is channels-last (NHWC) and not also contiguous as NCHW (one channel or one pixel): its
    channels lie side by side in memory. The kernels then write their outputs channels-last as well."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def wants_grad(*tensors: Any) -> bool:
    """Whether a call's backward can run: grad mode on and one of ``tensors`` (None allowed) requires grad. The
    caller decides it, outside ``autograd.Function.forward``, where grad mode always reads as off."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot``'s ``input_precision``: ``"tf32"`` only for float32 inputs with ``allow_tf32``.

    16-bit inputs take the tensor cores whatever this says; float64 never does.
    """
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def conv_backward(
    grad_z: torch.Tensor,  # (B, CO, OH, OW), dL/d(conv output)
    x: torch.Tensor,  # (B, CI, H, W), the forward input
    weight: torch.Tensor,  # (CO, CI, K, K)
    geo: ConvGeometry,
    need_x: bool,
    need_w: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dL/dx, dL/dweight)`` of ``conv2d(x, weight, groups=geo.groups)`` by ``aten.convolution_backward`` (cuDNN
    on a GPU; one call for every group).

    cuDNN's TF32 switch is process-global, so it is read, never written (writing it would race with every other
    thread). With ``allow_tf32`` the call runs as cuDNN is set (TF32 where allowed, IEEE otherwise; TF32 is allowed,
    not required). Without it, where cuDNN would use TF32 for float32, the gradients are computed in float64 and
    rounded back: exact fp32 products at the cost of speed, which is what asking for IEEE in that setting means.
    """
    upcast = x.dtype == torch.float32 and x.is_cuda and not allow_tf32 and torch_conv_allows_tf32()
    work = torch.float64 if upcast else x.dtype
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_z.to(work), x.to(work), weight.to(work), None, [geo.stride] * 2, [geo.padding] * 2,
        [geo.dilation] * 2, False, [0, 0], geo.groups, [need_x, need_w, False],
    )  # fmt: skip
    if upcast:
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    return grad_x, grad_w


@contextlib.contextmanager
def cudnn_fp32_precision(allow_tf32: bool) -> Iterator[None]:
    """Let cuDNN convolutions use TF32 exactly when ``allow_tf32`` (restores the previous setting).

    For reference computations in tests and GPU checks only: it writes a process-global switch, so the kernels'
    own code paths never call it (see :func:`conv_backward`).
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        previous = conv.fp32_precision
        conv.fp32_precision = "tf32" if allow_tf32 else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:  # torch releases before the fp32_precision API
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


# --------------------------------------------------------------------------------------------------------------
# Block sizes and autotune configs
# --------------------------------------------------------------------------------------------------------------


def pow2_block(n: int, lo: int = 16, hi: int = 128) -> int:
    """The smallest power of two >= ``n``, clamped to ``[lo, hi]`` (``tl.dot`` needs every dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# Output pixels x output channels x reduction chunk, one list per kind of layer; each config was chosen from the
# compiled sm_90 form (tests/test_kernels_static.py gates it): no spills and at least 25 % occupancy on an H100 SM,
# forward and backward, TF32 and bf16. A pooled program holds four conv positions per output pixel (one dot of
# 4 x BLOCK_P rows per reduction chunk), so its pixel tile stays at 16 (M = 64, one warpgroup's wgmma) and its
# reduction chunk at 16 where the channel tile is wide. Each list ends with its smallest tile.
GPU_POOLED_CONV_CONFIGS = (
    dict(BLOCK_P=16, BLOCK_CO=64, BLOCK_R=16, num_warps=4, num_stages=3),
    dict(BLOCK_P=16, BLOCK_CO=128, BLOCK_R=16, num_warps=8, num_stages=3),
    dict(BLOCK_P=16, BLOCK_CO=32, BLOCK_R=16, num_warps=4, num_stages=3),
)
GPU_PLAIN_CONV_CONFIGS = (
    dict(BLOCK_P=64, BLOCK_CO=64, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_P=32, BLOCK_CO=64, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_P=64, BLOCK_CO=32, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_P=16, BLOCK_CO=128, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_P=32, BLOCK_CO=32, BLOCK_R=32, num_warps=4, num_stages=3),
    dict(BLOCK_P=16, BLOCK_CO=32, BLOCK_R=16, num_warps=4, num_stages=3),
)
# What the autotuners hold; prune_block_configs keeps the layer's kind.
GPU_CONV_CONFIGS = GPU_POOLED_CONV_CONFIGS + tuple(
    c for c in GPU_PLAIN_CONV_CONFIGS if c not in GPU_POOLED_CONV_CONFIGS
)
# The CPU interpreter runs one small config (autotuning there would only multiply the run time).
INTERPRETER_CONV_CONFIG = dict(BLOCK_P=16, BLOCK_CO=16, BLOCK_R=16, num_warps=1, num_stages=1)
assert min(c["BLOCK_P"] for c in (*GPU_CONV_CONFIGS, INTERPRETER_CONV_CONFIG)) >= MIN_BLOCK_P


TRITON_RELEASE = ".".join(triton.__version__.split(".")[:2])
"""The running Triton's ``major.minor`` (what :data:`TRITON_CONFIG_EXCEPTIONS` match on)."""


@dataclass(frozen=True)
class TritonConfigException:
    """A config one kernel does not run under one Triton release, and what runs in its place.

    The lists above were chosen from Triton's own sm_90 compile; another release's register allocation can differ
    enough to spill or to halve the occupancy of the same tile. ``tests/test_kernels_static.py`` gates the compile
    of every release CI installs (the venv's, and triton 3.6 from ``.triton36/``: what the GPU machine runs).
    """

    kernel: str  # the @triton.jit function's name
    release: str  # the Triton release it applies to, "major.minor"
    config: dict  # the config it replaces (meta-parameters plus num_warps and num_stages)
    use: dict | None  # what runs instead under that release; None drops the config
    dtypes: tuple[torch.dtype, ...]  # the data dtypes it applies to
    precisions: tuple[str, ...]  # the dot precisions it applies to ("ieee" for 16-bit inputs)
    why: str  # the compiled figures before and after, from the release's own ptxas


_FP32 = (torch.float32,)
_HALF = (torch.bfloat16, torch.float16)
_POOLED_SMALL = GPU_POOLED_CONV_CONFIGS[-1]  # 16 px x 32 ch x 16, 4 warps, 3 stages
_WGRAD_64 = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)  # see dilated._wgrad_blocks

# Figures: triton 3.6.0's ptxas for sm_90, FusionNet launches at both presets (paper batch 64, native 256), occupancy
# from the H100's limits (fusionkern.models.launches). Under 3.9 the replaced configs pass the gate as they are; the
# 3.9 entries are from 3.9's own full sweep (IEEE fp32 is not in the gated subset).
TRITON_CONFIG_EXCEPTIONS: tuple[TritonConfigException, ...] = (
    TritonConfigException(
        "_gabor_conv_fwd_kernel", "3.6", _POOLED_SMALL,
        dict(BLOCK_P=16, BLOCK_CO=32, BLOCK_R=32, num_warps=8, num_stages=3), _HALF, ("ieee",),
        "bf16 at 4 warps and 3 stages: 80 registers with 8 B (native eval) and 28 B (native train) of spill stores; "
        "with 2 stages native train still spills 16 B, with 8 warps and 2 stages paper eval spills 8 B. A 32-wide "
        "reduction chunk at 8 warps: 116-128 registers, no spills, 25 % occupancy in all four (fp16: the same).",
    ),
    TritonConfigException(
        "_gabor_conv_fwd_kernel", "3.6", _POOLED_SMALL,
        dict(BLOCK_P=16, BLOCK_CO=32, BLOCK_R=16, num_warps=8, num_stages=2), _FP32, ("tf32", "ieee"),
        "fp32 at 4 warps and 3 stages: paper train TF32 spills 8 B at 96 registers, IEEE spills 4-12 B (native) or "
        "takes 160 registers (paper, 18.8 % occupancy). 8 warps and 2 stages: 64-106 registers, no spills, 25-50 %.",
    ),
    TritonConfigException(
        "_gabor_conv_bwd_kernel", "3.6", _POOLED_SMALL,
        dict(BLOCK_P=16, BLOCK_CO=32, BLOCK_R=16, num_warps=8, num_stages=2), (*_FP32, *_HALF), ("tf32", "ieee"),
        "at 4 warps and 3 stages: paper bf16 spills 4 B, native IEEE spills 12 B at 128 registers, paper IEEE takes "
        "162 registers (18.8 %). 8 warps and 2 stages: 78-111 registers, no spills, 25-37.5 %.",
    ),
    TritonConfigException(
        "_conv_mixpool_bwd_kernel", "3.6", GPU_POOLED_CONV_CONFIGS[1], None, _FP32, ("tf32", "ieee"),
        "16 px x 128 ch at 8 warps, TF32: 157 registers at native layer 3 (64 -> 128 channels; 104 under 3.9), one "
        "block per SM, 12.5 % occupancy; 2 or 4 stages change nothing (156). IEEE (FMA dots over the 64 window rows "
        "of the one-dot kernel): 128 registers with 4 B of spill stores. Dropped: the 16 x 64 and 16 x 32 tiles "
        "stay (117 and 64 registers, 25 % and 50 %, in TF32).",
    ),
    TritonConfigException(
        "_conv_mixpool_fwd_kernel", "3.9", GPU_PLAIN_CONV_CONFIGS[0], None, _FP32, ("ieee",),
        "64 px x 64 ch x 32 at 8 warps, IEEE fp32 (FMA dots): 128 registers with 4 B of spill stores in the head's "
        "layers (full sweep, both presets). Dropped for IEEE: the other plain tiles stay (no spills).",
    ),
    TritonConfigException(
        "_conv_mixpool_fwd_kernel", "3.6", GPU_PLAIN_CONV_CONFIGS[3], None, _FP32, ("ieee",),
        "16 px x 128 ch x 32 at 8 warps, IEEE fp32 (FMA dots): 16 B of spill stores and 12 B of loads in the head's "
        "last layer (full sweep). Dropped for IEEE: the other plain tiles stay (no spills).",
    ),
    TritonConfigException(
        "_conv_mixpool_bwd_kernel", "3.9", GPU_POOLED_CONV_CONFIGS[1], None, _FP32, ("ieee",),
        "16 px x 128 ch at 8 warps, IEEE fp32 (FMA dots over the 64 window rows): 128 registers with 12 B of spill "
        "stores at the paper preset, 143 registers (12.5 %) at the other layer. Dropped for IEEE: the 16 x 64 and "
        "16 x 32 tiles stay (no spills).",
    ),
    TritonConfigException(
        "_dilated_conv_wgrad_kernel", "3.6", _WGRAD_64, {**_WGRAD_64, "BLOCK_M": 32}, _FP32, ("tf32",),
        "TF32 at 64 pixels per step: 231 registers at native (12.5 %). 32 pixels: 124 registers (25 %), paper 80.",
    ),
    TritonConfigException(
        "_dilated_conv_wgrad_kernel", "3.6", _WGRAD_64, {**_WGRAD_64, "BLOCK_M": 32}, _HALF, ("ieee",),
        "bf16 at 64 pixels per step: 224 registers at native (12.5 %). 32 pixels: 104 registers (25 %), paper 64 "
        "(fp16: the same).",
    ),
    TritonConfigException(
        "_dilated_conv_wgrad_kernel", "3.6", _WGRAD_64, {**_WGRAD_64, "BLOCK_M": 16}, _FP32, ("ieee",),
        "IEEE fp32 (FMAs, no tensor cores): 240 registers at 64 pixels per step and 157 at 32 (native, 12.5 %); 16 "
        "pixels: 80 registers (37.5 %), paper 128 (25 %).",
    ),
)  # fmt: skip


def apply_config_exceptions(
    kernel: str, configs: Sequence[dict], dtype: torch.dtype, precision: str, release: str | None = None
) -> list[dict]:
    """``configs`` with the :data:`TRITON_CONFIG_EXCEPTIONS` of ``kernel`` at this dtype and dot precision under
    ``release`` (default: the running Triton) applied: each replaced in place or dropped, order kept."""
    release = TRITON_RELEASE if release is None else release
    out: list[dict] = []
    for c in configs:
        hits = [e for e in TRITON_CONFIG_EXCEPTIONS if e.kernel == kernel and e.release == release and e.config == c
                and dtype in e.dtypes and precision in e.precisions]  # fmt: skip
        assert len(hits) <= 1, f"{kernel}: {len(hits)} exceptions for {c} ({dtype}, {precision}) under {release}"
        c = hits[0].use if hits else c
        if c is not None and c not in out:
            out.append(c)
    return out


CONV_TUNE_KEY = (
    "M_BUCKET", "G", "CI", "CO", "K", "conv_stride", "dilation", "RELU", "POOL", "BN", "DOT_PRECISION",
)  # fmt: skip
"""The autotune key of both fused convolutions, which add their own flag (``HAS_BIAS``, ``LEGACY``): the GEMM's
batch-dependent extent as a bucket (``M_BUCKET``, :func:`size_bucket`), the groups (``G``: the branches of a
FusionNet stage run as one grouped launch), its fixed extents and every argument that
changes the kernel's work (the epilogue flags and the dot precision). Triton appends the dtype of every tensor
argument to the key itself. The spatial size only enters through ``M_BUCKET``: the output pixels are the GEMM's rows,
whatever the image they tile."""


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1 for ``n <= 1``): how the conv autotuners see the output pixel count.

    The kernels take it as ``M_BUCKET``, an argument only the autotune key reads, so batch sizes whose
    ``B * PH * PW`` fall in one bucket share one tuned config instead of each re-tuning.
    """
    return triton.next_power_of_2(max(1, int(n)))


def tune_configs(
    gpu: Sequence[dict] = GPU_CONV_CONFIGS, interpreter: dict = INTERPRETER_CONV_CONFIG, kernel: str | None = None
) -> list[triton.Config]:
    """Autotune configs: the GPU list (plus the replacements the running Triton's
    :data:`TRITON_CONFIG_EXCEPTIONS` name for ``kernel``), or the single interpreter config under
    ``TRITON_INTERPRET=1``."""
    return make_configs([interpreter] if interpreting() else release_configs(kernel, gpu))


def release_configs(
    kernel: str | None, gpu: Sequence[dict] = GPU_CONV_CONFIGS, release: str | None = None
) -> list[dict]:
    """``gpu`` plus the configs :data:`TRITON_CONFIG_EXCEPTIONS` put in place of some of them for ``kernel`` under
    ``release`` (default: the running Triton): what that kernel's autotuner holds on a GPU."""
    release = TRITON_RELEASE if release is None else release
    out = list(gpu)
    for e in TRITON_CONFIG_EXCEPTIONS:
        if e.kernel == kernel and e.release == release and e.use is not None and e.use not in out:
            out.append(e.use)
    return out


def conv_autotune(kernel, key: Sequence[str], **kwargs) -> triton.runtime.Autotuner:
    """``triton.autotune`` of one fused convolution kernel over :func:`tune_configs`, pruned by
    :func:`prune_block_configs` with the kernel's own :data:`TRITON_CONFIG_EXCEPTIONS`."""
    name = kernel.__name__
    prune = functools.partial(prune_block_configs, kernel=name)
    return triton.autotune(configs=tune_configs(kernel=name), key=list(key),
                           prune_configs_by={"early_config_prune": prune}, **kwargs)(kernel)  # fmt: skip


def make_configs(configs: Sequence[dict]) -> list[triton.Config]:
    """``triton.Config`` objects from dicts of meta-parameters plus ``num_warps`` and ``num_stages``."""
    out = []
    for c in configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


def _config_dict(c: triton.Config) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def prune_block_configs(
    configs: list[triton.Config], named_args: dict, kernel: str | None = None, **kwargs
) -> list[triton.Config]:
    """Keep the configs of the layer's kind (:data:`GPU_POOLED_CONV_CONFIGS` when ``POOL``, else
    :data:`GPU_PLAIN_CONV_CONFIGS`), with the running Triton's :data:`TRITON_CONFIG_EXCEPTIONS` for ``kernel`` at the
    call's dtype (``x_ptr``) and ``DOT_PRECISION`` applied, then drop those whose channel or reduction tile exceeds
    the problem padded to a power of two (min 16; with ``CHANNELS_INNER`` the reduction tile spans input channels
    only); never empty (the kind's smallest tile stays)."""
    args = {**named_args, **kwargs}
    family = GPU_POOLED_CONV_CONFIGS if args.get("POOL", True) else GPU_PLAIN_CONV_CONFIGS
    x = args.get("x_ptr")
    if kernel is not None and isinstance(x, torch.Tensor):
        family = apply_config_exceptions(kernel, family, x.dtype, args.get("DOT_PRECISION", "ieee"))
    mine = [c for c in configs if _config_dict(c) in family] or list(configs)
    co = pow2_block(args["CO"], hi=1 << 30)
    r = pow2_block(args["CI"] * (1 if args.get("CHANNELS_INNER") else args["K"] ** 2), hi=1 << 30)
    kept = [c for c in mine if c.kwargs["BLOCK_CO"] <= co and c.kwargs["BLOCK_R"] <= r]
    return kept or ([c for c in mine if _config_dict(c) == family[-1]] or mine)[:1]


# --------------------------------------------------------------------------------------------------------------
# sm_90 compilation without a GPU
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One compilation of a ``@triton.jit`` kernel: where it lives, its signature and its constexpr values.

    ``signature`` maps every argument to a Triton type string (``"*fp32"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``). In ``constexprs`` a value written ``"tl.float32"`` (any ``tl.`` attribute) is resolved to that
    object, so specs stay JSON-serialisable.
    """

    module: str  # importable module, e.g. "fusionkern.kernels.gabor_conv"
    kernel: str  # attribute name of the @triton.jit function in that module
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"{self.module}.{self.kernel}"


def _resolve_constexprs(constexprs: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v for k, v in constexprs.items()}


def compile_sm90(kernel, signature: dict[str, str], constexprs: dict[str, Any]):
    """Compile ``kernel`` (a ``triton.JITFunction``) for CUDA sm_90 and return the compiled kernel (it has a cubin).

    Needs a compiled-mode kernel object, i.e. a process without ``TRITON_INTERPRET=1``; under the interpreter use
    :func:`compile_sm90_isolated`.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise TypeError(
            f"compile_sm90 needs a triton.JITFunction, got {type(kernel).__name__} "
            "(under TRITON_INTERPRET=1 use compile_sm90_isolated)"
        )
    src = ASTSource(fn=kernel, signature=signature, constexprs=_resolve_constexprs(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


_ISOLATED_PROGRAM = r"""
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
from fusionkern.kernels._common import compile_sm90
results = {}
for spec in json.load(sys.stdin):
    try:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        compiled = compile_sm90(kernel, spec["signature"], spec["constexprs"])
        results[spec["name"]] = None if compiled.asm.get("cubin") else "no cubin produced"
    except Exception as exc:  # report every failure, keep compiling the others
        results[spec["name"]] = f"{type(exc).__name__}: {exc}"[:2000]
print("RESULTS" + json.dumps(results))
"""


def compile_sm90_isolated(
    specs: Sequence[KernelSpec], timeout: float = 600.0, jobs: int | None = None
) -> dict[str, str | None]:
    """Compile each spec for sm_90 in fresh interpreters without ``TRITON_INTERPRET``.

    Returns ``{spec.name: None}`` for a kernel that compiled to a cubin, or the error text. Child processes are
    needed because under ``TRITON_INTERPRET=1`` ``@triton.jit`` builds interpreter objects that cannot be lowered.
    The specs are split over ``jobs`` processes (default: one per CPU core, at most 4) run side by side.
    """
    specs = list(specs)
    if not specs:
        return {}
    jobs = max(1, min(len(specs), jobs or min(4, os.cpu_count() or 1)))
    payloads = [[{**asdict(s), "name": s.name} for s in specs[i::jobs]] for i in range(jobs)]
    results: dict[str, str | None] = {}
    for reply in run_isolated(["-c", _ISOLATED_PROGRAM], payloads, "RESULTS", "sm_90 compilation", timeout):
        results.update(reply)
    return results


def run_isolated(
    args: Sequence[str], payloads: Sequence[Any], prefix: str, what: str, timeout: float, env: dict | None = None
) -> list[Any]:
    """Runs one fresh Python per payload, side by side, without ``TRITON_INTERPRET`` (what sm_90 compiles need).

    Each child gets ``sys.executable *args``, reads its payload as JSON on stdin and prints one line
    ``<prefix><json>``; a child past ``timeout`` seconds is killed.

    Args:
        args: The interpreter's arguments (``["-c", program]`` or ``["-m", module]``).
        payloads: One JSON-able value per child.
        prefix: The marker of the reply line.
        what: What the children do, for the error.
        timeout: Seconds each child may take.
        env: Extra environment variables.

    Returns:
        The children's replies, in payload order.

    Raises:
        RuntimeError: A child printed no reply line (its exit code and the end of its stderr are quoted).
    """
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    child_env.update(env or {})
    procs = []
    for payload in payloads:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
        )  # fmt: skip
        procs.append((proc, json.dumps(payload)))
    replies = []
    for proc, payload in procs:
        try:
            out, err = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith(prefix)), None)
        if line is None:
            raise RuntimeError(f"{what} process failed (exit {proc.returncode}):\n{err[-4000:]}")
        replies.append(json.loads(line[len(prefix):]))
    return replies


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _window_pixels(
    pid_p,  # program index along output pixels
    B,  # batch size
    PH,  # output rows: OH // 2 when POOL, else OH
    PW,  # output columns: OW // 2 when POOL, else OW
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    stride_xb,  # x stride along batch, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    POOL: tl.constexpr,  # each output pixel is a 2 x 2 window of conv positions
    BLOCK_P: tl.constexpr,  # output pixels per program
):
    """A program's BLOCK_P output pixels ``(b, ph, pw)``, their top-left conv position ``(oh, ow)``, the input
    position ``(ih, iw)`` of its first tap and that tap's offset in ``x``; ``p_mask`` marks real pixels."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < B * PH * PW
    pw = offs_p % PW
    ph = (offs_p // PW) % PH
    b = offs_p // (PW * PH)
    if POOL:
        oh = ph * 2
        ow = pw * 2
    else:
        oh = ph
        ow = pw
    ih = oh * conv_stride - padding
    iw = ow * conv_stride - padding
    row_off = b * stride_xb + ih * stride_xh + iw * stride_xw
    return p_mask, b, ph, pw, oh, ow, ih, iw, row_off


@triton.jit
def _window_rows(
    pid_p,  # program index along output pixels
    B,  # batch size
    PH,  # output rows: OH // 2 when POOL, else OH
    PW,  # output columns: OW // 2 when POOL, else OW
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    stride_xb,  # x stride along batch, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    POOL: tl.constexpr,  # four conv positions (a 2 x 2 window) per output pixel
    BLOCK_P: tl.constexpr,  # output pixels per program
):
    """The implicit GEMM's rows of a program: with POOL, the four conv positions of each of its BLOCK_P output pixels
    (row ``4 p + 2 kh + kw`` is window position ``(kh, kw)`` of pixel ``p``), so one ``tl.dot`` per reduction chunk
    covers the whole window (M = 4 x BLOCK_P); without POOL one row per pixel. Returns each row's validity, offset of
    its first tap in ``x`` and the input position ``(ih, iw)`` of that tap."""
    if POOL:
        rows = tl.arange(0, 4 * BLOCK_P)
        offs_p = pid_p * BLOCK_P + rows // 4
        kh = (rows // 2) % 2
        kw = rows % 2
    else:
        rows = tl.arange(0, BLOCK_P)
        offs_p = pid_p * BLOCK_P + rows
        kh = rows * 0
        kw = rows * 0
    r_valid = offs_p < B * PH * PW
    pw = offs_p % PW
    ph = (offs_p // PW) % PH
    b = offs_p // (PW * PH)
    if POOL:
        oh = ph * 2 + kh
        ow = pw * 2 + kw
    else:
        oh = ph
        ow = pw
    ih = oh * conv_stride - padding
    iw = ow * conv_stride - padding
    return r_valid, b * stride_xb + ih * stride_xh + iw * stride_xw, ih, iw


@triton.jit
def _split_windows(acc, POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr):
    """The (4 x BLOCK_P, BLOCK_CO) accumulator of :func:`_window_rows`' rows as the four (BLOCK_P, BLOCK_CO) tiles
    of window positions (0, 0), (0, 1), (1, 0), (1, 1); without POOL the one tile, four times."""
    if POOL:
        t = tl.permute(tl.reshape(acc, (BLOCK_P, 2, 2, BLOCK_CO)), (0, 3, 1, 2))  # (p, co, kh, kw)
        left, right = tl.split(t)  # kw = 0, kw = 1: (p, co, kh)
        z00, z10 = tl.split(left)
        z01, z11 = tl.split(right)
        return z00, z01, z10, z11
    else:
        return acc, acc, acc, acc


@triton.jit
def _x_tile(
    x_ptr,  # input, (B, CI, H, W), any strides
    row_off,  # (BLOCK_P,) offset of (b, ih, iw) of each output pixel's first tap
    col_off,  # (BLOCK_R,) offset of each reduction index (ci, kh * dilation, kw * dilation)
    ih,  # (BLOCK_P,) input row of the first tap (oh * stride - padding)
    iw,  # (BLOCK_P,) input column of the first tap
    dh,  # (BLOCK_R,) kh * dilation
    dw,  # (BLOCK_R,) kw * dilation
    H,  # input height
    W,  # input width
    row_mask,  # (BLOCK_P,)
    col_mask,  # (BLOCK_R,)
):
    """The implicit-GEMM input tile ``X[p, r] = x[b, ci, ih + kh*d, iw + kw*d]``, zero outside the image."""
    h = ih[:, None] + dh[None, :]
    w = iw[:, None] + dw[None, :]
    mask = row_mask[:, None] & col_mask[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)


@triton.jit
def _mixpool_fwd(z00, z01, z10, z11, alpha):
    """``alpha * max + (1 - alpha) * avg`` of a 2 x 2 window given as four tiles (row-major order)."""
    mx = tl.maximum(tl.maximum(z00, z01), tl.maximum(z10, z11))
    av = (((z00 + z01) + z10) + z11) * 0.25
    return alpha * mx + (1 - alpha) * av


@triton.jit
def _mixpool_bwd(z00, z01, z10, z11, g, alpha):
    """Gradient of :func:`_mixpool_fwd` w.r.t. the four inputs and the per-pixel ``dy/dalpha`` term.

    ``d/dz_k = alpha * g * [k is the first maximum in row-major order] + (1 - alpha) * g / 4`` (ties go to the
    first maximum, as PyTorch's max-pool backward does), and ``g * (max - avg)`` is the contribution to
    ``dL/dalpha``.
    """
    mx = tl.maximum(tl.maximum(z00, z01), tl.maximum(z10, z11))
    av = (((z00 + z01) + z10) + z11) * 0.25
    first00 = z00 == mx
    first01 = (z01 == mx) & (~first00)
    first10 = (z10 == mx) & (~(first00 | first01))
    first11 = ~(first00 | first01 | first10)
    g_max = g * alpha
    g_avg = (g * (1 - alpha)) * 0.25
    d00 = tl.where(first00, g_max, 0.0) + g_avg
    d01 = tl.where(first01, g_max, 0.0) + g_avg
    d10 = tl.where(first10, g_max, 0.0) + g_avg
    d11 = tl.where(first11, g_max, 0.0) + g_avg
    return d00, d01, d10, d11, g * (mx - av)


@triton.jit
def _conv_fwd_epilogue(
    acc00,  # (BLOCK_P, BLOCK_CO) conv output at window position (0, 0) (the only one when not POOL)
    acc01,  # (BLOCK_P, BLOCK_CO) position (0, 1)
    acc10,  # (BLOCK_P, BLOCK_CO) position (1, 0)
    acc11,  # (BLOCK_P, BLOCK_CO) position (1, 1)
    offs_co,  # (BLOCK_CO,) output channels
    co_mask,  # (BLOCK_CO,)
    alpha_ptr,  # (), mixing weight
    scale_ptr,  # (CO,) folded BatchNorm scale
    shift_ptr,  # (CO,) folded BatchNorm shift
    ACC_DTYPE: tl.constexpr,
    RELU: tl.constexpr,
    POOL: tl.constexpr,
    BN: tl.constexpr,
):
    """``y = bn(pool(relu(z)))`` with each stage optional: ReLU, 2 x 2 mixed pooling, per-channel affine."""
    z00 = acc00
    if RELU:
        z00 = tl.maximum(z00, 0.0)
    y = z00
    if POOL:
        z01 = acc01
        z10 = acc10
        z11 = acc11
        if RELU:
            z01 = tl.maximum(z01, 0.0)
            z10 = tl.maximum(z10, 0.0)
            z11 = tl.maximum(z11, 0.0)
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
        y = _mixpool_fwd(z00, z01, z10, z11, alpha)
    if BN:
        scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)
        y = y * scale[None, :] + shift[None, :]
    return y


@triton.jit
def _relu4(z00, z01, z10, z11, RELU: tl.constexpr):
    """``relu`` of the four window positions' tiles (unchanged without RELU)."""
    if RELU:
        return tl.maximum(z00, 0.0), tl.maximum(z01, 0.0), tl.maximum(z10, 0.0), tl.maximum(z11, 0.0)
    else:
        return z00, z01, z10, z11


@triton.jit
def _conv_bwd_epilogue(
    acc00,  # (BLOCK_P, BLOCK_CO) recomputed conv output at window position (0, 0)
    acc01,  # (BLOCK_P, BLOCK_CO) position (0, 1) (unused when not POOL)
    acc10,  # (BLOCK_P, BLOCK_CO) position (1, 0)
    acc11,  # (BLOCK_P, BLOCK_CO) position (1, 1)
    g,  # (BLOCK_P, BLOCK_CO) dL/dy, already multiplied by the folded BatchNorm scale
    alpha_ptr,  # (), mixing weight
    ACC_DTYPE: tl.constexpr,
    RELU: tl.constexpr,
    POOL: tl.constexpr,
):
    """``dL/dz`` at the four window positions and ``g * (max - avg)`` (zeros when not POOL).

    ``dL/dz_k = [z_k > 0] * (alpha * [k = first argmax] + (1 - alpha) / 4) * g`` (the ReLU factor only with RELU).
    """
    r00, r01, r10, r11 = _relu4(acc00, acc01, acc10, acc11, RELU)
    if POOL:
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
        d00, d01, d10, d11, dalpha = _mixpool_bwd(r00, r01, r10, r11, g, alpha)
    else:
        d00 = g
        d01 = g
        d10 = g
        d11 = g
        dalpha = g * 0.0
    if RELU:
        d00 = tl.where(acc00 > 0, d00, 0.0)
        d01 = tl.where(acc01 > 0, d01, 0.0)
        d10 = tl.where(acc10 > 0, d10, 0.0)
        d11 = tl.where(acc11 > 0, d11, 0.0)
    return d00, d01, d10, d11, dalpha


@triton.jit
def _store_grad_z(
    grad_z_ptr,  # (B, CO, OH, OW)
    row_off,  # (BLOCK_P,) offset of (b, oh, ow) of each window's top-left position
    col_off,  # (BLOCK_CO,) offset of each output channel
    step_h,  # offset of one conv-output row
    step_w,  # offset of one conv-output column
    d00,  # (BLOCK_P, BLOCK_CO) dL/dz at window position (0, 0)
    d01,  # (BLOCK_P, BLOCK_CO) position (0, 1)
    d10,  # (BLOCK_P, BLOCK_CO) position (1, 0)
    d11,  # (BLOCK_P, BLOCK_CO) position (1, 1)
    mask,  # (BLOCK_P, BLOCK_CO)
    POOL: tl.constexpr,
):
    """Write ``dL/dz`` of the window positions (one position when not POOL)."""
    ptr = grad_z_ptr + row_off[:, None] + col_off[None, :]
    ty = grad_z_ptr.dtype.element_ty
    tl.store(ptr, d00.to(ty), mask=mask)
    if POOL:
        tl.store(ptr + step_w, d01.to(ty), mask=mask)
        tl.store(ptr + step_h, d10.to(ty), mask=mask)
        tl.store(ptr + step_h + step_w, d11.to(ty), mask=mask)


@triton.jit
def _pool_record(
    acc00,  # (BLOCK_P, BLOCK_CO) conv output at window position (0, 0) (the only one when not POOL)
    acc01,  # (BLOCK_P, BLOCK_CO) position (0, 1)
    acc10,  # (BLOCK_P, BLOCK_CO) position (1, 0)
    acc11,  # (BLOCK_P, BLOCK_CO) position (1, 1)
    RELU: tl.constexpr,
    POOL: tl.constexpr,
):
    """What the backward needs of a fused layer's pre-pool tile, so that it need not recompute the convolution:
    ``code`` (uint8) = window position of the first maximum of ``relu(z)`` in row-major order (bits 0-1, 0 without
    POOL) + 4 x the ReLU signs ``[z_k > 0]`` of the four positions (bits 2-5; all set without RELU), and
    ``gap = max - avg`` of ``relu(z)`` over the window (the pooled pixel's ``dy/dalpha``; 0 without POOL)."""
    r00, r01, r10, r11 = _relu4(acc00, acc01, acc10, acc11, RELU)
    if POOL:
        mx = tl.maximum(tl.maximum(r00, r01), tl.maximum(r10, r11))
        gap = mx - (((r00 + r01) + r10) + r11) * 0.25
        first = tl.where(r00 == mx, 0, tl.where(r01 == mx, 1, tl.where(r10 == mx, 2, 3)))
    else:
        gap = acc00 * 0.0
        first = (acc00 * 0).to(tl.int32)
    if RELU:
        signs = (acc00 > 0).to(tl.int32) + 2 * (acc01 > 0).to(tl.int32)
        signs = signs + 4 * (acc10 > 0).to(tl.int32) + 8 * (acc11 > 0).to(tl.int32)
    else:
        signs = (acc00 * 0).to(tl.int32) + 15
    return (first + 4 * signs).to(tl.uint8), gap


@triton.jit
def _record_offsets(b, ph, pw, c_all, C_TOTAL, PH, PW):
    """Offsets of the (BLOCK_P, BLOCK_CO) tile of pixels ``(b, ph, pw)`` and channels ``c_all`` in a contiguous
    (B, C_TOTAL, PH, PW) record: the one layout the forward writes and the backward reads."""
    return (b * (C_TOTAL * PH * PW) + ph * PW + pw)[:, None] + (c_all * (PH * PW))[None, :]


@triton.jit
def _store_record(
    code_ptr,  # (B, C_TOTAL, PH, PW) uint8, contiguous
    gap_ptr,  # (B, C_TOTAL, PH, PW), contiguous
    acc00,  # (BLOCK_P, BLOCK_CO) conv output at the four window positions (as for _conv_fwd_epilogue)
    acc01,
    acc10,
    acc11,
    b,  # (BLOCK_P,) batch index of each output pixel
    ph,  # (BLOCK_P,) output row
    pw,  # (BLOCK_P,) output column
    c_all,  # (BLOCK_CO,) channel in the whole tensor (group offset included)
    mask,  # (BLOCK_P, BLOCK_CO)
    C_TOTAL,  # channels of the whole tensor (G * CO)
    PH,  # output rows
    PW,  # output columns
    RELU: tl.constexpr,
    POOL: tl.constexpr,
):
    """Write the :func:`_pool_record` of a forward tile."""
    code, gap = _pool_record(acc00, acc01, acc10, acc11, RELU, POOL)
    rec = _record_offsets(b, ph, pw, c_all, C_TOTAL, PH, PW)
    tl.store(code_ptr + rec, code, mask=mask)
    tl.store(gap_ptr + rec, gap.to(gap_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_record_bwd_kernel(
    grad_out_ptr,  # dL/dy, (B, G * CO, PH, PW), any strides
    code_ptr,  # (B, G * CO, PH, PW) uint8 record of the forward (:func:`_pool_record`), contiguous
    gap_ptr,  # (B, G * CO, PH, PW) max - avg of the forward, contiguous, accumulation dtype
    alpha_ptr,  # mixing weight, (G,) contiguous (read when POOL)
    scale_ptr,  # folded BatchNorm scale, (G * CO,) contiguous (read when BN)
    grad_z_ptr,  # out: dL/dz, (B, G * CO, OH, OW)
    alpha_part_ptr,  # out: per-program partial sums of g * (max - avg), (cdiv(B * PH * PW, BLOCK_P), G * CO)
    bias_part_ptr,  # out: per-program partial sums of dL/dz, (cdiv(B * PH * PW, BLOCK_P), G * CO)
    B,  # batch size
    CO,  # output channels per group
    PH,  # rows of the record: OH // 2 when POOL, else OH
    PW,  # columns of the record
    G,  # groups
    stride_gb,  # grad_output strides, in elements
    stride_gc,
    stride_gh,
    stride_gw,
    stride_zb,  # grad_z strides, in elements
    stride_zc,
    stride_zh,
    stride_zw,
    RELU: tl.constexpr,  # ReLU after the conv
    POOL: tl.constexpr,  # 2 x 2 / stride 2 mixed pooling, floor mode
    BN: tl.constexpr,  # per-channel affine (folded BatchNorm) after pooling
    HAS_BIAS: tl.constexpr,  # write the bias partial sums
    ACC_DTYPE: tl.constexpr,  # tl.float32 (tl.float64 for float64 inputs)
    BLOCK_P: tl.constexpr,  # record pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    """``dL/dz`` of a fused conv -> [ReLU] -> [mixed pool] -> [affine] layer from its forward record, no convolution:
    with ``g = dL/dy * scale``, ``dL/dz_k = [z_k > 0] (alpha [k = first max] + (1 - alpha) / 4) g``, plus the
    per-program partial sums of ``g * (max - avg)`` (``dL/dalpha``) and of ``dL/dz`` (``dL/dbias``)."""
    # grid: (cdiv(B * PH * PW, BLOCK_P), cdiv(CO, BLOCK_C), G)
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(2)
    # the record's pixels and, as the "first tap" of a stride-1 window over grad_z, their window's top-left in it
    p_mask, b, ph, pw, _, _, _, _, z_row = _window_pixels(
        pid_p, B, PH, PW, 1, 0, stride_zb, stride_zh, stride_zw, POOL, BLOCK_P
    )
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < CO
    mask = p_mask[:, None] & c_mask[None, :]
    c_all = pid_g * CO + offs_c  # channels of the whole (B, G * CO, ...) tensors
    rec = _record_offsets(b, ph, pw, c_all, G * CO, PH, PW)
    code = tl.load(code_ptr + rec, mask=mask, other=0).to(tl.int32)
    g_off = (b * stride_gb + ph * stride_gh + pw * stride_gw)[:, None] + (c_all * stride_gc)[None, :]
    g = tl.load(grad_out_ptr + g_off, mask=mask, other=0.0).to(ACC_DTYPE)
    if BN:
        g = g * tl.load(scale_ptr + c_all, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :]
    if POOL:
        alpha = tl.load(alpha_ptr + pid_g).to(ACC_DTYPE)
        first = code & 3
        g_max = g * alpha
        g_avg = (g * (1 - alpha)) * 0.25
        d00 = tl.where(first == 0, g_max, 0.0) + g_avg
        d01 = tl.where(first == 1, g_max, 0.0) + g_avg
        d10 = tl.where(first == 2, g_max, 0.0) + g_avg
        d11 = tl.where(first == 3, g_max, 0.0) + g_avg
        gap = tl.load(gap_ptr + rec, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(alpha_part_ptr + pid_p * (G * CO) + c_all, tl.sum(g * gap, axis=0), mask=c_mask)
    else:
        d00 = g
        d01 = g
        d10 = g
        d11 = g
    if RELU:
        d00 = tl.where((code & 4) != 0, d00, 0.0)
        d01 = tl.where((code & 8) != 0, d01, 0.0)
        d10 = tl.where((code & 16) != 0, d10, 0.0)
        d11 = tl.where((code & 32) != 0, d11, 0.0)
    _store_grad_z(grad_z_ptr, z_row, c_all * stride_zc, stride_zh, stride_zw, d00, d01, d10, d11, mask, POOL)
    if HAS_BIAS:
        if POOL:
            d_sum = tl.sum(d00 + d01 + d10 + d11, axis=0)
        else:
            d_sum = tl.sum(d00, axis=0)
        tl.store(bias_part_ptr + pid_p * (G * CO) + c_all, d_sum, mask=c_mask)


def pool_record_backward(
    code: torch.Tensor, gap: torch.Tensor, grad_out: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor | None,
    geo: "ConvGeometry", relu: bool, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dL/dz, dL/dalpha per group (G,), dL/dbias (G * CO,))`` from the forward's record (:func:`_pool_record`):
    an elementwise pass over the pooled output instead of recomputing the convolution."""
    grad_z = geo.new_grad_z(grad_out.device, grad_out.dtype, channels_last=is_channels_last(grad_out))
    G, CO = geo.groups, geo.CO
    block_p, block_c = 32, pow2_block(CO, 16, 32)  # 32 x 64 tiles took 126-156 registers for this elementwise pass
    rows = triton.cdiv(geo.n_pixels, block_p)
    cdtype = gap.dtype
    alpha_part = torch.zeros((rows if geo.pool else 1, G * CO), device=grad_out.device, dtype=cdtype)
    bias_part = torch.zeros((rows if has_bias else 1, G * CO), device=grad_out.device, dtype=cdtype)
    if grad_z.numel() and code.numel():
        check_int32_indexable("grad_output", grad_out)
        check_int32_indexable("grad_z", grad_z)
        # grid: one program per BLOCK_P record pixels x BLOCK_C channels of one group
        _pool_record_bwd_kernel[(rows, triton.cdiv(CO, block_c), G)](
            grad_out, code, gap, alpha, alpha if scale is None else scale, grad_z, alpha_part, bias_part,
            geo.B, CO, geo.PH, geo.PW, G, *grad_out.stride(), *grad_z.stride(),
            RELU=relu, POOL=geo.pool, BN=scale is not None, HAS_BIAS=has_bias, ACC_DTYPE=tl_acc_dtype(gap.dtype),
            BLOCK_P=block_p, BLOCK_C=block_c,
        )  # fmt: skip
    return grad_z, alpha_part.view(-1, G, CO).sum((0, 2)), bias_part.sum(0)


# --------------------------------------------------------------------------------------------------------------
# Convolution geometry shared by the launchers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one fused ``conv -> [ReLU] -> [2 x 2 pool]`` call; ``CI`` and ``CO`` are per group.

    With ``groups`` > 1 the call is ``groups`` independent convolutions side by side (as ``F.conv2d(groups=G)``):
    group ``g`` reads input channels ``g * CI ...`` and writes output channels ``g * CO ...``; the launch grid gets a
    third axis over the groups, so a FusionNet stage's five branches fill one launch.
    """

    B: int
    CI: int
    H: int
    W: int
    CO: int
    K: int
    stride: int
    padding: int
    dilation: int
    pool: bool
    groups: int = 1

    @property
    def OH(self) -> int:  # conv output rows
        return (self.H + 2 * self.padding - self.dilation * (self.K - 1) - 1) // self.stride + 1

    @property
    def OW(self) -> int:  # conv output columns
        return (self.W + 2 * self.padding - self.dilation * (self.K - 1) - 1) // self.stride + 1

    @property
    def PH(self) -> int:  # rows the kernel writes: pooled (floor mode) or the conv output
        return self.OH // 2 if self.pool else self.OH

    @property
    def PW(self) -> int:
        return self.OW // 2 if self.pool else self.OW

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.groups * self.CO, self.PH, self.PW)

    @property
    def grad_z_shape(self) -> tuple[int, int, int, int]:  # dL/d(conv output), every group
        return (self.B, self.groups * self.CO, self.OH, self.OW)

    def new_grad_z(self, device: torch.device, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
        """The backward's dL/dz buffer: zeroed when pooling drops an odd conv output's last row or column (the
        kernels never write those), else uninitialised (every value is written); channels-last when asked (the
        layer ran NHWC: cuDNN's backward then reads one layout)."""
        odd = self.pool and (self.OH % 2 or self.OW % 2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        grad_z = torch.empty(self.grad_z_shape, device=device, dtype=dtype, memory_format=fmt)
        return grad_z.zero_() if odd else grad_z

    @property
    def n_pixels(self) -> int:  # output pixels (pooled when pooling), the GEMM's M
        return self.B * self.PH * self.PW

    @property
    def m_bucket(self) -> int:  # n_pixels rounded up to a power of two: the autotune key's batch-dependent extent
        return size_bucket(self.n_pixels)

    def grid(self, meta: dict) -> tuple[int, int, int]:
        """Launch grid: one program per BLOCK_P output pixels x BLOCK_CO output channels of one group."""
        return (triton.cdiv(self.n_pixels, meta["BLOCK_P"]), triton.cdiv(self.CO, meta["BLOCK_CO"]), self.groups)

    @property
    def partial_rows(self) -> int:  # rows of a per-program partial-sum buffer, enough for any config
        return triton.cdiv(self.n_pixels, MIN_BLOCK_P)


def conv_geometry(
    x: torch.Tensor, out_channels: int, kernel_size: int, stride: int, padding: int, dilation: int, pool: bool,
    groups: int = 1,
) -> ConvGeometry:
    """Validate the spatial sizes of a fused convolution and return its geometry (``out_channels`` in all groups;
    the caller has checked that the groups divide both channel counts)."""
    B, CI, H, W = x.shape
    geo = ConvGeometry(B, CI // groups, H, W, out_channels // groups, kernel_size, stride, padding, dilation, pool,
                       groups)  # fmt: skip
    if geo.OH < 1 or geo.OW < 1:
        unsupported(
            "x",
            f"input {H} x {W} is smaller than the dilated kernel ({dilation * (kernel_size - 1) + 1} px) "
            f"with padding {padding}",
        )
    if pool and (geo.PH < 1 or geo.PW < 1):
        unsupported("x", f"conv output {geo.OH} x {geo.OW} is too small for 2 x 2 pooling")
    return geo
