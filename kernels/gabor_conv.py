"""Gabor convolution fused with ReLU, 2 x 2 mixed pooling and an inference BatchNorm: Triton kernels and autograd.

The filter bank is never written to memory in the forward pass: each program generates the (reduction x output
channel) tile of Gabor weights it needs from the four (out, in) parameter tensors, in registers, and feeds it to
``tl.dot``. For output channel ``o``, input channel ``i`` and kernel tap ``(r, c)`` with sampling position
``(x, y)`` (:func:`fusionkern.gabor.gabor_grid`)::

    x' = x cos(theta) + y sin(theta)          y' = -x sin(theta) + y cos(theta)
    E  = exp(-(x'^2 + y'^2) / (2 sigma^2))     u  = freq x' + psi
    W[o, i, r, c] = E cos(u)                                      (grid="centered")
    W[o, i, r, c] = exp(-(x'^2 + y'^2) / (2 (sigma + 1e-3)^2)) cos(u) / (2 pi sigma^2)   (grid="legacy")

Both grids of the reference are supported (the tap positions are read from a (2, k*k) buffer built by
``gabor_grid``, the function the reference's bank uses too, so they are bit-identical).

In training the forward also writes the pooling record of :mod:`.conv_mixpool` and the backward reads it
(``pool_record=False``: the backward kernel recomputes the conv tile instead).

Contents, in order: the device helper that builds a weight tile, the forward kernel, the backward kernel that
recomputes (``dL/dz`` plus the ``alpha`` partial sums), the bank and parameter-gradient kernels, the
launchers, the ``autograd.Function`` and the functional API :func:`gabor_conv2d`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusionkern.gabor import GRIDS, LEGACY_SIGMA_EPS, gabor_grid
from fusionkern.kernels._common import (
    CONV_TUNE_KEY,
    SUPPORTED_DTYPES,
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
    pow2_block,
    resolve_allow_tf32,
    square_int,
    tl_acc_dtype,
    unsupported,
    wants_grad,
)

_SIGMA_EPS = tl.constexpr(LEGACY_SIGMA_EPS)
_TWO_PI = tl.constexpr(2 * math.pi)

_AUTOTUNE_KEY = [*CONV_TUNE_KEY, "LEGACY"]


@triton.jit
def _gabor_tile(
    params_ptr,  # Gabor parameters of one group, in (4, G * CO, CI) contiguous: freq, theta, sigma, psi
    taps_ptr,  # tap positions, (2, K * K) contiguous: x then y
    ci,  # (BLOCK_R,) input channel of each reduction index
    tap,  # (BLOCK_R,) kernel tap (kh * K + kw) of each reduction index
    co,  # (BLOCK_CO,) output channels
    mask,  # (BLOCK_R, BLOCK_CO) valid (ci, co) pairs
    CI,  # input channels per group
    CO,  # output channels per group
    G,  # groups
    KK,  # K * K
    LEGACY: tl.constexpr,
):
    """The weight tile ``T[r, o] = W[o, ci(r), tap(r)]`` of the Gabor bank (module docstring), zero where masked."""
    off = co[None, :] * CI + ci[:, None]
    n = G * CO * CI
    f = tl.load(params_ptr + off, mask=mask, other=0.0)
    th = tl.load(params_ptr + n + off, mask=mask, other=0.0)
    s = tl.load(params_ptr + 2 * n + off, mask=mask, other=1.0)
    ps = tl.load(params_ptr + 3 * n + off, mask=mask, other=0.0)
    gx = tl.load(taps_ptr + tap)[:, None]
    gy = tl.load(taps_ptr + KK + tap)[:, None]
    cos_t = tl.cos(th)
    sin_t = tl.sin(th)
    xr = gx * cos_t + gy * sin_t
    yr = -gx * sin_t + gy * cos_t
    if LEGACY:
        se = s + _SIGMA_EPS
        w = tl.exp(-(xr * xr + yr * yr) / (2 * (se * se))) * tl.cos(f * xr + ps)
        w = w / (_TWO_PI * (s * s))
    else:
        w = tl.exp(-(xr * xr + yr * yr) / (2 * (s * s))) * tl.cos(f * xr + ps)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gabor_windows(
    x_ptr,  # input of one group, in (B, G * CI, H, W), any strides
    params_ptr,  # Gabor parameters of one group, in (4, G * CO, CI) contiguous, accumulation dtype
    taps_ptr,  # tap positions, (2, K * K) contiguous, accumulation dtype
    pid_p,  # program index along output pixels
    pid_co,  # program index along output channels
    B,  # batch size
    CI,  # input channels per group
    H,  # input height
    W,  # input width
    CO,  # output channels per group
    G,  # groups
    PH,  # output rows
    PW,  # output columns
    stride_xb,  # x stride along batch, in elements
    stride_xc,  # x stride along channel, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    dilation,  # dilation (square)
    K: tl.constexpr,  # kernel size (square)
    LEGACY: tl.constexpr,  # the authors' grid, sigma + 1e-3 and 1 / (2 pi sigma^2)
    POOL: tl.constexpr,  # 2 x 2 windows
    ACC_DTYPE: tl.constexpr,  # accumulation dtype
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_R: tl.constexpr,  # reduction chunk over (ci, kh, kw)
):
    """``z = conv2d(x, W(freq, theta, sigma, psi))`` at the four window positions of a program's tile (shared by
    the forward and the recomputing backward kernel), with the tile's coordinates. Per reduction chunk the Gabor
    weight tile is generated once, in registers, and shared by the four positions."""
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
    R = CI * K * K
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        ci = offs_r // (K * K)
        tap = offs_r % (K * K)
        dh = (tap // K) * dilation
        dw = (tap % K) * dilation
        col_off = ci * stride_xc + dh * stride_xh + dw * stride_xw
        w = _gabor_tile(params_ptr, taps_ptr, ci, tap, offs_co, r_mask[:, None] & co_mask[None, :], CI, CO, G,
                        K * K, LEGACY)  # fmt: skip
        w = w.to(x_ptr.dtype.element_ty)
        xt = _x_tile(x_ptr, m_off, col_off, m_ih, m_iw, dh, dw, H, W, m_valid, r_mask)
        acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)  # every window position in one dot
    acc00, acc01, acc10, acc11 = _split_windows(acc, POOL, BLOCK_P, BLOCK_CO)
    return acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gabor_conv_fwd_kernel(
    x_ptr,  # input, (B, G * CI, H, W), any strides
    params_ptr,  # Gabor parameters, (4, G * CO, CI) contiguous, accumulation dtype
    taps_ptr,  # tap positions, (2, K * K) contiguous, accumulation dtype
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
    G,  # groups: CI and CO are per group; program_id(2) is the group
    stride_xb,  # x stride along batch, in elements
    stride_xc,  # x stride along channel, in elements
    stride_xh,  # x stride along row, in elements
    stride_xw,  # x stride along column, in elements
    stride_ob,  # out stride along batch, in elements
    stride_oc,  # out stride along channel, in elements
    stride_oh,  # out stride along row, in elements
    stride_ow,  # out stride along column, in elements
    conv_stride,  # convolution stride (square)
    padding,  # zero padding (square)
    dilation,  # dilation (square)
    K: tl.constexpr,  # kernel size (square)
    LEGACY: tl.constexpr,  # the authors' grid, sigma + 1e-3 and 1 / (2 pi sigma^2)
    RELU: tl.constexpr,  # ReLU after the conv
    POOL: tl.constexpr,  # 2 x 2 / stride 2 mixed pooling, floor mode
    BN: tl.constexpr,  # per-channel affine after pooling
    RECORD: tl.constexpr,  # write the backward's record (training)
    ACC_DTYPE: tl.constexpr,  # tl.float32 (tl.float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_R: tl.constexpr,  # reduction chunk over (ci, kh, kw)
):
    """``y = bn(mixpool(relu(conv2d(x, W(freq, theta, sigma, psi)))))``, every stage after the conv optional.

    Implicit GEMM: rows are output pixels (pooled pixels when POOL, four conv positions each), columns output
    channels, the reduction runs over ``r = (ci, kh, kw)`` flattened (so a 3-channel first layer fills a 32-wide
    chunk instead of wasting 13/16 of a 16-channel block). Per reduction chunk the Gabor weight tile is generated
    once and shared by the four window positions. Pooling:
    ``y = alpha * max(z_00, z_01, z_10, z_11) + (1 - alpha) * (z_00 + z_01 + z_10 + z_11) / 4``.
    """
    # grid: (cdiv(B * PH * PW, BLOCK_P), cdiv(CO, BLOCK_CO), G); one program = BLOCK_P output pixels x BLOCK_CO
    # channels of one group
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(2)
    x_ptr += pid_g * CI * stride_xc  # the group's inputs and parameters
    params_ptr += pid_g * CO * CI
    acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow = _gabor_windows(
        x_ptr, params_ptr, taps_ptr, pid_p, tl.program_id(1), B, CI, H, W, CO, G, PH, PW, stride_xb, stride_xc,
        stride_xh, stride_xw, conv_stride, padding, dilation, K, LEGACY, POOL, ACC_DTYPE, DOT_PRECISION, BLOCK_P,
        BLOCK_CO, BLOCK_R,
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
def _gabor_conv_bwd_kernel(
    x_ptr,  # input, (B, G * CI, H, W), any strides
    params_ptr,  # Gabor parameters, (4, G * CO, CI) contiguous, accumulation dtype
    taps_ptr,  # tap positions, (2, K * K) contiguous, accumulation dtype
    alpha_ptr,  # mixing weight, (G,) contiguous (read when POOL)
    scale_ptr,  # folded BatchNorm scale, (G * CO,) contiguous (read when BN)
    grad_out_ptr,  # dL/dy, (B, G * CO, PH, PW), any strides
    grad_z_ptr,  # out: dL/dz (conv output, before ReLU), (B, G * CO, OH, OW)
    alpha_part_ptr,  # out: per-program partial sums of g * (max - avg), (cdiv(B * PH * PW, 16), G * CO), zeroed
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
    LEGACY: tl.constexpr,  # the authors' grid, sigma + 1e-3 and 1 / (2 pi sigma^2)
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
    conv output get no write (the launcher zeroes them). ``dL/dalpha = sum g * (max - avg)`` is reduced per program
    over its pixels into row ``pid_p`` of ``alpha_part``; the launcher sums the rows.
    """
    # grid: (cdiv(B * PH * PW, BLOCK_P), cdiv(CO, BLOCK_CO), G); one program = BLOCK_P output pixels x BLOCK_CO
    # channels of one group
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(2)
    x_ptr += pid_g * CI * stride_xc  # the group's inputs and parameters
    params_ptr += pid_g * CO * CI
    acc00, acc01, acc10, acc11, offs_co, co_mask, p_mask, b, ph, pw, oh, ow = _gabor_windows(
        x_ptr, params_ptr, taps_ptr, pid_p, tl.program_id(1), B, CI, H, W, CO, G, PH, PW, stride_xb, stride_xc,
        stride_xh, stride_xw, conv_stride, padding, dilation, K, LEGACY, POOL, ACC_DTYPE, DOT_PRECISION, BLOCK_P,
        BLOCK_CO, BLOCK_R,
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


@triton.jit
def _gabor_bank_kernel(
    params_ptr,  # Gabor parameters, (4, CO, CI) contiguous, accumulation dtype
    taps_ptr,  # tap positions, (2, K * K) contiguous, accumulation dtype
    w_ptr,  # out: the bank, (CO, CI, K, K) contiguous
    CI,  # input channels
    CO,  # output channels
    K: tl.constexpr,  # kernel size (square)
    LEGACY: tl.constexpr,  # the authors' grid, sigma + 1e-3 and 1 / (2 pi sigma^2)
    BLOCK_R: tl.constexpr,  # reduction indices (ci, kh, kw) per program
    BLOCK_CO: tl.constexpr,  # output channels per program
):
    """Materialise ``W[o, i, r, c]`` (module docstring); used by the backward pass for ``dL/dx`` and by export."""
    # grid: (cdiv(CI * K * K, BLOCK_R), cdiv(CO, BLOCK_CO)); one program = a BLOCK_R x BLOCK_CO tile of W^T
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    R = CI * K * K
    mask = (offs_r < R)[:, None] & (offs_co < CO)[None, :]
    w = _gabor_tile(params_ptr, taps_ptr, offs_r // (K * K), offs_r % (K * K), offs_co, mask, CI, CO, 1, K * K, LEGACY)
    tl.store(w_ptr + offs_co[None, :] * R + offs_r[:, None], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gabor_param_grad_kernel(
    grad_w_ptr,  # dL/dW, (CO, CI, K, K) contiguous, x's dtype (read as the accumulation dtype)
    params_ptr,  # Gabor parameters, (4, CO, CI) contiguous, accumulation dtype
    taps_ptr,  # tap positions, (2, K * K) contiguous, accumulation dtype
    grad_params_ptr,  # out: (4, CO, CI) contiguous, accumulation dtype: dL/dfreq, dL/dtheta, dL/dsigma, dL/dpsi
    N,  # CO * CI filter pairs
    K: tl.constexpr,  # kernel size (square)
    LEGACY: tl.constexpr,  # the authors' grid, sigma + 1e-3 and 1 / (2 pi sigma^2)
    BLOCK_N: tl.constexpr,  # filter pairs per program
    BLOCK_T: tl.constexpr,  # next power of two >= K * K
):
    """Chain rule through the bank: ``dL/dp[o, i] = sum_taps dL/dW[o, i, tap] * dW[o, i, tap]/dp``.

    With ``E``, ``u``, ``x'``, ``y'`` as in the module docstring and ``W = E cos(u)`` (centered):
    ``dW/dfreq = -E sin(u) x'``, ``dW/dpsi = -E sin(u)``, ``dW/dtheta = -E sin(u) freq y'`` (``dx'/dtheta = y'``;
    ``x'^2 + y'^2 = x^2 + y^2`` does not depend on theta), ``dW/dsigma = W (x'^2 + y'^2) / sigma^3``.
    Legacy (``W = E_eps cos(u) / (2 pi sigma^2)``, ``E_eps`` with ``sigma + eps``): the first three carry the factor
    ``1 / (2 pi sigma^2)`` and ``dW/dsigma = W ((x'^2 + y'^2) / (sigma + eps)^3 - 2 / sigma)``.
    """
    # grid: (cdiv(CO * CI, BLOCK_N),); one program = BLOCK_N filter pairs, all taps
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    taps = tl.arange(0, BLOCK_T)
    n_mask = offs_n < N
    t_mask = taps < K * K
    f = tl.load(params_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    th = tl.load(params_ptr + N + offs_n, mask=n_mask, other=0.0)[:, None]
    s = tl.load(params_ptr + 2 * N + offs_n, mask=n_mask, other=1.0)[:, None]
    ps = tl.load(params_ptr + 3 * N + offs_n, mask=n_mask, other=0.0)[:, None]
    gx = tl.load(taps_ptr + taps, mask=t_mask, other=0.0)[None, :]
    gy = tl.load(taps_ptr + K * K + taps, mask=t_mask, other=0.0)[None, :]
    mask = n_mask[:, None] & t_mask[None, :]
    gw = tl.load(grad_w_ptr + offs_n[:, None] * (K * K) + taps[None, :], mask=mask, other=0.0).to(f.dtype)

    cos_t = tl.cos(th)
    sin_t = tl.sin(th)
    xr = gx * cos_t + gy * sin_t
    yr = -gx * sin_t + gy * cos_t
    r2 = xr * xr + yr * yr
    u = f * xr + ps
    if LEGACY:
        se = s + _SIGMA_EPS
        e = tl.exp(-r2 / (2 * (se * se))) / (_TWO_PI * (s * s))
        d_sigma_log = r2 / (se * se * se) - 2 / s
    else:
        e = tl.exp(-r2 / (2 * (s * s)))
        d_sigma_log = r2 / (s * s * s)
    w = e * tl.cos(u)
    d_u = tl.where(mask, -gw * e * tl.sin(u), 0.0)  # dL/du per tap
    grad_f = tl.sum(d_u * xr, axis=1)
    grad_t = tl.sum(d_u * f * yr, axis=1)
    grad_s = tl.sum(tl.where(mask, gw * w * d_sigma_log, 0.0), axis=1)
    grad_p = tl.sum(d_u, axis=1)
    ty = grad_params_ptr.dtype.element_ty
    tl.store(grad_params_ptr + offs_n, grad_f.to(ty), mask=n_mask)
    tl.store(grad_params_ptr + N + offs_n, grad_t.to(ty), mask=n_mask)
    tl.store(grad_params_ptr + 2 * N + offs_n, grad_s.to(ty), mask=n_mask)
    tl.store(grad_params_ptr + 3 * N + offs_n, grad_p.to(ty), mask=n_mask)


_gabor_conv_fwd = conv_autotune(_gabor_conv_fwd_kernel, _AUTOTUNE_KEY)
_gabor_conv_bwd = conv_autotune(_gabor_conv_bwd_kernel, _AUTOTUNE_KEY, reset_to_zero=["alpha_part_ptr"])


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Static options of one call (everything but the tensors)."""

    kernel_size: int
    stride: int
    padding: int
    dilation: int
    relu: bool
    pool: bool
    bn: bool
    legacy: bool
    allow_tf32: bool
    record: bool = True  # a gradient is wanted and the forward writes the backward's record (else it recomputes)


@functools.lru_cache(maxsize=64)
def _tap_grid(kernel_size: int, grid: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(2, k*k) contiguous: the reference's sampling x then y of each tap ``kh * k + kw``.

    Built outside inference mode even when first asked for inside it: the cached tensor is reused by later
    training steps, which must be able to save it for backward.
    """
    with torch.inference_mode(False):
        x, y = gabor_grid(kernel_size, grid, device=device, dtype=dtype)
        return torch.stack([x.reshape(-1), y.reshape(-1)]).contiguous()


def _stack_params(freq, theta, sigma, psi, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([freq.detach(), theta.detach(), sigma.detach(), psi.detach()]).to(dtype).contiguous()


def _launch_forward(
    x: torch.Tensor, params: torch.Tensor, taps: torch.Tensor, alpha: torch.Tensor, scale, shift, geo: ConvGeometry,
    opt: _Options, record: bool = False,
):  # fmt: skip
    """``(out, code, gap)``: the layer's output and, with ``record``, the backward's record (else ``None``s). A
    channels-last ``x`` gets a channels-last output, so the next layer reads NHWC too."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(geo.out_shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    code = gap = None
    if record:
        code = torch.empty(geo.out_shape, device=x.device, dtype=torch.uint8)
        gap = torch.empty(geo.out_shape, device=x.device, dtype=compute_dtype(x.dtype))
    if out.numel() == 0:
        return out, code, gap
    check_int32_indexable("output", out)
    scale = alpha if scale is None else scale
    shift = alpha if shift is None else shift
    _gabor_conv_fwd[geo.grid](
        x, params, taps, alpha, scale, shift, out, out if code is None else code, out if gap is None else gap,
        geo.B, geo.CI, geo.H, geo.W, geo.CO, geo.PH, geo.PW, geo.m_bucket, geo.groups,
        *x.stride(), *out.stride(),
        geo.stride, geo.padding, geo.dilation,
        K=geo.K, LEGACY=opt.legacy, RELU=opt.relu, POOL=opt.pool, BN=opt.bn, RECORD=record,
        ACC_DTYPE=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, opt.allow_tf32),
    )  # fmt: skip
    return out, code, gap


def _launch_backward(
    x: torch.Tensor, params: torch.Tensor, taps: torch.Tensor, alpha: torch.Tensor, scale, grad_out: torch.Tensor,
    geo: ConvGeometry, opt: _Options,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dL/dz, dL/dalpha)``; ``dL/dz`` has the conv output's shape, ``dL/dalpha`` is ``(G,)``."""
    grad_z = geo.new_grad_z(x.device, x.dtype, channels_last=is_channels_last(x))
    cdtype = compute_dtype(x.dtype)
    G = geo.groups
    alpha_part = torch.zeros((geo.partial_rows if geo.pool else 1, G * geo.CO), device=x.device, dtype=cdtype)
    if grad_z.numel() == 0:
        return grad_z, alpha_part.view(-1, G, geo.CO).sum((0, 2))
    check_int32_indexable("grad_output", grad_out)
    check_int32_indexable("grad_z", grad_z)
    scale = alpha if scale is None else scale
    _gabor_conv_bwd[geo.grid](
        x, params, taps, alpha, scale, grad_out, grad_z, alpha_part,
        geo.B, geo.CI, geo.H, geo.W, geo.CO, geo.PH, geo.PW, geo.m_bucket, G,
        *x.stride(), *grad_out.stride(), *grad_z.stride(),
        geo.stride, geo.padding, geo.dilation,
        K=geo.K, LEGACY=opt.legacy, RELU=opt.relu, POOL=opt.pool, BN=opt.bn,
        ACC_DTYPE=tl_acc_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype, opt.allow_tf32),
    )  # fmt: skip
    return grad_z, alpha_part.view(-1, G, geo.CO).sum((0, 2))


def _launch_bank(params: torch.Tensor, taps: torch.Tensor, kernel_size: int, legacy: bool, dtype) -> torch.Tensor:
    _, CO, CI = params.shape
    w = torch.empty((CO, CI, kernel_size, kernel_size), device=params.device, dtype=dtype)
    if w.numel() == 0:
        return w
    R = CI * kernel_size**2
    block_r, block_co = pow2_block(R, 16, 64), pow2_block(CO, 16, 32)
    # grid: one program per BLOCK_R x BLOCK_CO tile of the (CI*K*K, CO) transposed bank
    _gabor_bank_kernel[(triton.cdiv(R, block_r), triton.cdiv(CO, block_co))](
        params, taps, w, CI, CO, K=kernel_size, LEGACY=legacy, BLOCK_R=block_r, BLOCK_CO=block_co
    )
    return w


def _launch_param_grad(
    grad_w: torch.Tensor, params: torch.Tensor, taps: torch.Tensor, kernel_size: int, legacy: bool
) -> torch.Tensor:
    """(4, CO, CI): the gradients of freq, theta, sigma, psi."""
    grad_params = torch.empty_like(params)
    n = params.shape[1] * params.shape[2]
    if n == 0:
        return grad_params
    block_n = pow2_block(n, 16, 128)
    # grid: one program per BLOCK_N (out, in) filter pairs
    _gabor_param_grad_kernel[(triton.cdiv(n, block_n),)](
        grad_w.contiguous(), params, taps, grad_params, n,
        K=kernel_size, LEGACY=legacy, BLOCK_N=block_n, BLOCK_T=triton.next_power_of_2(kernel_size**2),
    )  # fmt: skip
    return grad_params


# --------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------


class GaborConv2dFunction(torch.autograd.Function):
    """Fused Gabor conv (+ ReLU, + mixed pooling, + folded BN) with gradients for x, the four parameters, alpha.

    Backward: with pooling or BN, ``dL/dz`` and the ``alpha`` partial sums come from the record the forward wrote
    (:func:`~fusionkern.kernels._common.pool_record_backward`, an elementwise pass; no pre-pool activation is saved);
    with ``pool_record=False`` the backward kernel recomputes the conv tile instead. ``dL/dx`` and ``dL/dW`` come
    from :func:`conv_backward` (cuDNN on a GPU, at the precision the forward resolved) on ``dL/dz`` and the
    materialised bank; ``dL/dW`` is pulled back to the four parameters by
    :func:`_gabor_param_grad_kernel`. Without pooling or BN, ``dL/dz`` is read off the saved output instead.
    """

    @staticmethod
    def forward(ctx, x, freq, theta, sigma, psi, alpha, scale, shift, geo: ConvGeometry, opt: _Options):
        cdtype = compute_dtype(x.dtype)
        params = _stack_params(freq, theta, sigma, psi, cdtype)
        taps = _tap_grid(opt.kernel_size, "legacy" if opt.legacy else "centered", x.device, cdtype)
        alpha_c = group_alpha(alpha, geo.groups, cdtype)
        record = opt.record and (opt.pool or opt.bn)  # opt.record: a gradient is wanted (decided by the caller)
        out, code, gap = _launch_forward(x, params, taps, alpha_c, scale, shift, geo, opt, record)
        saved_out = out if (opt.relu and not opt.pool and not opt.bn) else None
        ctx.save_for_backward(x, params, taps, alpha_c, scale, saved_out, code, gap)
        ctx.geo, ctx.opt = geo, opt
        ctx.param_dtypes = (freq.dtype, theta.dtype, sigma.dtype, psi.dtype)
        ctx.alpha_like = (alpha.shape, alpha.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, params, taps, alpha_c, scale, saved_out, code, gap = ctx.saved_tensors
        geo, opt = ctx.geo, ctx.opt
        need_x, *need_params, need_alpha = ctx.needs_input_grad[:6]
        grads: list = [None] * 10
        if not (need_x or any(need_params) or need_alpha):
            return tuple(grads)

        if code is not None:
            grad_z, grad_alpha, _ = pool_record_backward(code, gap, grad_out, alpha_c, scale, geo, opt.relu, False)
        elif opt.pool or opt.bn:
            grad_z, grad_alpha = _launch_backward(x, params, taps, alpha_c, scale, grad_out, geo, opt)
        else:
            grad_z = torch.where(saved_out > 0, grad_out, 0) if opt.relu else grad_out
            grad_alpha = None
        if need_alpha and grad_alpha is not None:
            grads[5] = alpha_grad(grad_alpha, ctx.alpha_like)

        if need_x or any(need_params):
            weight = _launch_bank(params, taps, opt.kernel_size, opt.legacy, x.dtype)
            grad_x, grad_w = conv_backward(
                grad_z.to(x.dtype), x, weight, geo, need_x, any(need_params), opt.allow_tf32
            )
            grads[0] = grad_x
            if any(need_params):
                grad_params = _launch_param_grad(grad_w, params, taps, opt.kernel_size, opt.legacy)
                for k, (need, dtype) in enumerate(zip(need_params, ctx.param_dtypes)):
                    if need:
                        grads[1 + k] = grad_params[k].to(dtype)
        return tuple(grads)


# --------------------------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------------------------


def _check_params(freq, theta, sigma, psi, device) -> tuple[int, int]:
    check_tensor("freq", freq, ndim=2, device=device)
    shape = tuple(freq.shape)
    for name, t in (("theta", theta), ("sigma", sigma), ("psi", psi)):
        check_tensor(name, t, shape=shape, device=device)
    return shape


@follows_autocast("x")
def gabor_conv2d(
    x: torch.Tensor,  # (B, C_in, H, W)
    freq: torch.Tensor,  # (C_out, C_in / groups)
    theta: torch.Tensor,  # (C_out, C_in / groups)
    sigma: torch.Tensor,  # (C_out, C_in / groups)
    psi: torch.Tensor,  # (C_out, C_in / groups)
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    *,
    relu: bool = False,
    pool_alpha: torch.Tensor | float | None = None,
    grid: str = "centered",
    bn: tuple[torch.Tensor, torch.Tensor] | None = None,
    groups: int = 1,
    allow_tf32: bool | None = None,
    pool_record: bool = True,
) -> torch.Tensor:
    """Gabor convolution with the bank generated in-kernel, optionally fused with ReLU, mixed pooling and BN.

    Equals ``MixPool2d(relu(F.conv2d(x, gabor_bank(freq, theta, sigma, psi, k, grid), None, stride, padding,
    dilation, groups))) * scale + shift`` of the reference, each stage present only when asked for. Differentiable
    in ``x``, the four parameters and ``pool_alpha`` (when it is a tensor).

    Args:
        kernel_size: square kernel size ``k``.
        stride, padding, dilation: ints (or equal pairs).
        relu: apply ReLU to the conv output.
        pool_alpha: ``None`` for no pooling; a 0-d tensor (trainable) or a float (constant; ``1.0`` is max pooling)
            for 2 x 2 / stride 2 mixed pooling in floor mode (odd sizes drop the last row/column); with groups, a
            ``(groups,)`` tensor pools each group with its own alpha.
        grid: ``"centered"`` or ``"legacy"`` (the authors' grid and normalisation), as in ``gabor_bank``.
        bn: a folded inference BatchNorm ``(scale, shift)`` applied after the pooling (``fold_bn``); constants.
        groups: independent Gabor convolutions side by side, as in ``F.conv2d`` (the parameters are
            ``(C_out, C_in / groups)``); all groups run in one launch (a FusionNet stage's five branches).
        allow_tf32: let float32 products (the forward kernel's dots and the backward) use TF32 tensor cores.
            ``None`` (default) does what PyTorch's own fp32 convolutions do (TF32 unless
            ``torch.backends.cudnn.conv.fp32_precision`` / ``allow_tf32`` say otherwise); ``False`` is IEEE fp32.
        pool_record: when a gradient is needed, the forward writes a record for the backward (one byte per pooled
            value and ``max - avg``) so that the backward need not recompute the convolution; ``False`` saves that
            memory and recomputes.

    Returns:
        ``(B, C_out, OH // 2, OW // 2)`` with pooling, else ``(B, C_out, OH, OW)``, in ``x.dtype``.

    Dtypes: ``x`` float32, bfloat16 or float16 (float64 for verification); accumulation in float32 (float64). The
    parameters may have any of these dtypes; the bank is generated in the accumulation dtype and rounded to
    ``x.dtype`` for the tensor-core dot.
    """
    check_tensor("x", x, ndim=4)
    check_device("x", x)
    CO, CI = _check_params(freq, theta, sigma, psi, x.device)
    groups = check_groups(groups, x.shape[1], CO)
    if x.shape[1] != CI * groups:
        unsupported("x", f"has {x.shape[1]} channels but the Gabor parameters are ({CO}, {CI}) (out, in per group) "
                         f"for {groups} group(s)")  # fmt: skip
    if grid not in GRIDS:
        unsupported("grid", f"must be one of {GRIDS}, got {grid!r}")
    k = square_int("kernel_size", kernel_size, minimum=1)
    stride = square_int("stride", stride, minimum=1)
    padding = square_int("padding", padding, minimum=0)
    dilation = square_int("dilation", dilation, minimum=1)
    check_int32_indexable("x", x)
    alpha = check_alpha(pool_alpha, x, "pool_alpha", groups)
    scale, shift = check_bn(bn, CO, x)
    geo = conv_geometry(x, CO, k, stride, padding, dilation, alpha is not None, groups)
    record = bool(pool_record) and wants_grad(x, freq, theta, sigma, psi, alpha)
    opt = _Options(k, stride, padding, dilation, bool(relu), alpha is not None, scale is not None, grid == "legacy",
                   resolve_allow_tf32(allow_tf32), record)  # fmt: skip
    if alpha is None:
        alpha = torch.ones((), device=x.device, dtype=compute_dtype(x.dtype))
    return GaborConv2dFunction.apply(x, freq, theta, sigma, psi, alpha, scale, shift, geo, opt)


def gabor_weight(
    freq: torch.Tensor,
    theta: torch.Tensor,
    sigma: torch.Tensor,
    psi: torch.Tensor,
    kernel_size: int,
    grid: str = "centered",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The bank ``(C_out, C_in, k, k)`` generated by the kernels' own Gabor code (no gradient).

    Equals ``gabor_bank`` of the reference; useful to check the in-kernel generator and to export a fixed bank.
    """
    check_tensor("freq", freq, ndim=2)
    check_device("freq", freq)
    _check_params(freq, theta, sigma, psi, freq.device)
    if grid not in GRIDS:
        unsupported("grid", f"must be one of {GRIDS}, got {grid!r}")
    k = square_int("kernel_size", kernel_size, minimum=1)
    dtype = dtype or freq.dtype
    if dtype not in SUPPORTED_DTYPES:
        unsupported("dtype", f"{dtype} is not supported")
    cdtype = compute_dtype(dtype) if freq.dtype != torch.float64 else torch.float64
    params = _stack_params(freq, theta, sigma, psi, cdtype)
    return _launch_bank(params, _tap_grid(k, grid, freq.device, cdtype), k, grid == "legacy", dtype)
