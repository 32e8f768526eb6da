"""3 x 3 convolution + bias + ReLU + 2 x 2 mixed pooling (+ folded inference BatchNorm): Triton kernels, autograd.

The branch layers 2-4 of FusionNet (DGCNN order ``conv -> ReLU -> MixPool -> BN``) in one kernel that writes only
the pooled map. Any square kernel size, stride and dilation work; 3 x 3 with padding 1 is the branch's case.

Training keeps BatchNorm as a separate torch op after the kernel (batch statistics and running-stat updates stay
exactly PyTorch's); inference folds it into the epilogue as ``y * scale + shift`` (:func:`fold_bn`).

In training the forward also writes a record of each pooled value (a byte: first-maximum position and ReLU signs;
and ``max - avg``), from which :func:`~fusionkern.kernels._common.pool_record_backward` gets ``dL/dz`` in one
elementwise pass; with ``pool_record=False`` the backward kernel recomputes the conv tile instead.

Contents, in order: the forward kernel, the backward kernel that recomputes (``dL/dz`` plus the ``alpha`` and
bias partial sums), the launchers, the ``autograd.Function`` and the functional API :func:`conv2d_mixpool`. The
kernels take tensors and plain parameters only; running a reference ``ConvStage`` on them is
:func:`fusionkern.models.fused.stage_forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusionkern.kernels._common import (
    CONV_TUNE_KEY,
    ConvGeometry,
    _conv_bwd_epilogue,
    _conv_fwd_epilogue,
    _split_windows,
    _store_grad_z,
    _store_record,
    _window_pixels,
    _window_rows,
    _x_tile,
    alpha_grad,
    check_alpha,
    check_bn,
    check_groups,
    check_device,
    check_int32_indexable,
    check_tensor,
    compute_dtype,
    conv_autotune,
    conv_backward,
    conv_geometry,
    dot_precision,
    follows_autocast,
    group_alpha,
    is_channels_last,
    pool_record_backward,
    resolve_allow_tf32,
    square_int,
    tl_acc_dtype,
    unsupported,
    wants_grad,
)

_AUTOTUNE_KEY = [*CONV_TUNE_KEY, "HAS_BIAS"]


@triton.jit
def _conv_windows(
    x_ptr,  # input, (B, CI, H, W), any strides
    w_ptr,  # weight, (CO, CI, K, K), any strides
    bias_ptr,  # bias, (CO,) (read when HAS_BIAS)
    pid_p,  # program index along output pixels
    pid_co,  # program index along output channels
    B,  # batch size
    CI,  # input channels
    H,  # input height
    W,  # input width
    CO,  # output channels
    PH,  # output rows
    PW,  # output columns
    stride_xb,  # x stride along batch, in elements
    stride_xc,  # x stride along channel, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    stride_wo,  # weight stride along out channel, in elements
    stride_wi,  # weight stride along in channel, in elements
    stride_wh,  # weight stride along row, in elements
    stride_ww,  # weight stride along column, in elements
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    dilation,  # dilation (square)
    r_begin,  # first reduction index (ci, kh, kw) of this program's share; CHANNELS_INNER: first step
    r_end,  # one past its last
    K: tl.constexpr,  # kernel size (square)
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    POOL: tl.constexpr,  # 2 x 2 windows
    ACC_DTYPE: tl.constexpr,  # accumulation dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_R: tl.constexpr,  # reduction chunk over (ci, kh, kw); CHANNELS_INNER: over ci at one tap
    CHANNELS_INNER: tl.constexpr,  # steps over (tap, chunk of BLOCK_R input channels), see below
):
    """``z = conv2d(x, w) + bias`` at the four window positions of a program's tile (shared by the forward and
    the recomputing backward kernel), with the tile's coordinates.

    The reduction runs over ``r = (ci, kh, kw)`` flattened, or with ``CHANNELS_INNER`` over steps ``(kh, kw,
    ci-chunk)``: each step loads BLOCK_R consecutive input channels at one tap, contiguous runs in channels-last
    (NHWC) ``x`` and weights (``stride_xc == stride_wi == 1``), which 16-bit inputs need for pipelined (cp.async)
    loads; the step range ``[r_begin, r_end)`` then counts steps, ``K * K * cdiv(CI, BLOCK_R)`` in all."""
    p_mask, b, ph, pw, oh, ow, ih, iw, row_off = _window_pixels(
        pid_p, B, PH, PW, conv_stride, padding, stride_xb, stride_xh, stride_xw, POOL, BLOCK_P
    )
    m_valid, m_off, m_ih, m_iw = _window_rows(
        pid_p, B, PH, PW, conv_stride, padding, stride_xb, stride_xh, stride_xw, POOL, BLOCK_P
    )
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < CO
    if POOL:
        acc = tl.zeros((4 * BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    if CHANNELS_INNER:
        chunks = tl.cdiv(CI, BLOCK_R)
        for step in range(r_begin, r_end):
            tap = step // chunks
            ci = (step % chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
            c_mask = ci < CI
            kh = tap // K
            kw = tap % K
            h = m_ih + kh * dilation
            w_in = m_iw + kw * dilation
            row_ok = m_valid & (h >= 0) & (h < H) & (w_in >= 0) & (w_in < W)
            x_off = (m_off + kh * dilation * stride_xh + kw * dilation * stride_xw)[:, None] + ci[None, :] * stride_xc
            xt = tl.load(x_ptr + x_off, mask=row_ok[:, None] & c_mask[None, :], other=0.0)
            w_off = (kh * stride_wh + kw * stride_ww + ci * stride_wi)[:, None] + (offs_co * stride_wo)[None, :]
            w = tl.load(w_ptr + w_off, mask=c_mask[:, None] & co_mask[None, :], other=0.0)
            acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)
    else:
        for r0 in range(r_begin, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r_end
            ci = offs_r // (K * K)
            kh = (offs_r % (K * K)) // K
            kw = offs_r % K
            dh = kh * dilation
            dw = kw * dilation
            col_off = ci * stride_xc + dh * stride_xh + dw * stride_xw
            w_off = (ci * stride_wi + kh * stride_wh + kw * stride_ww)[:, None] + (offs_co * stride_wo)[None, :]
            w = tl.load(w_ptr + w_off, mask=r_mask[:, None] & co_mask[None, :], other=0.0)
            xt = _x_tile(x_ptr, m_off, col_off, m_ih, m_iw, dh, dw, H, W, m_valid, r_mask)
            acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)  # every window position in one dot
    acc00, acc01, acc10, acc11 = _split_windows(acc, POOL, BLOCK_P, BLOCK_CO)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
        acc00 += bias
        acc01 += bias
        acc10 += bias
        acc11 += bias
    return acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow


@triton.jit(do_not_specialize=["M_BUCKET"])
def _conv_mixpool_fwd_kernel(
    x_ptr,  # input, (B, G * CI, H, W), any strides
    w_ptr,  # weight, (G * CO, CI, K, K), any strides
    bias_ptr,  # bias, (G * CO,) contiguous (read when HAS_BIAS)
    alpha_ptr,  # mixing weight, (G,) contiguous (read when POOL)
    scale_ptr,  # folded BatchNorm scale, (G * CO,) contiguous (read when BN)
    shift_ptr,  # folded BatchNorm shift, (G * CO,) contiguous (read when BN)
    out_ptr,  # output, (B, G * CO, PH, PW)
    code_ptr,  # out when RECORD: (B, G * CO, PH, PW) uint8 record for the backward, contiguous
    gap_ptr,  # out when RECORD: (B, G * CO, PH, PW) max - avg, contiguous, accumulation dtype
    B,  # batch size
    CI,  # input channels
    H,  # input height
    W,  # input width
    CO,  # output channels
    PH,  # output rows: OH // 2 when POOL, else OH
    PW,  # output columns: OW // 2 when POOL, else OW
    M_BUCKET,  # B * PH * PW rounded up to a power of two: read by the autotune key only
    G,  # groups: CI and CO are per group; program_id(2) is group * SPLIT_K + split
    SPLIT_K,  # programs sharing one output tile's reduction; > 1: raw partial sums to out[split] (no epilogue)
    stride_xb,  # x stride along batch, in elements
    stride_xc,  # x stride along channel, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    stride_wo,  # weight stride along out channel, in elements
    stride_wi,  # weight stride along in channel, in elements
    stride_wh,  # weight stride along row, in elements
    stride_ww,  # weight stride along column, in elements
    stride_os,  # out stride along the split (SPLIT_K > 1: out is (SPLIT_K, B, G * CO, PH, PW)), in elements
    stride_ob,  # out stride along batch, in elements
    stride_oc,  # out stride along channel, in elements
    stride_oh,  # out stride along row, in elements
    stride_ow,  # out stride along column, in elements
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    dilation,  # dilation (square)
    K: tl.constexpr,  # kernel size (square)
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    RELU: tl.constexpr,  # ReLU after the conv
    POOL: tl.constexpr,  # 2 x 2 / stride 2 mixed pooling, floor mode
    BN: tl.constexpr,  # per-channel affine after pooling
    RECORD: tl.constexpr,  # write the backward's record (training)
    ACC_DTYPE: tl.constexpr,  # tl.float32 (tl.float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_R: tl.constexpr,  # reduction chunk over (ci, kh, kw), or over ci at one tap (CHANNELS_INNER)
    CHANNELS_INNER: tl.constexpr,  # reduce over (kh, kw, ci-chunk) steps: channels-last x and weight
):
    """``y = bn(mixpool(relu(conv2d(x, w) + bias)))``, every stage after the conv optional.

    Implicit GEMM: rows are output pixels (pooled pixels when POOL, four conv positions each), columns output
    channels, the reduction runs over ``r = (ci, kh, kw)`` flattened. Each weight tile is loaded once per reduction
    chunk and shared by the four window positions. Pooling:
    ``y = alpha * max(z_00, z_01, z_10, z_11) + (1 - alpha) * (z_00 + z_01 + z_10 + z_11) / 4``, then
    ``y * scale + shift`` with BN.
    """
    # grid: (cdiv(B * PH * PW, BLOCK_P), cdiv(CO, BLOCK_CO), G); one program = BLOCK_P output pixels x BLOCK_CO
    # channels of one group
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(2) // SPLIT_K
    pid_s = tl.program_id(2) % SPLIT_K
    x_ptr += pid_g * CI * stride_xc
    w_ptr += pid_g * CO * stride_wo
    bias_ptr += pid_g * CO
    out_ptr += pid_s * stride_os
    if CHANNELS_INNER:
        R = K * K * tl.cdiv(CI, BLOCK_R)  # steps of BLOCK_R channels at one tap
        share = tl.cdiv(R, SPLIT_K)
    else:
        R = CI * K * K
        share = tl.cdiv(tl.cdiv(R, BLOCK_R), SPLIT_K) * BLOCK_R  # whole chunks per split
    r_begin = pid_s * share
    acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow = _conv_windows(
        x_ptr, w_ptr, bias_ptr, pid_p, tl.program_id(1), B, CI, H, W, CO, PH, PW, stride_xb, stride_xc, stride_xh,
        stride_xw, stride_wo, stride_wi, stride_wh, stride_ww, conv_stride, padding, dilation, r_begin,
        tl.minimum(R, r_begin + share), K, HAS_BIAS, POOL, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_R,
        CHANNELS_INNER,
    )  # fmt: skip
    co_all = pid_g * CO + offs_co  # the group's output channels as indices of the whole (B, G * CO, ...) output
    y = _conv_fwd_epilogue(acc00, acc01, acc10, acc11, co_all, co_mask, alpha_ptr + pid_g, scale_ptr, shift_ptr,
                           ACC_DTYPE, RELU, POOL, BN)  # fmt: skip
    out_off = (b * stride_ob + ph * stride_oh + pw * stride_ow)[:, None] + (co_all * stride_oc)[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])
    if RECORD:
        _store_record(code_ptr, gap_ptr, acc00, acc01, acc10, acc11, b, ph, pw, co_all,
                      p_mask[:, None] & co_mask[None, :], G * CO, PH, PW, RELU, POOL)  # fmt: skip


@triton.jit(do_not_specialize=["M_BUCKET"])
def _conv_mixpool_bwd_kernel(
    x_ptr,  # input, (B, G * CI, H, W), any strides
    w_ptr,  # weight, (G * CO, CI, K, K), any strides
    bias_ptr,  # bias, (G * CO,) contiguous (read when HAS_BIAS)
    alpha_ptr,  # mixing weight, (G,) contiguous (read when POOL)
    scale_ptr,  # folded BatchNorm scale, (G * CO,) contiguous (read when BN)
    grad_out_ptr,  # dL/dy, (B, G * CO, PH, PW), any strides
    grad_z_ptr,  # out: dL/dz (conv output incl. bias, before ReLU), (B, G * CO, OH, OW)
    alpha_part_ptr,  # out: per-program partial sums of g * (max - avg), (cdiv(B * PH * PW, 16), G * CO), zeroed
    bias_part_ptr,  # out: per-program partial sums of dL/dz, (cdiv(B * PH * PW, 16), G * CO), zeroed
    B,  # batch size
    CI,  # input channels
    H,  # input height
    W,  # input width
    CO,  # output channels
    PH,  # output rows: OH // 2 when POOL, else OH
    PW,  # output columns: OW // 2 when POOL, else OW
    M_BUCKET,  # B * PH * PW rounded up to a power of two: read by the autotune key only
    G,  # groups: CI and CO are per group; program_id(2) is the group
    stride_xb,  # x stride along batch, in elements
    stride_xc,  # x stride along channel, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    stride_wo,  # weight stride along out channel, in elements
    stride_wi,  # weight stride along in channel, in elements
    stride_wh,  # weight stride along row, in elements
    stride_ww,  # weight stride along column, in elements
    stride_gb,  # grad_output stride along batch, in elements
    stride_gc,  # grad_output stride along channel, in elements
    stride_gh,  # grad_output stride along row, in elements
    stride_gw,  # grad_output stride along column, in elements
    stride_zb,  # grad_z stride along batch, in elements
    stride_zc,  # grad_z stride along channel, in elements
    stride_zh,  # grad_z stride along row, in elements
    stride_zw,  # grad_z stride along column, in elements
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    dilation,  # dilation (square)
    K: tl.constexpr,  # kernel size (square)
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    RELU: tl.constexpr,  # ReLU after the conv
    POOL: tl.constexpr,  # 2 x 2 / stride 2 mixed pooling, floor mode
    BN: tl.constexpr,  # per-channel affine (folded BatchNorm) after pooling
    ACC_DTYPE: tl.constexpr,  # tl.float32 (tl.float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_R: tl.constexpr,  # reduction chunk over (ci, kh, kw)
):
    """``dL/dz`` of the fused layer, recomputing the conv tile instead of saving the pre-pool activation.

    With ``g = dL/dy * scale`` (``scale`` = 1 without BN), for each window position ``k``:
    ``dL/dz_k = [z_k > 0] * (alpha * [k is the first maximum of relu(z) in row-major order] + (1 - alpha) / 4) * g``
    (ReLU factor only with RELU; without POOL, ``dL/dz = [z > 0] * g``). Pooled-away trailing rows/columns of an odd
    conv output get no write (the launcher zeroes them). Per program, summed over its pixels into row ``pid_p``:
    ``dL/dalpha = sum g * (max - avg)`` and ``dL/dbias[o] = sum dL/dz[., o, ., .]``; the launcher sums the rows.
    """
    # grid: (cdiv(B * PH * PW, BLOCK_P), cdiv(CO, BLOCK_CO), G); one program = BLOCK_P output pixels x BLOCK_CO
    # channels of one group
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(2)
    x_ptr += pid_g * CI * stride_xc  # the group's inputs and weights
    w_ptr += pid_g * CO * stride_wo
    bias_ptr += pid_g * CO
    acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow = _conv_windows(
        x_ptr, w_ptr, bias_ptr, pid_p, tl.program_id(1), B, CI, H, W, CO, PH, PW, stride_xb, stride_xc, stride_xh,
        stride_xw, stride_wo, stride_wi, stride_wh, stride_ww, conv_stride, padding, dilation, 0, CI * K * K, K,
        HAS_BIAS, POOL, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_R, False,
    )  # fmt: skip
    # the group's output channels as indices of the whole (B, G * CO, ...) tensors
    co_all = pid_g * CO + offs_co
    mask = p_mask[:, None] & co_mask[None, :]
    g_off = (b * stride_gb + ph * stride_gh + pw * stride_gw)[:, None] + (co_all * stride_gc)[None, :]
    g = tl.load(grad_out_ptr + g_off, mask=mask, other=0.0).to(ACC_DTYPE)
    if BN:
        scale = tl.load(scale_ptr + co_all, mask=co_mask, other=0.0).to(ACC_DTYPE)
        g = g * scale[None, :]
    d00, d01, d10, d11, dalpha = _conv_bwd_epilogue(acc00, acc01, acc10, acc11, g, alpha_ptr + pid_g, ACC_DTYPE,
                                                    RELU, POOL)  # fmt: skip
    z_row = b * stride_zb + oh * stride_zh + ow * stride_zw
    _store_grad_z(grad_z_ptr, z_row, co_all * stride_zc, stride_zh, stride_zw, d00, d01, d10, d11, mask, POOL)
    if POOL:
        tl.store(alpha_part_ptr + pid_p * (G * CO) + co_all, tl.sum(dalpha, axis=0), mask=co_mask)
        d_sum = tl.sum(d00 + d01 + d10 + d11, axis=0)
    else:
        d_sum = tl.sum(d00, axis=0)
    if HAS_BIAS:
        tl.store(bias_part_ptr + pid_p * (G * CO) + co_all, d_sum, mask=co_mask)


_conv_mixpool_fwd = conv_autotune(_conv_mixpool_fwd_kernel, [*_AUTOTUNE_KEY, "SPLIT_K", "CHANNELS_INNER"])
_conv_mixpool_bwd = conv_autotune(
    _conv_mixpool_bwd_kernel, _AUTOTUNE_KEY, reset_to_zero=["alpha_part_ptr", "bias_part_ptr"]
)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Static options of one call (everything but the tensors)."""

    relu: bool
    pool: bool
    bn: bool
    has_bias: bool
    allow_tf32: bool
    record: bool = True  # a gradient is wanted and the forward writes the backward's record (else it recomputes)


# Split-K: a layer whose output tiles fill less than a wave of an H100 (the head's layers on their 4 x 4 and smaller
# maps) shares each tile's reduction among up to SPLIT_K_MAX programs.
SPLIT_K_MAX = 8
_WAVE_PROGRAMS = 2 * 132  # two resident 8-warp blocks per SM on 132 SMs
_MIN_SPLIT_CHUNKS = 4  # each split keeps at least this many 32-wide reduction chunks


def split_k(geo: ConvGeometry, device: torch.device, record: bool) -> int:
    """How many programs share each output tile's reduction: 1 for pooled layers, for training forwards that write
    a record and on the CPU interpreter; else doubled while the largest tiles (64 x 64) would not fill a wave and
    every split keeps enough of the reduction."""
    if geo.pool or record or device.type == "cpu":
        return 1
    tiles = triton.cdiv(geo.n_pixels, 64) * triton.cdiv(geo.CO, 64) * geo.groups
    chunks = triton.cdiv(geo.CI * geo.K**2, 32)
    s = 1
    while s < SPLIT_K_MAX and tiles * s < _WAVE_PROGRAMS and chunks >= _MIN_SPLIT_CHUNKS * 2 * s:
        s *= 2
    return s


def _layout(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, bool, torch.memory_format]:
    """The weight as the forward kernel reads it, its CHANNELS_INNER flag and the output's memory format: with a
    channels-last ``x`` the weight goes channels-last too (input channels contiguous at each tap) and the output is
    written channels-last, so the next layer reads NHWC as well."""
    if not is_channels_last(x):
        return weight, False, torch.contiguous_format
    return weight.contiguous(memory_format=torch.channels_last), True, torch.channels_last


def _launch_forward(x, weight, bias, alpha, scale, shift, geo: ConvGeometry, opt: _Options, record: bool = False):
    """``(out, code, gap)``: the layer's output and, with ``record``, the backward's record (else ``None``s)."""
    splits = split_k(geo, x.device, record)
    if splits > 1 and math.prod(geo.out_shape):  # never with a record
        return _launch_split_forward(x, weight, bias, alpha, scale, shift, geo, opt, splits), None, None
    weight, inner, out_format = _layout(x, weight)
    out = torch.empty(geo.out_shape, device=x.device, dtype=x.dtype, memory_format=out_format)
    code = gap = None
    if record:
        code = torch.empty(geo.out_shape, device=x.device, dtype=torch.uint8)
        gap = torch.empty(geo.out_shape, device=x.device, dtype=compute_dtype(x.dtype))
    if out.numel() == 0:
        return out, code, gap
    check_int32_indexable("output", out)
    dummy = alpha  # stands in for absent optional tensors (never read)
    _conv_mixpool_fwd[geo.grid](
        x, weight, dummy if bias is None else bias, alpha, dummy if scale is None else scale,
        dummy if shift is None else shift, out, out if code is None else code, out if gap is None else gap,
        geo.B, geo.CI, geo.H, geo.W, geo.CO, geo.PH, geo.PW, geo.m_bucket, geo.groups, 1,
        *x.stride(), *weight.stride(), 0, *out.stride(),
        geo.stride, geo.padding, geo.dilation,
        K=geo.K, HAS_BIAS=opt.has_bias, RELU=opt.relu, POOL=opt.pool, BN=opt.bn, RECORD=record,
        ACC_DTYPE=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, opt.allow_tf32), CHANNELS_INNER=inner,
    )  # fmt: skip
    return out, code, gap


def _launch_split_forward(x, weight, bias, alpha, scale, shift, geo: ConvGeometry, opt: _Options, splits: int):
    """An unpooled layer with its reduction shared by ``splits`` programs per tile: each writes its raw partial sums
    (accumulation dtype), then bias, ReLU and the affine run on their sum."""
    weight, inner, out_format = _layout(x, weight)
    cdtype = compute_dtype(x.dtype)
    parts = torch.empty((splits, *geo.out_shape), device=x.device, dtype=cdtype)
    check_int32_indexable("split partial sums", parts)
    G = geo.groups

    def grid(meta):  # the groups' axis carries the splits: program_id(2) = group * splits + split
        p, c, _ = geo.grid(meta)
        return (p, c, G * splits)

    _conv_mixpool_fwd[grid](
        x, weight, alpha, alpha, alpha, alpha, parts, parts, parts,
        geo.B, geo.CI, geo.H, geo.W, geo.CO, geo.PH, geo.PW, geo.m_bucket, G, splits,
        *x.stride(), *weight.stride(), parts.stride(0), *parts[0].stride(),
        geo.stride, geo.padding, geo.dilation,
        K=geo.K, HAS_BIAS=False, RELU=False, POOL=False, BN=False, RECORD=False,
        ACC_DTYPE=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, opt.allow_tf32), CHANNELS_INNER=inner,
    )  # fmt: skip
    z = parts.sum(0)
    if bias is not None:
        z += bias.to(cdtype).view(1, -1, 1, 1)
    if opt.relu:
        z.clamp_(min=0)
    if scale is not None:
        z = z * scale.to(cdtype).view(1, -1, 1, 1) + shift.to(cdtype).view(1, -1, 1, 1)
    return z.to(x.dtype).contiguous(memory_format=out_format)


def _launch_backward(x, weight, bias, alpha, scale, grad_out, geo: ConvGeometry, opt: _Options):
    """``(dL/dz, dL/dalpha, dL/dbias)``: ``dL/dz`` of the conv output's shape, a (G,) and a (G * CO,) tensor."""
    grad_z = geo.new_grad_z(x.device, x.dtype, channels_last=is_channels_last(x))
    cdtype = compute_dtype(x.dtype)
    G = geo.groups
    alpha_part = torch.zeros((geo.partial_rows if geo.pool else 1, G * geo.CO), device=x.device, dtype=cdtype)
    bias_part = torch.zeros((geo.partial_rows if opt.has_bias else 1, G * geo.CO), device=x.device, dtype=cdtype)

    def reduced():
        return alpha_part.view(-1, G, geo.CO).sum((0, 2)), bias_part.sum(0)

    if grad_z.numel() == 0:
        return (grad_z, *reduced())
    check_int32_indexable("grad_output", grad_out)
    check_int32_indexable("grad_z", grad_z)
    dummy = alpha
    _conv_mixpool_bwd[geo.grid](
        x, weight, dummy if bias is None else bias, alpha, dummy if scale is None else scale, grad_out, grad_z,
        alpha_part, bias_part,
        geo.B, geo.CI, geo.H, geo.W, geo.CO, geo.PH, geo.PW, geo.m_bucket, G,
        *x.stride(), *weight.stride(), *grad_out.stride(), *grad_z.stride(),
        geo.stride, geo.padding, geo.dilation,
        K=geo.K, HAS_BIAS=opt.has_bias, RELU=opt.relu, POOL=opt.pool, BN=opt.bn,
        ACC_DTYPE=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, opt.allow_tf32),
    )  # fmt: skip
    return (grad_z, *reduced())


# --------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------


class Conv2dMixPoolFunction(torch.autograd.Function):
    """Fused conv + bias (+ ReLU, + mixed pooling, + folded BN) with gradients for x, weight, bias, alpha.

    Backward: with pooling or BN, ``dL/dz`` and the ``alpha`` and bias partial sums come from the record the
    forward wrote (a byte per pooled value: first-maximum position and ReLU signs, plus ``max - avg``;
    :func:`~fusionkern.kernels._common.pool_record_backward`), an elementwise pass; with ``pool_record=False`` the
    forward saves no record and the backward kernel recomputes the conv tile instead (less memory, one more
    convolution). ``dL/dx`` and ``dL/dweight`` come from :func:`conv_backward` (cuDNN on a GPU) on ``dL/dz``, at the
    precision resolved by the forward. Without pooling or BN, ``dL/dz`` is read off the saved output.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, scale, shift, geo: ConvGeometry, opt: _Options):
        alpha_c = group_alpha(alpha, geo.groups, compute_dtype(x.dtype))
        record = opt.record and (opt.pool or opt.bn)  # opt.record: a gradient is wanted (decided by the caller)
        out, code, gap = _launch_forward(x, weight, bias, alpha_c, scale, shift, geo, opt, record)
        saved_out = out if (opt.relu and not opt.pool and not opt.bn) else None
        ctx.save_for_backward(x, weight, bias, alpha_c, scale, saved_out, code, gap)
        ctx.geo, ctx.opt = geo, opt
        ctx.alpha_like = (alpha.shape, alpha.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, alpha_c, scale, saved_out, code, gap = ctx.saved_tensors
        geo, opt = ctx.geo, ctx.opt
        need_x, need_w, need_b, need_alpha = ctx.needs_input_grad[:4]
        grads: list = [None] * 8
        if not (need_x or need_w or need_b or need_alpha):
            return tuple(grads)

        if code is not None:
            grad_z, grad_alpha, grad_bias = pool_record_backward(code, gap, grad_out, alpha_c, scale, geo, opt.relu,
                                                                 opt.has_bias)  # fmt: skip
        elif opt.pool or opt.bn:
            grad_z, grad_alpha, grad_bias = _launch_backward(x, weight, bias, alpha_c, scale, grad_out, geo, opt)
        else:
            grad_z = torch.where(saved_out > 0, grad_out, 0) if opt.relu else grad_out
            grad_alpha = None
            grad_bias = grad_z.sum((0, 2, 3), dtype=compute_dtype(x.dtype)) if need_b else None
        if need_alpha and grad_alpha is not None:
            grads[3] = alpha_grad(grad_alpha, ctx.alpha_like)
        if need_b:
            grads[2] = grad_bias.to(bias.dtype)
        if need_x or need_w:
            grads[0], grads[1] = conv_backward(grad_z.to(x.dtype), x, weight, geo, need_x, need_w, opt.allow_tf32)
        return tuple(grads)


# --------------------------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------------------------


@follows_autocast("x", "weight", "bias")
def conv2d_mixpool(
    x: torch.Tensor,  # (B, C_in, H, W)
    weight: torch.Tensor,  # (C_out, C_in / groups, k, k)
    bias: torch.Tensor | None,  # (C_out,)
    alpha: torch.Tensor | float | None,
    *,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    relu: bool = True,
    bn: tuple[torch.Tensor, torch.Tensor] | None = None,
    groups: int = 1,
    allow_tf32: bool | None = None,
    pool_record: bool = True,
) -> torch.Tensor:
    """``bn(MixPool2d(relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))))`` in one kernel.

    Args:
        alpha: ``None`` for no pooling; a 0-d tensor (trainable, MixPool2d's ``alpha``) or a float (constant;
            ``1.0`` is ``nn.MaxPool2d(2)``) for 2 x 2 / stride 2 mixed pooling in floor mode; with groups, a
            ``(groups,)`` tensor pools each group with its own alpha.
        stride, padding, dilation: ints (or equal pairs).
        relu: apply ReLU to the conv output (before pooling).
        bn: a folded inference BatchNorm ``(scale, shift)`` from :func:`fold_bn`, applied after the pooling; the
            pair is a constant (no gradient). In training keep BatchNorm a separate op after this call.
        groups: independent convolutions side by side, as in ``F.conv2d``: group ``g`` maps input channels
            ``g * C_in / groups ...`` to output channels ``g * C_out / groups ...``. All groups run in one launch
            (a FusionNet stage's five branches are five groups).
        allow_tf32: let float32 products (the forward kernel's dots and the backward) use TF32 tensor cores.
            ``None`` (default) does what PyTorch's own fp32 convolutions do (``torch.backends.cudnn.conv
            .fp32_precision`` / ``torch.backends.cudnn.allow_tf32``, TF32 unless changed); ``False`` is IEEE fp32.
            Ignored for other dtypes (16-bit inputs always use the tensor cores).
        pool_record: when a gradient is needed, the forward writes a record for the backward (one byte per pooled
            value and ``max - avg`` in the accumulation dtype: 5 bytes per output value in fp32, 9 in float64) so
            that the backward need not recompute the convolution; ``False`` saves that memory and recomputes.

    Returns:
        ``(B, C_out, OH // 2, OW // 2)`` with pooling, else ``(B, C_out, OH, OW)``, in ``x.dtype``.

    Dtypes: ``x``, ``weight`` and ``bias`` share one of float32, bfloat16, float16 (float64 for verification);
    accumulation in float32 (float64). Differentiable in ``x``, ``weight``, ``bias`` and a tensor ``alpha``.
    With groups, ``dL/dx`` and ``dL/dweight`` come from one grouped ``aten.convolution_backward``.
    """
    check_tensor("x", x, ndim=4)
    check_device("x", x)
    check_tensor("weight", weight, ndim=4, device=x.device)
    if weight.dtype != x.dtype:
        unsupported("weight", f"dtype {weight.dtype} differs from the input's {x.dtype}")
    CO, CI, KH, KW = weight.shape
    if KH != KW:
        unsupported("weight", f"non-square kernels are not supported, got {KH} x {KW}")
    groups = check_groups(groups, x.shape[1], CO)
    if CI * groups != x.shape[1]:
        unsupported("weight", f"has {CI} input channels per group but x has {x.shape[1]} for {groups} group(s)")
    if bias is not None:
        check_tensor("bias", bias, shape=(CO,), device=x.device)
        if bias.dtype != x.dtype:
            unsupported("bias", f"dtype {bias.dtype} differs from the input's {x.dtype}")
    stride = square_int("stride", stride, minimum=1)
    padding = square_int("padding", padding, minimum=0)
    dilation = square_int("dilation", dilation, minimum=1)
    check_int32_indexable("x", x)
    check_int32_indexable("weight", weight)
    alpha_t = check_alpha(alpha, x, "alpha", groups)
    scale, shift = check_bn(bn, CO, x)
    if bias is not None:
        bias = bias.contiguous()
    geo = conv_geometry(x, CO, KH, stride, padding, dilation, alpha_t is not None, groups)
    record = bool(pool_record) and wants_grad(x, weight, bias, alpha_t)
    opt = _Options(bool(relu), alpha_t is not None, scale is not None, bias is not None,
                   resolve_allow_tf32(allow_tf32), record)  # fmt: skip
    if alpha_t is None:
        alpha_t = torch.ones((), device=x.device, dtype=compute_dtype(x.dtype))
    return Conv2dMixPoolFunction.apply(x, weight, bias, alpha_t, scale, shift, geo, opt)
