"""Averaged dilated convolutions (``DilatedAvgBlock``, paper eq. 5) as one implicit-GEMM Triton convolution.

The block runs ``n`` parallel 3 x 3 convolutions of the same input with dilations ``d_0 .. d_{n-1}`` ('same'
padding ``d_j``) and combines them as ``H = H_0 + mean(H_1 .. H_{n-1})``. With the per-dilation scale
``s_0 = 1``, ``s_j = 1 / (n - 1)`` for ``j >= 1`` this is

    H = sum_j s_j * conv_{d_j}(x, w_j) + (b_0 + mean(b_1 .. b_{n-1}))

which is a single convolution with a sparse combined kernel (7 x 7 for dilations (1, 2, 3), 19 x 19 for
(1, 3, 6, 9)). Its non-zero taps are the union of the branches' 3 x 3 taps at offsets
``((kh - 1) d_j, (kw - 1) d_j)``; taps that land on the same offset (the centre tap of every branch, repeated
dilations) are summed into one, and taps that can only ever read the zero padding (``|dh| >= H`` or ``|dw| >= W``,
for example dilations 6 and 9 on a 4 x 4 map) are dropped. The kernel walks that tap list and, per tap, runs a
``tl.dot`` over channel blocks into one fp32 accumulator, so all branches are computed in one pass over ``x``.

Forward, in this module:

* :func:`dilated_conv_forward` (kernel ``_dilated_conv_kernel``): ``y = act(scale * (H + bias) + shift)``; the
  epilogue applies the combined bias, an optional per-channel affine (an eval-mode BatchNorm folded by
  :func:`fold_bn`) and an optional ReLU.

Backward (``DilatedAvgBlockFunction``):

* ``g_H``: the incoming gradient through the epilogue, ``g_H = g * [y > 0] * scale`` (a torch elementwise op).
* ``grad_x = sum_j s_j conv_transpose_{d_j}(g_H, w_j)``: the same kernel, run on ``g_H`` with the tap offsets
  negated and the tap weights transposed (C_out <-> C_in): one fused launch for all dilations.
* ``grad_w_j[:, :, kh, kw] = s_j * sum_{b,p} g_H[b, :, p] x[b, :, p + off]^T`` (i.e. ``s_j * conv2d_weight(x, g_H,
  dilation d_j)``): kernel ``_dilated_conv_wgrad_kernel`` reduces the gradient of every combined tap over all
  pixels in one launch (one program per tap and channel tile); the host scatters it back to the branches.
* ``grad_b_0 = sum_{b,h,w} g_H``, ``grad_b_j = grad_b_0 / (n - 1)``: the column sums come out of the weight-gradient
  kernel.
* ``grad_scale = sum_{b,h,w} g_z * H_pre``, ``grad_shift = sum_{b,h,w} g_z`` with ``g_z = g * [y > 0]``, only when
  the affine parameters require a gradient (``H_pre`` is then recomputed by the forward kernel).

Training-mode BatchNorm is not folded: :func:`fusionkern.models.fused.block_forward` (a reference
``DilatedAvgBlock`` on this kernel) lets the kernel produce ``H`` (pre-BN, bias included), runs the block's own
``nn.BatchNorm2d`` as the torch op (so batch statistics and the running-stat updates are exactly torch's), then
``F.relu``. In eval mode (running statistics present) BN and ReLU are folded into the
kernel's epilogue; gradients still reach the BN weight and bias through :func:`fold_bn`'s differentiable ops.

Tile sizes are chosen by a heuristic in :func:`_conv_blocks`; they have not been tuned per GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable

from ._common import (
    SUPPORTED_DTYPES,
    apply_config_exceptions,
    check_device,
    check_int32_indexable,
    compute_dtype,
    dot_precision,
    fold_bn,
    follows_autocast,
    is_channels_last,
    resolve_allow_tf32,
    unsupported,
)

__all__ = [
    "DilatedAvgBlockFunction",
    "TapPlan",
    "dilated_avg_block",
    "dilated_conv_forward",
    "dilated_conv_weight_grad",
    "fold_bn",
    "tap_plan",
]


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dilated_conv_kernel(
    x_ptr,  # input, (B, G * C_in, H, W), any strides
    w_ptr,  # tap weights, (G, T, C_in, C_out): w[g, t, k, n] multiplies x[b, g C_in + k, h + dh_t, w + dw_t] into
    #         y[b, g C_out + n, h, w]
    off_ptr,  # tap offsets (dh_t, dw_t), (T, 2) int32, contiguous
    bias_ptr,  # combined bias, (G * C_out,) fp32; read only if HAS_BIAS
    scale_ptr,  # epilogue scale, (G * C_out,) fp32; read only if HAS_AFFINE
    shift_ptr,  # epilogue shift, (G * C_out,) fp32; read only if HAS_AFFINE
    y_ptr,  # output, (B, G * C_out, H, W), any strides
    B,  # batch size, scalar
    C_in,  # input channels per group, scalar
    C_out,  # output channels per group, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    T,  # number of taps, scalar
    stride_xb, stride_xc, stride_xh, stride_xw,  # strides of x, (4,)
    stride_wg, stride_wt, stride_wk, stride_wn,  # strides of w over (G, T, C_in, C_out), (4,)
    stride_yb, stride_yc, stride_yh, stride_yw,  # strides of y, (4,)
    HAS_BIAS: tl.constexpr,  # add bias_ptr before the affine
    HAS_AFFINE: tl.constexpr,  # apply scale_ptr / shift_ptr
    RELU: tl.constexpr,  # clamp at zero last
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # pixels (flattened over B, H, W) per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per tl.dot step
):
    """Sparse-tap 'same' convolution with a fused bias / affine / ReLU epilogue.

    Forward, for every pixel ``p = (b, h, w)`` and output channel ``n``:

        z[b, n, h, w] = sum_t sum_k x[b, k, h + dh_t, w + dw_t] * w[t, k, n]     (x = 0 outside the map)
        y = relu(scale[n] * (z + bias[n]) + shift[n])        (each stage only if enabled)

    With the combined tap weights of the dilated block, ``z = sum_j s_j conv_{d_j}(x, w_j)``. Run on ``g_H`` with
    negated offsets and the tap weights transposed (C_in <-> C_out) the same kernel computes the input gradient
    ``grad_x[b, k, h, w] = sum_t sum_n g_H[b, n, h - dh_t, w - dw_t] * w[t, k, n]``. The matching gradients of the
    tap weights and the bias are ``_dilated_conv_wgrad_kernel``'s; those of the epilogue are
    ``g_z = g * [y > 0]``, ``g_H = g_z * scale``.
    """
    # grid: (cdiv(B * H * W, BLOCK_M), cdiv(C_out, BLOCK_N), G); one program: a BLOCK_M-pixel x BLOCK_N-channel
    # tile of one group of y (the groups are independent blocks side by side: a FusionNet's five branches)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)
    x_ptr += pid_g * C_in * stride_xc  # the group's input channels and tap weights
    w_ptr += pid_g * stride_wg
    HW = H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened pixel index b * H * W + h * W + w
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < B * HW
    n_mask = offs_n < C_out
    b = offs_m // HW
    hw = offs_m % HW
    oh = hw // W
    ow = hw % W
    x_batch = b.to(tl.int64) * stride_xb

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    for t in range(0, T):
        dh = tl.load(off_ptr + 2 * t)
        dw = tl.load(off_ptr + 2 * t + 1)
        ih = oh + dh
        iw = ow + dw
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = x_batch + ih * stride_xh + iw * stride_xw  # (BLOCK_M,)
        w_tap = w_ptr + t * stride_wt  # T * C_in * C_out < 2**31 is checked by the launcher
        for k0 in range(0, C_in, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < C_in
            a = tl.load(
                x_ptr + x_pix[:, None] + ks[None, :] * stride_xc,
                mask=valid[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            wt = tl.load(
                w_tap + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)

    n_all = pid_g * C_out + offs_n  # the group's output channels as indices of the whole tensors
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n_all, mask=n_mask, other=0.0)
        acc += bias[None, :]
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + n_all, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + n_all, mask=n_mask, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)

    y_pix = b.to(tl.int64) * stride_yb + oh * stride_yh + ow * stride_yw
    tl.store(
        y_ptr + y_pix[:, None] + n_all[None, :] * stride_yc,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _dilated_conv_wgrad_kernel(
    x_ptr,  # input of the forward pass, (B, G * C_in, H, W), any strides
    g_ptr,  # gradient of the pre-epilogue output g_H, (B, G * C_out, H, W), any strides
    off_ptr,  # tap offsets (dh_t, dw_t), (T, 2) int32, contiguous
    gw_ptr,  # output: gradient of the tap weights, (G, T, C_in, C_out) fp32 (fp64 for fp64 inputs), contiguous
    gb_ptr,  # output: column sums of g_H over (B, H, W), (G * C_out,) same dtype as gw; written only if HAS_BIAS
    B,  # batch size, scalar
    C_in,  # input channels per group, scalar
    C_out,  # output channels per group, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    T,  # number of taps, scalar
    stride_xb, stride_xc, stride_xh, stride_xw,  # strides of x, (4,)
    stride_gb, stride_gc, stride_gh, stride_gw,  # strides of g, (4,)
    HAS_BIAS: tl.constexpr,  # also reduce g_H into gb_ptr
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # pixels (flattened over B, H, W) per reduction step
    BLOCK_K: tl.constexpr,  # input channels per program
    BLOCK_N: tl.constexpr,  # output channels per program
):
    """Gradient of the sparse-tap convolution's weights (and bias), reduced over all pixels.

    For ``z[b, n, h, w] = sum_t sum_k x[b, k, h + dh_t, w + dw_t] w[t, k, n] + bias[n]``:

        grad_w[t, k, n] = sum_{b, h, w} x[b, k, h + dh_t, w + dw_t] * g_H[b, n, h, w]     (x = 0 outside the map)
        grad_bias[n]    = sum_{b, h, w} g_H[b, n, h, w]

    For the dilated block, a branch weight's gradient is ``grad_w_j[n, k, kh, kw] = s_j * grad_w[t, k, n]`` with
    ``t`` the tap at offset ``((kh - 1) d_j, (kw - 1) d_j)`` (zero for dropped taps), and
    ``grad_b_0 = grad_bias``, ``grad_b_j = grad_bias / (n - 1)``.
    """
    # grid: (G * T, cdiv(C_in, BLOCK_K), cdiv(C_out, BLOCK_N)); one program: a BLOCK_K x BLOCK_N tile of
    # grad_w[g, t]
    pid_gt = tl.program_id(0)
    pid_g = pid_gt // T
    t = pid_gt % T
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    x_ptr += pid_g * C_in * stride_xc  # the group's input and output channels
    g_ptr += pid_g * C_out * stride_gc
    HW = H * W
    M = B * HW
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < C_in
    n_mask = offs_n < C_out
    dh = tl.load(off_ptr + 2 * t)
    dw = tl.load(off_ptr + 2 * t + 1)

    acc_dtype = gw_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_dtype)
    col = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        b = offs_m // HW
        hw = offs_m % HW
        oh = hw // W
        ow = hw % W
        ih = oh + dh
        iw = ow + dw
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = b.to(tl.int64) * stride_xb + ih * stride_xh + iw * stride_xw  # (BLOCK_M,)
        g_pix = b.to(tl.int64) * stride_gb + oh * stride_gh + ow * stride_gw  # (BLOCK_M,)
        xt = tl.load(
            x_ptr + offs_k[:, None] * stride_xc + x_pix[None, :],
            mask=k_mask[:, None] & valid[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_M)
        gt = tl.load(
            g_ptr + g_pix[:, None] + offs_n[None, :] * stride_gc,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_N)
        acc = tl.dot(xt, gt, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            col += tl.sum(gt.to(acc_dtype), axis=0)

    gw_tile = gw_ptr + pid_gt.to(tl.int64) * C_in * C_out + offs_k[:, None] * C_out + offs_n[None, :]
    tl.store(gw_tile, acc, mask=k_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        # Every program of a channel tile computes the same column sums; the first tap's first row tile writes them.
        n_limit = tl.where((t == 0) & (pid_k == 0), C_out, 0)
        tl.store(gb_ptr + pid_g * C_out + offs_n, col, mask=offs_n < n_limit)


# ------------------------------------------------------------------------------------------------------- tap plan


@dataclass(frozen=True)
class TapPlan:
    """The combined sparse kernel of a dilated block on an ``H x W`` map.

    Attributes:
        offsets: ``(dh, dw)`` of each kept tap; the shared centre tap ``(0, 0)`` is first.
        tap_of: for each branch tap ``j * 9 + kh * 3 + kw`` the index of its combined tap, or -1 where the tap only
            ever reads padding on this map and is dropped.
        rounds: the branch taps grouped into rounds in which every combined tap appears at most once, as
            ``(combined indices, branch-tap indices)``; summing round by round builds the combined weights without
            duplicate indices in one scatter (deterministic on every device).
    """

    offsets: tuple[tuple[int, int], ...]
    tap_of: tuple[int, ...]
    rounds: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @property
    def num_taps(self) -> int:
        return len(self.offsets)


@functools.lru_cache(maxsize=256)
def tap_plan(dilations: tuple[int, ...], height: int, width: int) -> TapPlan:
    """The tap list of the combined kernel for ``dilations`` on a ``height x width`` map (see :class:`TapPlan`)."""
    offsets: list[tuple[int, int]] = [(0, 0)]
    index = {(0, 0): 0}
    tap_of: list[int] = []
    members: list[list[int]] = [[]]
    for j, d in enumerate(dilations):
        for kh in range(3):
            for kw in range(3):
                off = ((kh - 1) * d, (kw - 1) * d)
                if abs(off[0]) >= height or abs(off[1]) >= width:
                    tap_of.append(-1)
                    continue
                if off not in index:
                    index[off] = len(offsets)
                    offsets.append(off)
                    members.append([])
                t = index[off]
                tap_of.append(t)
                members[t].append(j * 9 + kh * 3 + kw)
    depth = max(len(m) for m in members)
    rounds = tuple(
        (tuple(t for t, m in enumerate(members) if len(m) > r), tuple(m[r] for m in members if len(m) > r))
        for r in range(depth)
    )
    return TapPlan(tuple(offsets), tuple(tap_of), rounds)


@functools.lru_cache(maxsize=256)
def _plan_tensors(plan: TapPlan, device: torch.device):
    """Device copies of a plan: offsets (T, 2), negated offsets (T, 2), rounds, and the gather for the backward.

    Built outside inference mode even when first asked for inside it: the cached tensors are reused by later
    training steps, which must be able to save them for backward.
    """
    with torch.inference_mode(False):
        off = torch.tensor(plan.offsets, dtype=torch.int32).reshape(-1, 2)
        tap_of = torch.tensor(plan.tap_of, dtype=torch.int64)
        kept = (tap_of >= 0).nonzero().flatten()
        rounds = tuple((torch.tensor(t).to(device), torch.tensor(j).to(device)) for t, j in plan.rounds)
        return off.to(device), (-off).contiguous().to(device), rounds, kept.to(device), tap_of[kept].to(device)


def _branch_scales(n: int) -> list[float]:
    return [1.0] + [1.0 / (n - 1)] * (n - 1)


def _combine_weights(weights: Sequence[torch.Tensor], plan: TapPlan, rounds, dtype: torch.dtype) -> torch.Tensor:
    """Branch weights ``[(C_out, C_in, 3, 3)] * n`` -> combined tap weights ``(T, C_in, C_out)`` in ``dtype``."""
    n = len(weights)
    c_out, c_in = weights[0].shape[:2]
    acc_dtype = compute_dtype(dtype)
    scales = torch.tensor(_branch_scales(n), dtype=acc_dtype, device=weights[0].device)
    stacked = torch.stack([w.to(acc_dtype) for w in weights]) * scales.view(n, 1, 1, 1, 1)
    flat = stacked.permute(0, 3, 4, 2, 1).reshape(n * 9, c_in, c_out)  # [j*9 + kh*3 + kw, k, n]
    taps = flat.new_zeros(plan.num_taps, c_in, c_out)
    for t_idx, j_idx in rounds:
        taps.index_add_(0, t_idx, flat.index_select(0, j_idx))
    return taps.to(dtype).contiguous()


def _combine_bias(biases: Sequence[torch.Tensor], acc_dtype: torch.dtype) -> torch.Tensor:
    b = [v.to(acc_dtype) for v in biases]
    return (b[0] + torch.stack(b[1:]).mean(0)).contiguous()


# ------------------------------------------------------------------------------------------------------- launchers


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _conv_blocks(m: int, c_in: int, c_out: int, dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the forward / input-gradient kernel."""
    # CPU tensors run on the interpreter, each program in numpy: fewer, larger programs are faster. Every other
    # device (cuda, and meta when fusionkern.kernels.sm90 records the launches) gets the GPU tiles.
    if device.type == "cpu":
        return min(256, max(16, _next_pow2(m))), min(64, max(16, _next_pow2(c_out))), 16, 1, 1
    wide = triton.cdiv(m, 128) * triton.cdiv(c_out, 128) >= 264  # enough 128 x 128 tiles for two waves on an H100
    block_m = min(128 if wide else 64, max(16, _next_pow2(m)))
    block_n = min(128 if wide else 64, max(16, _next_pow2(c_out)))
    k_cap = 16 if dtype in (torch.float64, torch.float32) else 64  # fp32 at 32 wide took 144 registers on sm_90
    block_k = min(k_cap, max(16, _next_pow2(c_in)))
    # 8 warps from 64 x 64 tiles: with 4, the sm_90 build of a 64 x 64 fp32 tile took 237 registers (12.5 %
    # occupancy); tests/test_kernels_static.py gates registers and occupancy
    num_warps = 8 if block_m * block_n >= 64 * 64 else 4
    return block_m, block_n, block_k, num_warps, 3


def _wgrad_blocks(
    m: int, c_in: int, c_out: int, device: torch.device, dtype: torch.dtype = torch.float32, precision: str = "tf32"
) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages) for the weight-gradient kernel (``dtype`` and the dot
    ``precision`` select the running Triton's :data:`~._common.TRITON_CONFIG_EXCEPTIONS`)."""
    if device.type == "cpu":  # see _conv_blocks
        block_k = min(64, max(16, _next_pow2(c_in)))
        return min(256, max(16, _next_pow2(m))), block_k, min(64, max(16, _next_pow2(c_out))), 1, 1
    block_k = min(64, max(16, _next_pow2(c_in)))
    block_n = min(64, max(16, _next_pow2(c_out)))
    config = dict(BLOCK_M=64, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=8 if block_k * block_n >= 64 * 64 else 4,
                  num_stages=3)  # 8 warps: see _conv_blocks  # fmt: skip
    (config,) = apply_config_exceptions("_dilated_conv_wgrad_kernel", [config], dtype, precision)
    return config["BLOCK_M"], config["BLOCK_K"], config["BLOCK_N"], config["num_warps"], config["num_stages"]


def dilated_conv_forward(
    x: torch.Tensor,  # (B, G * C_in, H, W)
    taps: torch.Tensor,  # (T, C_in, C_out) or (G, T, C_in, C_out), any strides
    offsets: torch.Tensor,  # (T, 2) int32, contiguous
    bias: torch.Tensor | None = None,  # (G * C_out,) fp32 / fp64
    scale: torch.Tensor | None = None,  # (G * C_out,) fp32 / fp64
    shift: torch.Tensor | None = None,  # (G * C_out,) fp32 / fp64
    relu: bool = False,
    input_precision: str = "ieee",
) -> torch.Tensor:  # (B, G * C_out, H, W) in x.dtype
    """Launch ``_dilated_conv_kernel``: allocate ``y`` (x's memory format) and pick the tile sizes. With 4-D
    ``taps`` the ``G`` groups (independent blocks side by side in the channels) run in one launch."""
    if taps.dim() == 3:
        taps = taps.unsqueeze(0)
    groups, t_count, c_in, c_out = taps.shape
    bsz, _, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    y = torch.empty((bsz, groups * c_out, h, w), device=x.device, dtype=x.dtype, memory_format=fmt)
    m = bsz * h * w
    if y.numel() == 0:
        return y
    if taps.numel() >= 2**31:
        unsupported("taps", f"{tuple(taps.shape)} has 2**31 or more elements, beyond the kernel's 32-bit offsets")
    block_m, block_n, block_k, num_warps, num_stages = _conv_blocks(m, c_in, c_out, x.dtype, x.device)
    dummy = offsets  # never read when the matching flag is off
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n), groups)
    _dilated_conv_kernel[grid](
        x, taps, offsets,
        bias if bias is not None else dummy,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        y,
        bsz, c_in, c_out, h, w, t_count,
        *x.stride(), *taps.stride(), *y.stride(),
        HAS_BIAS=bias is not None,
        HAS_AFFINE=scale is not None,
        RELU=relu,
        INPUT_PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def dilated_conv_weight_grad(
    x: torch.Tensor,  # (B, G * C_in, H, W)
    g: torch.Tensor,  # (B, G * C_out, H, W)
    offsets: torch.Tensor,  # (T, 2) int32, contiguous
    with_bias: bool = True,
    input_precision: str = "ieee",
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (G, T, C_in, C_out), (G * C_out,) in fp32 (fp64 for fp64 inputs)
    """Launch ``_dilated_conv_wgrad_kernel``: gradient of the tap weights and, optionally, of the combined bias,
    every group in one launch."""
    bsz, _, h, w = x.shape
    c_in, c_out = x.shape[1] // groups, g.shape[1] // groups
    t = offsets.shape[0]
    acc_dtype = compute_dtype(x.dtype)
    gw = torch.zeros((groups, t, c_in, c_out), device=x.device, dtype=acc_dtype)
    gb = torch.zeros((groups * c_out,), device=x.device, dtype=acc_dtype) if with_bias else None
    m = bsz * h * w
    if m == 0 or c_in == 0 or c_out == 0:
        return gw, gb
    block_m, block_k, block_n, num_warps, num_stages = _wgrad_blocks(m, c_in, c_out, x.device, x.dtype,
                                                                     input_precision)  # fmt: skip
    grid = (groups * t, triton.cdiv(c_in, block_k), triton.cdiv(c_out, block_n))
    _dilated_conv_wgrad_kernel[grid](
        x, g, offsets, gw, gb if gb is not None else gw,
        bsz, c_in, c_out, h, w, t,
        *x.stride(), *g.stride(),
        HAS_BIAS=with_bias,
        INPUT_PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return gw, gb


# ------------------------------------------------------------------------------------------------------- autograd


class DilatedAvgBlockFunction(torch.autograd.Function):
    """``y = act(scale * (sum_j s_j conv_{d_j}(x, w_j) + b_0 + mean(b_rest)) + shift)`` with gradients for ``x``,
    every ``w_j`` and ``b_j``, and the epilogue's ``scale`` / ``shift``. First-order only. With ``groups`` > 1,
    ``groups`` independent blocks side by side in the channels (``w_j``: (G * C_out, C_in, 3, 3), group ``g`` the
    rows ``g * C_out ...``), each launch covering every group."""

    @staticmethod
    def forward(ctx, x, scale, shift, dilations, relu, precision, has_bias, groups, *params):
        n = len(dilations)
        weights = params[:n]
        biases = params[n:] if has_bias else ()
        bsz, _, h, w = x.shape
        c_out = weights[0].shape[0] // groups
        plan = tap_plan(dilations, h, w)
        off, neg_off, rounds, kept, kept_tap = _plan_tensors(plan, x.device)
        acc_dtype = compute_dtype(x.dtype)

        def rows(t: torch.Tensor, g: int) -> torch.Tensor:
            return t[g * c_out : (g + 1) * c_out]

        taps = torch.stack([_combine_weights([rows(wj, g) for wj in weights], plan, rounds, x.dtype)
                            for g in range(groups)])  # (G, T, C_in, C_out)  # fmt: skip
        bias = None
        if has_bias:
            bias = torch.cat([_combine_bias([rows(bj, g) for bj in biases], acc_dtype) for g in range(groups)])
        scale_a = scale.to(acc_dtype).contiguous() if scale is not None else None
        shift_a = shift.to(acc_dtype).contiguous() if shift is not None else None
        y = dilated_conv_forward(x, taps, off, bias, scale_a, shift_a, relu, precision)

        ctx.dilations, ctx.relu, ctx.precision, ctx.has_bias = dilations, relu, precision, has_bias
        ctx.groups = groups
        ctx.has_affine = scale is not None
        ctx.weight_dtypes = [p.dtype for p in weights]
        ctx.bias_dtypes = [p.dtype for p in biases]
        ctx.scale_dtype = scale.dtype if scale is not None else None
        ctx.save_for_backward(x, taps, bias, scale_a, shift_a, y if relu else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, taps, bias, scale_a, shift_a, y = ctx.saved_tensors
        dilations = ctx.dilations
        n = len(dilations)
        groups = ctx.groups
        first = 8  # the index of the first weight among forward's inputs
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_scale, need_shift = needs[1], needs[2]
        need_w = any(needs[first : first + n])
        need_b = ctx.has_bias and any(needs[first + n :])
        bsz, _, h, w = x.shape
        c_in = taps.shape[2]
        plan = tap_plan(dilations, h, w)
        off, neg_off, _, kept, kept_tap = _plan_tensors(plan, x.device)

        # Through the epilogue: g_z = g * [y > 0], g_H = g_z * scale.
        g_z = g
        if ctx.relu:
            g_z = g * (y > 0)
        g_h = g_z
        if ctx.has_affine:
            g_h = (g_z.to(scale_a.dtype) * scale_a.view(1, -1, 1, 1)).to(x.dtype)
        elif g_h.dtype != x.dtype:
            g_h = g_h.to(x.dtype)

        grad_scale = grad_shift = None
        if ctx.has_affine and (need_scale or need_shift):
            g_z_acc = g_z.to(scale_a.dtype)
            if need_shift:
                grad_shift = g_z_acc.sum((0, 2, 3)).to(ctx.scale_dtype)
            if need_scale:
                pre = dilated_conv_forward(x, taps, off, bias, None, None, False, ctx.precision)
                grad_scale = (g_z_acc * pre.to(scale_a.dtype)).sum((0, 2, 3)).to(ctx.scale_dtype)

        grad_x = None
        if need_x:
            # grad_x = sum_j s_j conv_transpose_{d_j}(g_H, w_j): the forward kernel with mirrored taps and the
            # tap weights read transposed (C_out -> C_in) through their strides, every group in one launch.
            grad_x = dilated_conv_forward(g_h, taps.transpose(2, 3), neg_off, None, None, None, False, ctx.precision)

        grad_ws = [None] * n
        grad_bs = [None] * len(ctx.bias_dtypes)
        if need_w or need_b:
            if need_w:
                gw_taps, gb = dilated_conv_weight_grad(x, g_h, off, ctx.has_bias, ctx.precision, groups)
            else:
                gw_taps, gb = None, g_h.to(bias.dtype).sum((0, 2, 3))
            scales = _branch_scales(n)
            if need_w:
                c_out = gw_taps.shape[3]
                flat = gw_taps.new_zeros(groups, n * 9, c_in, c_out)
                flat.index_copy_(1, kept, gw_taps.index_select(1, kept_tap))
                # (G, n, C_out, C_in, 3, 3) -> per dilation j: (G * C_out, C_in, 3, 3)
                per_branch = flat.view(groups, n, 3, 3, c_in, c_out).permute(1, 0, 5, 4, 2, 3)
                for j, dtype in enumerate(ctx.weight_dtypes):
                    if needs[first + j]:
                        grad_ws[j] = (per_branch[j] * scales[j]).reshape(groups * c_out, c_in, 3, 3).to(dtype)
            if need_b:
                for j, dtype in enumerate(ctx.bias_dtypes):
                    if needs[first + n + j]:
                        grad_bs[j] = (gb * scales[j]).to(dtype)
        return (grad_x, grad_scale, grad_shift, None, None, None, None, None, *grad_ws, *grad_bs)


# ------------------------------------------------------------------------------------------------------- public API


def _as_int_tuple(dilations) -> tuple[int, ...]:
    try:
        items = list(dilations)
    except TypeError:
        unsupported("dilations", f"expected a sequence of positive ints, got {dilations!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in items):
        unsupported("dilations", f"expected a sequence of positive ints, got {dilations!r}")
    out = tuple(items)
    if len(out) < 2:
        unsupported("dilations", f"the block needs at least two dilations, got {out}")
    if any(d < 1 for d in out):
        unsupported("dilations", f"every dilation must be >= 1, got {out}")
    return out


@follows_autocast("x", "weights", "biases")
def dilated_avg_block(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    dilations: Sequence[int],
    *,
    bn: tuple[torch.Tensor, torch.Tensor] | nn.BatchNorm2d | None = None,
    relu: bool = True,
    allow_tf32: bool | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """``act(BN(H_0 + mean(H_1 .. H_{n-1})))`` with ``H_j = conv2d(x, w_j, b_j, padding=d_j, dilation=d_j)``.

    One Triton launch computes all branches, their average, the bias and the epilogue (see the module docstring);
    differentiable in ``x``, every weight and bias, and the BN affine.

    Args:
        x: input, (B, C_in, H, W), fp32 / bf16 / fp16 (fp64 is accepted too, for gradient checks).
        weights: one (C_out, C_in, 3, 3) weight per dilation, x's dtype and device.
        biases: one (C_out,) bias per dilation, or None for bias-free branches.
        dilations: one positive int per weight, at least two; 'same' padding equals the dilation.
        bn: None, an eval-mode ``nn.BatchNorm2d`` (folded with :func:`fold_bn`) or an explicit per-channel
            ``(scale, shift)`` pair of (C_out,) tensors, applied as ``H * scale + shift`` in the kernel's epilogue.
            A training-mode BatchNorm is refused: run the block with ``bn=None, relu=False`` and apply the torch
            BatchNorm and ReLU after it (as :func:`fusionkern.models.fused.block_forward` does).
        relu: apply ReLU last.
        groups: ``groups`` independent blocks side by side, as ``F.conv2d(groups=G)`` splits channels: each
            ``weights[j]`` is (G * C_out, C_in / G, 3, 3), each bias and BN vector (G * C_out,); group ``g`` reads
            input channels ``g * C_in / G ...`` and writes output channels ``g * C_out ...``. One launch runs every
            group (a FusionNet's five branches).
        allow_tf32: let fp32 products (forward and both gradients) use TF32 tensor cores; ignored for other
            dtypes. ``None`` (default) does what torch's own fp32 ``conv2d`` does (``torch.backends.cudnn.conv
            .fp32_precision`` / ``allow_tf32``: TF32 unless changed); ``False`` is IEEE fp32.

    Returns:
        (B, C_out, H, W) in x's dtype.

    Raises:
        UnsupportedOptionError (a ValueError): naming the offending argument, for any shape, dtype, device or
            option the kernel does not support.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        unsupported("x", f"expected a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in SUPPORTED_DTYPES:
        unsupported("x", f"dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    check_device("x", x)
    dil = _as_int_tuple(dilations)
    weights = list(weights)
    if len(weights) != len(dil):
        unsupported("weights", f"expected one weight per dilation ({len(dil)}), got {len(weights)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        unsupported("groups", f"must be a positive int dividing x's {x.shape[1]} channels, got {groups!r}")
    c_in = x.shape[1] // groups
    c_out = weights[0].shape[0] if weights[0].dim() == 4 else -1
    if c_out > 0 and c_out % groups:
        unsupported("groups", f"{groups} groups must divide the weights' {c_out} output channels")
    for j, wj in enumerate(weights):
        if not isinstance(wj, torch.Tensor) or tuple(wj.shape) != (c_out, c_in, 3, 3):
            unsupported(f"weights[{j}]", f"expected shape ({c_out if c_out > 0 else 'C_out'}, {c_in}, 3, 3), "
                f"got {tuple(getattr(wj, 'shape', ()))}"
            )
        if wj.dtype != x.dtype:
            unsupported(f"weights[{j}]", f"dtype {wj.dtype} differs from x's {x.dtype}")
        if wj.device != x.device:
            unsupported(f"weights[{j}]", f"on {wj.device}, x is on {x.device}")
    has_bias = biases is not None
    biases = list(biases) if has_bias else []
    if has_bias:
        if len(biases) != len(dil):
            unsupported("biases", f"expected one bias per dilation ({len(dil)}) or None, got {len(biases)}")
        for j, bj in enumerate(biases):
            if not isinstance(bj, torch.Tensor) or tuple(bj.shape) != (c_out,):
                unsupported(f"biases[{j}]", f"expected shape ({c_out},), got {tuple(getattr(bj, 'shape', ()))}")
            if bj.dtype != x.dtype:
                unsupported(f"biases[{j}]", f"dtype {bj.dtype} differs from x's {x.dtype}")
            if bj.device != x.device:
                unsupported(f"biases[{j}]", f"on {bj.device}, x is on {x.device}")
    scale = shift = None
    if isinstance(bn, nn.Module):
        scale, shift = fold_bn(bn, differentiable=True)
    elif bn is not None:
        if not (isinstance(bn, (tuple, list)) and len(bn) == 2 and all(isinstance(v, torch.Tensor) for v in bn)):
            unsupported("bn", "expected None, an eval-mode BatchNorm2d or a (scale, shift) pair of tensors")
        scale, shift = bn
    if scale is not None:
        for name, v in (("scale", scale), ("shift", shift)):
            if tuple(v.shape) != (c_out,):
                unsupported("bn", f"{name} must have shape ({c_out},), got {tuple(v.shape)}")
            if not v.is_floating_point():
                unsupported("bn", f"{name} must be floating point, got {v.dtype}")
            if v.device != x.device:
                unsupported("bn", f"{name} is on {v.device}, x is on {x.device}")
    if not isinstance(relu, bool):
        unsupported("relu", f"expected a bool, got {relu!r}")
    check_int32_indexable("x", x)
    if x.shape[0] * c_out * x.shape[2] * x.shape[3] > 2**31 - 1:
        out_shape = (x.shape[0], c_out, x.shape[2], x.shape[3])
        unsupported("weights", f"an output of shape {out_shape} exceeds the kernels' int32 indexing")
    precision = dot_precision(x.dtype, resolve_allow_tf32(allow_tf32))
    return DilatedAvgBlockFunction.apply(x, scale, shift, dil, relu, precision, has_bias, groups, *weights, *biases)
