"""Channel attention over the fused map (``ChannelAttention``) as two Triton passes forward and two backward.

    A = sigmoid(MLP(avgpool F) + MLP(maxpool F)),   MLP(v) = W2 relu(W1 v),   out = F + F * A = F * (1 + A)

with ``F`` of shape (B, C, H, W) (C = 2560 in the paper), ``W1`` (C_h, C) and ``W2`` (C, C_h), both bias-free.

Forward:

* ``_channel_pool_kernel``: one read of ``F`` gives both descriptors, ``avg[b, c]`` (fp32 sum / HW) and
  ``max[b, c]`` with its flat position ``argmax[b, c] = h * W + w`` (the first maximum, as
  ``F.adaptive_max_pool2d``; a NaN wins over every number and the last NaN is kept, as torch's loop does).
* The shared MLP on the stacked ``[avg; max]`` (2B, C) and the sigmoid: two small matmuls in torch, in fp32.
* ``_channel_scale_kernel``: ``out = F * (1 + A)``, one elementwise pass.

Backward (``ChannelAttentionFunction``), with ``g`` the gradient of ``out``:

* ``_channel_scale_grad_kernel``: ``gA[b, c] = sum_{h,w} g * F``, one read of ``g`` and ``F``.
* The MLP backward in torch (fp32): ``gz = gA * A * (1 - A)``; for each descriptor ``v`` in (avg, max) with
  ``h_v = relu(W1 v)``: ``grad_W2 += gz h_v^T``, ``gh_v = (W2^T gz) * [h_v > 0]``, ``grad_W1 += gh_v v^T``,
  ``g_v = W1^T gh_v``.
* ``_channel_attention_grad_input_kernel``: ``grad_F = g * (1 + A) + g_avg / (H W) + [hw == argmax] * g_max``, one
  elementwise pass (the max gradient goes to the recorded argmax only, as torch's ``adaptive_max_pool2d``).

Tile sizes are chosen by a heuristic in :func:`_tiles`; they have not been tuned per GPU.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    SUPPORTED_DTYPES, check_device, check_int32_indexable, compute_dtype, follows_autocast, is_channels_last,
    unsupported,
)

__all__ = [
    "ChannelAttentionFunction",
    "channel_attention",
    "channel_attention_grad_input",
    "channel_pool",
    "channel_scale",
    "channel_scale_grad",
]


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _channel_pool_kernel(
    f_ptr,  # fused map F, (B, C, H, W), any strides
    avg_ptr,  # output: mean over H x W, (B, C) fp32 (fp64 for fp64 F), contiguous
    max_ptr,  # output: max over H x W, (B, C) same dtype as avg, contiguous
    idx_ptr,  # output: flat position h * W + w of the max, (B, C) int32, contiguous
    C,  # channels, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    stride_fb, stride_fc, stride_fh, stride_fw,  # strides of F, (4,)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # pixels per reduction step
):
    """Average and max pooling over H x W in one read of F.

    Forward: ``avg[b, c] = (1 / HW) sum_{h,w} F[b, c, h, w]``, ``max[b, c] = max_{h,w} F[b, c, h, w]``,
    ``idx[b, c]`` = the first flat position holding the max (the last NaN if any, as torch's
    ``adaptive_max_pool2d``).

    Gradient: ``grad_F[b, c, h, w] = g_avg[b, c] / HW + [h * W + w == idx[b, c]] * g_max[b, c]`` (applied by
    ``_channel_attention_grad_input_kernel``).
    """
    # grid: (B, cdiv(C, BLOCK_C)); one program reduces BLOCK_C channels of one sample over the whole map.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    HW = H * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    row = pid_b.to(tl.int64) * stride_fb + offs_c.to(tl.int64) * stride_fc  # (BLOCK_C,)
    acc_dtype = avg_ptr.dtype.element_ty

    total = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    run_max = tl.full((BLOCK_C,), float("-inf"), dtype=acc_dtype)
    run_idx = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        pix = (hw // W) * stride_fh + (hw % W) * stride_fw  # (BLOCK_HW,)
        mask = c_mask[:, None] & hw_mask[None, :]
        v = tl.load(f_ptr + row[:, None] + pix[None, :], mask=mask, other=0.0).to(acc_dtype)  # (BLOCK_C, BLOCK_HW)
        total += tl.sum(v, axis=1)
        is_nan = v != v
        vm = tl.where(mask & ~is_nan, v, float("-inf"))
        tile_max = tl.max(vm, axis=1)
        tile_arg = tl.min(tl.where(mask & (vm == tile_max[:, None]), hw[None, :], 2147483647), axis=1)
        nan_idx = tl.max(tl.where(mask & is_nan, hw[None, :], -1), axis=1)
        has_nan = nan_idx >= 0
        better = tile_max > run_max  # strict: an equal value later in the map never replaces the first
        run_idx = tl.where(has_nan, nan_idx, tl.where(better, tile_arg, run_idx))
        run_max = tl.where(has_nan, float("nan"), tl.where(better, tile_max, run_max))

    out = pid_b * C + offs_c
    tl.store(avg_ptr + out, total / HW, mask=c_mask)
    tl.store(max_ptr + out, run_max, mask=c_mask)
    tl.store(idx_ptr + out, run_idx, mask=c_mask)


@triton.jit
def _channel_pixel_tile(
    pid_c,  # program index along channels
    pid_hw,  # program index along pixels
    C,  # channels
    H,  # height
    W,  # width
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # pixels per program
):
    """A program's BLOCK_C channels and BLOCK_HW pixels of one sample: flat pixel index ``hw`` and ``(h, w)``, with
    the validity masks."""
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = offs_c < C
    mask = c_mask[:, None] & (hw < H * W)[None, :]
    return offs_c, c_mask, mask, hw, hw // W, hw % W


@triton.jit
def _channel_scale_kernel(
    f_ptr,  # fused map F, (B, C, H, W), any strides
    a_ptr,  # attention A, (B, C) fp32 (fp64 for fp64 F), contiguous
    y_ptr,  # output F * (1 + A), (B, C, H, W), any strides
    C,  # channels, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    stride_fb, stride_fc, stride_fh, stride_fw,  # strides of F, (4,)
    stride_yb, stride_yc, stride_yh, stride_yw,  # strides of y, (4,)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # pixels per program
):
    """``y[b, c, h, w] = F[b, c, h, w] * (1 + A[b, c])`` (the reference's ``F + F * A``), computed in fp32.

    Gradients: ``grad_F = g * (1 + A)`` (part of ``_channel_attention_grad_input_kernel``) and
    ``grad_A[b, c] = sum_{h,w} g * F`` (``_channel_scale_grad_kernel``).
    """
    # grid: (B, cdiv(C, BLOCK_C), cdiv(H * W, BLOCK_HW)); one program: a BLOCK_C x BLOCK_HW tile of one sample
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c, c_mask, mask, hw, h, w = _channel_pixel_tile(pid_c, tl.program_id(2), C, H, W, BLOCK_C, BLOCK_HW)
    acc_dtype = a_ptr.dtype.element_ty
    a = tl.load(a_ptr + pid_b * C + offs_c, mask=c_mask, other=0.0)  # (BLOCK_C,)
    f_off = pid_b.to(tl.int64) * stride_fb + offs_c[:, None].to(tl.int64) * stride_fc
    f_off += (h * stride_fh + w * stride_fw)[None, :]
    v = tl.load(f_ptr + f_off, mask=mask, other=0.0).to(acc_dtype)
    y = v * (1.0 + a[:, None])
    y_off = pid_b.to(tl.int64) * stride_yb + offs_c[:, None].to(tl.int64) * stride_yc
    y_off += (h * stride_yh + w * stride_yw)[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_scale_grad_kernel(
    g_ptr,  # gradient of the output, (B, C, H, W), any strides
    f_ptr,  # fused map F, (B, C, H, W), any strides
    ga_ptr,  # output: gradient of A, (B, C) fp32 (fp64 for fp64 F), contiguous
    C,  # channels, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    stride_gb, stride_gc, stride_gh, stride_gw,  # strides of g, (4,)
    stride_fb, stride_fc, stride_fh, stride_fw,  # strides of F, (4,)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # pixels per reduction step
):
    """Gradient of ``y = F * (1 + A)`` with respect to ``A``: ``grad_A[b, c] = sum_{h,w} g[b, c, h, w] F[b, c, h, w]``.

    (The matching forward is ``_channel_scale_kernel``.)
    """
    # grid: (B, cdiv(C, BLOCK_C)); one program reduces BLOCK_C channels of one sample over the whole map.
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    HW = H * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    g_row = pid_b.to(tl.int64) * stride_gb + offs_c.to(tl.int64) * stride_gc
    f_row = pid_b.to(tl.int64) * stride_fb + offs_c.to(tl.int64) * stride_fc
    acc_dtype = ga_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        h = hw // W
        w = hw % W
        mask = c_mask[:, None] & (hw < HW)[None, :]
        gv = tl.load(g_ptr + g_row[:, None] + (h * stride_gh + w * stride_gw)[None, :], mask=mask, other=0.0)
        fv = tl.load(f_ptr + f_row[:, None] + (h * stride_fh + w * stride_fw)[None, :], mask=mask, other=0.0)
        total += tl.sum(gv.to(acc_dtype) * fv.to(acc_dtype), axis=1)
    tl.store(ga_ptr + pid_b * C + offs_c, total, mask=c_mask)


@triton.jit
def _channel_attention_grad_input_kernel(
    g_ptr,  # gradient of the output, (B, C, H, W), any strides
    a_ptr,  # attention A, (B, C) fp32 (fp64 for fp64 F), contiguous
    gavg_ptr,  # gradient of the average descriptor, (B, C) same dtype as A, contiguous
    gmax_ptr,  # gradient of the max descriptor, (B, C) same dtype as A, contiguous
    idx_ptr,  # flat argmax h * W + w per (b, c), (B, C) int32, contiguous
    gf_ptr,  # output: gradient of F, (B, C, H, W), any strides
    C,  # channels, scalar
    H,  # map height, scalar
    W,  # map width, scalar
    stride_gb, stride_gc, stride_gh, stride_gw,  # strides of g, (4,)
    stride_ob, stride_oc, stride_oh, stride_ow,  # strides of gf, (4,)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # pixels per program
):
    """Gradient of ``out = F * (1 + A(F))`` with respect to ``F`` once ``A``'s own gradient has been taken back
    through the MLP to the two pooled descriptors:

        grad_F[b, c, h, w] = g[b, c, h, w] * (1 + A[b, c]) + g_avg[b, c] / HW + [h * W + w == idx[b, c]] * g_max[b, c]
    """
    # grid: (B, cdiv(C, BLOCK_C), cdiv(H * W, BLOCK_HW)); one program: a BLOCK_C x BLOCK_HW tile of grad_F
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c, c_mask, mask, hw, h, w = _channel_pixel_tile(pid_c, tl.program_id(2), C, H, W, BLOCK_C, BLOCK_HW)
    acc_dtype = a_ptr.dtype.element_ty
    vec = pid_b * C + offs_c
    a = tl.load(a_ptr + vec, mask=c_mask, other=0.0)
    g_avg = tl.load(gavg_ptr + vec, mask=c_mask, other=0.0)
    g_max = tl.load(gmax_ptr + vec, mask=c_mask, other=0.0)
    idx = tl.load(idx_ptr + vec, mask=c_mask, other=-1)
    g_off = pid_b.to(tl.int64) * stride_gb + offs_c[:, None].to(tl.int64) * stride_gc
    g_off += (h * stride_gh + w * stride_gw)[None, :]
    gv = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(acc_dtype)
    out = gv * (1.0 + a[:, None]) + (g_avg / (H * W))[:, None]
    out += tl.where(hw[None, :] == idx[:, None], g_max[:, None], 0.0)
    o_off = pid_b.to(tl.int64) * stride_ob + offs_c[:, None].to(tl.int64) * stride_oc
    o_off += (h * stride_oh + w * stride_ow)[None, :]
    tl.store(gf_ptr + o_off, out.to(gf_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------- launchers


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _tiles(c: int, hw: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps): up to 256 pixels per row, about 4096 elements per tile."""
    block_hw = min(256, _next_pow2(hw))
    block_c = min(_next_pow2(c), max(1, 4096 // block_hw))
    num_warps = 8 if block_c * block_hw >= 4096 else 4
    return block_c, block_hw, num_warps


def _like(f: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor shaped like ``f`` in its memory format (NCHW or channels-last), in ``dtype`` or f's."""
    fmt = torch.channels_last if is_channels_last(f) else torch.contiguous_format
    return torch.empty(f.shape, device=f.device, dtype=dtype or f.dtype, memory_format=fmt)


def channel_pool(
    f: torch.Tensor,  # (B, C, H, W)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # avg (B, C), max (B, C) in fp32 / fp64, argmax (B, C) int32
    """Launch ``_channel_pool_kernel``: both pooled descriptors and the argmax, one read of ``f``."""
    bsz, c, h, w = f.shape
    acc = compute_dtype(f.dtype)
    avg = torch.empty((bsz, c), device=f.device, dtype=acc)
    mx = torch.empty((bsz, c), device=f.device, dtype=acc)
    idx = torch.empty((bsz, c), device=f.device, dtype=torch.int32)
    if avg.numel() == 0:
        return avg, mx, idx
    block_c, block_hw, num_warps = _tiles(c, h * w)
    grid = (bsz, triton.cdiv(c, block_c))
    _channel_pool_kernel[grid](
        f, avg, mx, idx, c, h, w, *f.stride(), BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps
    )
    return avg, mx, idx


def channel_scale(
    f: torch.Tensor,  # (B, C, H, W)
    a: torch.Tensor,  # (B, C) fp32 / fp64, contiguous
) -> torch.Tensor:  # (B, C, H, W) in f's dtype and memory format
    """Launch ``_channel_scale_kernel``: ``f * (1 + a)``."""
    bsz, c, h, w = f.shape
    y = _like(f)
    if y.numel() == 0:
        return y
    block_c, block_hw, num_warps = _tiles(c, h * w)
    grid = (bsz, triton.cdiv(c, block_c), triton.cdiv(h * w, block_hw))
    _channel_scale_kernel[grid](
        f, a, y, c, h, w, *f.stride(), *y.stride(), BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps
    )
    return y


def channel_scale_grad(
    g: torch.Tensor,  # (B, C, H, W)
    f: torch.Tensor,  # (B, C, H, W)
) -> torch.Tensor:  # (B, C) fp32 / fp64
    """Launch ``_channel_scale_grad_kernel``: ``sum_{h,w} g * f``."""
    bsz, c, h, w = f.shape
    ga = torch.empty((bsz, c), device=f.device, dtype=compute_dtype(f.dtype))
    if ga.numel() == 0:
        return ga
    block_c, block_hw, num_warps = _tiles(c, h * w)
    grid = (bsz, triton.cdiv(c, block_c))
    _channel_scale_grad_kernel[grid](
        g, f, ga, c, h, w, *g.stride(), *f.stride(), BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps
    )
    return ga


def channel_attention_grad_input(
    g: torch.Tensor,  # (B, C, H, W)
    a: torch.Tensor,  # (B, C) fp32 / fp64, contiguous
    g_avg: torch.Tensor,  # (B, C) a's dtype, contiguous
    g_max: torch.Tensor,  # (B, C) a's dtype, contiguous
    idx: torch.Tensor,  # (B, C) int32, contiguous
    out_dtype: torch.dtype,
) -> torch.Tensor:  # (B, C, H, W) in out_dtype, g's memory format
    """Launch ``_channel_attention_grad_input_kernel``: ``g (1 + a) + g_avg / HW + onehot(idx) g_max``."""
    bsz, c, h, w = g.shape
    gf = _like(g, out_dtype)
    if gf.numel() == 0:
        return gf
    block_c, block_hw, num_warps = _tiles(c, h * w)
    grid = (bsz, triton.cdiv(c, block_c), triton.cdiv(h * w, block_hw))
    _channel_attention_grad_input_kernel[grid](
        g, a, g_avg, g_max, idx, gf, c, h, w, *g.stride(), *gf.stride(),
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    return gf


# ------------------------------------------------------------------------------------------------------- autograd


def _mlp(pooled: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """The shared MLP on stacked descriptors (2B, C): hidden (2B, C_h) after ReLU, logits (2B, C)."""
    hidden = torch.relu(pooled @ w1.t())
    return hidden, hidden @ w2.t()


class ChannelAttentionFunction(torch.autograd.Function):
    """``F * (1 + sigmoid(MLP(avgpool F) + MLP(maxpool F)))`` with gradients for ``F``, ``W1`` (C_h, C) and
    ``W2`` (C, C_h). First-order only."""

    @staticmethod
    def forward(ctx, f, w1, w2):
        acc = compute_dtype(f.dtype)
        bsz = f.shape[0]
        avg, mx, idx = channel_pool(f)
        pooled = torch.cat([avg, mx])  # (2B, C)
        w1a, w2a = w1.to(acc), w2.to(acc)
        hidden, logits = _mlp(pooled, w1a, w2a)
        a = torch.sigmoid(logits[:bsz] + logits[bsz:]).contiguous()  # (B, C)
        y = channel_scale(f, a)
        ctx.save_for_backward(f, w1a, w2a, idx, pooled, hidden, a)
        ctx.dtypes = (f.dtype, w1.dtype, w2.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        f, w1a, w2a, idx, pooled, hidden, a = ctx.saved_tensors
        f_dtype, w1_dtype, w2_dtype = ctx.dtypes
        bsz = f.shape[0]
        ga = channel_scale_grad(g, f)  # (B, C)
        gz = ga * a * (1 - a)
        gz2 = torch.cat([gz, gz])  # (2B, C): both descriptors share the logits' gradient
        grad_w2 = (gz2.t() @ hidden).to(w2_dtype) if ctx.needs_input_grad[2] else None
        gh = (gz2 @ w2a) * (hidden > 0)  # (2B, C_h)
        grad_w1 = (gh.t() @ pooled).to(w1_dtype) if ctx.needs_input_grad[1] else None
        grad_f = None
        if ctx.needs_input_grad[0]:
            gp = gh @ w1a  # (2B, C)
            g_avg, g_max = gp[:bsz].contiguous(), gp[bsz:].contiguous()
            grad_f = channel_attention_grad_input(g, a, g_avg, g_max, idx, f_dtype)
        return grad_f, grad_w1, grad_w2


# ------------------------------------------------------------------------------------------------------- public API




def _as_matrix(w: torch.Tensor, name: str, rows: int | None, cols: int | None) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        unsupported(name, f"expected a tensor, got {type(w).__name__}")
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w.reshape(w.shape[0], w.shape[1])
    if w.dim() != 2:
        unsupported(name, f"expected a 2-D matrix or a 1x1 conv weight, got shape {tuple(w.shape)}")
    if (rows is not None and w.shape[0] != rows) or (cols is not None and w.shape[1] != cols):
        want = f"({rows if rows is not None else '?'}, {cols if cols is not None else '?'})"
        unsupported(name, f"expected shape {want}, got {tuple(w.shape)}")
    return w


@follows_autocast("f", "w1", "w2")
def channel_attention(f: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``F + F * sigmoid(W2 relu(W1 avgpool F) + W2 relu(W1 maxpool F))`` on the Triton kernels.

    Args:
        f: the fused map, (B, C, H, W), fp32 / bf16 / fp16 (fp64 is accepted too, for gradient checks), with
            H * W > 0.
        w1: the MLP's first layer, (C_h, C) or a (C_h, C, 1, 1) 1x1-conv weight; f's dtype and device.
        w2: the MLP's second layer, (C, C_h) or (C, C_h, 1, 1); f's dtype and device.

    Returns:
        (B, C, H, W) in f's dtype and memory format. Differentiable in ``f``, ``w1`` and ``w2``.

    Raises:
        UnsupportedOptionError (a ValueError): naming the offending argument, for any shape, dtype or device the
            kernels do not support.
    """
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        unsupported("f", f"expected a 4-D (B, C, H, W) tensor, got {getattr(f, 'shape', type(f).__name__)}")
    if f.dtype not in SUPPORTED_DTYPES:
        unsupported("f", f"dtype {f.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if f.shape[2] * f.shape[3] == 0:
        unsupported("f", f"the map must have at least one pixel, got H x W = {f.shape[2]} x {f.shape[3]}")
    check_device("f", f)
    check_int32_indexable("f", f)
    c = f.shape[1]
    w1m = _as_matrix(w1, "w1", None, c)
    w2m = _as_matrix(w2, "w2", c, w1m.shape[0])
    for name, w in (("w1", w1m), ("w2", w2m)):
        if w.dtype != f.dtype:
            unsupported(name, f"dtype {w.dtype} differs from f's {f.dtype}")
        if w.device != f.device:
            unsupported(name, f"on {w.device}, f is on {f.device}")
    return ChannelAttentionFunction.apply(f, w1m, w2m)
