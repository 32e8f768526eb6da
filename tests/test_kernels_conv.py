"""Kernels 1 and 2 of the FusionNet branch against the plain-PyTorch reference, forward and backward.

``gabor_conv2d`` (Gabor bank generated in-kernel) and ``conv2d_mixpool`` (conv + bias), each fused with ReLU,
2 x 2 mixed pooling and a folded inference BatchNorm. Every test builds the reference from
``fusionkern.models.layers`` with the same parameter values, compares the forward, runs both backward passes with
one shared ``grad_output`` and compares every gradient, reporting the first mismatching index.

On a CPU machine the kernels run on the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) with tiny
shapes; with ``TRITON_INTERPRET=0`` and a GPU the same tests run compiled on CUDA, and :class:`TestGPUSweep` adds
the paper and native layer shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionkern.kernels import UnsupportedOptionError, conv2d_mixpool, fold_bn, gabor_conv2d, gabor_weight
from fusionkern.kernels import _common, conv_mixpool, gabor_conv
from fusionkern.kernels._common import (
    KernelSpec, compile_sm90_isolated, cudnn_fp32_precision, interpreting, is_channels_last,
)
from fusionkern.models import fused
from fusionkern.models.fused import stage_forward
from fusionkern.models.layers import GaborConv2d, MixPool2d, gabor_bank
from fusionkern.models.networks import ConvStage

DEVICE = torch.device("cpu" if interpreting() else "cuda")
needs_device = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="TRITON_INTERPRET=0 and no CUDA device: the kernels have nowhere to run",
)
pytestmark = needs_device


# --------------------------------------------------------------------------------------------------------------
# Tolerances, cases, comparison
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tol:
    dtype: torch.dtype
    allow_tf32: bool
    atol: float
    rtol: float
    scaled: bool  # 16-bit rows: atol is relative to the tensor's largest magnitude


# Tolerances per dtype. fp32 is IEEE on both sides (allow_tf32=False, the reference under cuDNN's IEEE mode); the
# tf32 row runs both sides with TF32 products (10-bit mantissa, fp32 accumulation); 16-bit rows compare against
# float32 math on the same rounded inputs. Rows marked scaled take atol relative to the tensor's largest magnitude;
# parameter gradients (sums over batch and pixels) always do.
DTYPES = {
    "fp32": Tol(torch.float32, False, 1e-5, 1e-4, False),
    "tf32": Tol(torch.float32, True, 1e-3, 1e-3, True),
    "bf16": Tol(torch.bfloat16, False, 1e-2, 1e-2, True),
    "fp16": Tol(torch.float16, False, 1e-2, 1e-2, True),
}


def dtype_param(name: str):
    marks = []
    if name == "bf16" and interpreting():
        marks.append(pytest.mark.skip(reason="the Triton CPU interpreter multiplies bf16 tl.dot operands as raw uint16 "
                                             "bits (triton 3.9); bf16 runs on the GPU"))  # fmt: skip
    if name == "bf16" and not interpreting() and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        marks.append(pytest.mark.skip(reason="this GPU has no bf16 support"))
    return pytest.param(name, marks=marks, id=name)


@dataclass(frozen=True)
class Case:
    B: int
    CI: int
    CO: int
    H: int
    W: int
    k: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1


CASES = {
    "minimal": Case(1, 1, 1, 4, 4),
    "batch 1": Case(1, 3, 8, 8, 8),
    "odd H and W": Case(2, 3, 5, 9, 7),
    "channels not a multiple of the block": Case(1, 5, 18, 6, 6),
    "stride 2": Case(2, 3, 4, 9, 9, stride=2),
    "dilation 2": Case(1, 2, 4, 9, 9, padding=2, dilation=2),
    "padding 0": Case(2, 3, 4, 8, 8, padding=0),
    "kernel 1 (native head)": Case(1, 4, 6, 6, 6, k=1, padding=0),
}


def assert_match(name: str, actual, expected, atol: float, rtol: float, scaled: bool = False) -> None:
    """Elementwise ``|a - e| <= atol + rtol |e|``; on failure name the first bad index and the worst error."""
    assert actual is not None, f"{name}: the kernel returned no gradient"
    assert expected is not None, f"{name}: the reference has no gradient"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    if scaled and e.numel():
        atol = atol * max(1.0, e.abs().max().item())
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        worst = tuple(torch.nonzero(diff == diff[~diff.isnan()].max())[0].tolist()) if (~diff.isnan()).any() else first
        pytest.fail(
            f"{name}: {int(bad.sum())} of {e.numel()} elements differ (atol {atol:g}, rtol {rtol:g}); "
            f"first at {first}: kernel {a[first].item():.7g} vs reference {e[first].item():.7g}; "
            f"worst at {worst}: |diff| {diff[worst].item():.3g}"
        )


def assert_norm_close(name: str, actual, expected, tol: float) -> None:
    """``||a - e|| <= tol * ||e||`` (2-norm over the tensor), reporting the worst element on failure.

    Used for gradients at full scale: over millions of pooling windows, two accumulation orders put a few dozen
    values on different sides of a near-tie (max-pool argmax) or of zero (ReLU), each moving an O(1) gradient
    entry; elementwise bounds (and, through the weight gradient, whole output channels) would flag those while
    the tensor as a whole agrees.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    err, ref = (a - e).norm().item(), e.norm().item()
    if not err <= tol * max(ref, 1e-30):
        worst = tuple(torch.nonzero((a - e).abs() == (a - e).abs().max())[0].tolist())
        pytest.fail(
            f"{name}: relative error {err / max(ref, 1e-30):.3g} > {tol:g}; worst at {worst}: kernel "
            f"{a[worst].item():.7g} vs reference {e[worst].item():.7g}"
        )


def grads_of(out: torch.Tensor, leaves: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True))


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf on DEVICE with ``t``'s values (cast to ``dtype``)."""
    return t.detach().to(DEVICE, dtype or t.dtype, copy=True).requires_grad_(True)


def gabor_params(CO: int, CI: int, k: int, grid: str = "centered", seed: int = 0) -> list[torch.Tensor]:
    """freq, theta, sigma, psi from GaborConv2d's random init plus noise (so no two pairs coincide)."""
    torch.manual_seed(seed)
    mod = GaborConv2d(CI, CO, k, init="random", grid=grid)
    return [p.detach() + 0.05 * torch.randn_like(p) for p in (mod.freq, mod.theta, mod.sigma, mod.psi)]


def random_bn(C: int, seed: int = 1) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


def mixpool_ref(z: torch.Tensor, alpha) -> torch.Tensor:
    """MixPool2d's forward with ``alpha`` given (a leaf tensor or a float); test_mixpool_ref_is_the_module checks it."""
    return alpha * F.max_pool2d(z, 2, 2) + (1 - alpha) * F.avg_pool2d(z, 2, 2)


def test_mixpool_ref_is_the_module():
    z = torch.randn(2, 3, 7, 6)
    pool = MixPool2d(alpha=0.3)
    assert torch.equal(mixpool_ref(z, pool.alpha), pool(z))


# --------------------------------------------------------------------------------------------------------------
# Harnesses: kernel and reference side by side, forward then every gradient
# --------------------------------------------------------------------------------------------------------------


def check_gabor(
    c: Case, *, relu=True, alpha: float | None = 0.7, alpha_const=False, grid="centered", bn=False, tol="fp32",
    channels_last=False, seed=0, record=True,
) -> None:  # fmt: skip
    t = DTYPES[tol]
    params = gabor_params(c.CO, c.CI, c.k, grid, seed)
    x = torch.randn(c.B, c.CI, c.H, c.W).to(t.dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bn_mod = random_bn(c.CO) if bn else None

    xk = leaf(x)
    pk = [leaf(p) for p in params]
    ak = None if alpha is None else (alpha if alpha_const else torch.tensor(alpha, device=DEVICE, requires_grad=True))
    folded = None if bn_mod is None else tuple(v.to(DEVICE) for v in fold_bn(bn_mod))
    y = gabor_conv2d(xk, *pk, c.k, c.stride, c.padding, c.dilation, relu=relu, pool_alpha=ak, grid=grid, bn=folded,
                     allow_tf32=t.allow_tf32, pool_record=record)  # fmt: skip

    # reference: fp32 math on the same (possibly 16-bit-rounded) values, the bank rounded like the kernel's
    xr = leaf(x, torch.float32)
    pr = [leaf(p) for p in params]
    ar = None if alpha is None else (alpha if alpha_const else torch.tensor(alpha, device=DEVICE, requires_grad=True))
    with cudnn_fp32_precision(t.allow_tf32):
        bank = gabor_bank(*pr, c.k, grid)
        if t.dtype != torch.float32:
            bank = bank + (bank.to(t.dtype).float() - bank).detach()  # the kernel's rounding, gradient untouched
        z = F.conv2d(xr, bank, None, c.stride, c.padding, c.dilation)
        z = F.relu(z) if relu else z
        z = mixpool_ref(z, ar) if alpha is not None else z
        ref = bn_mod.to(DEVICE)(z) if bn_mod is not None else z

    assert y.dtype == t.dtype
    assert_match("output", y, ref, t.atol, t.rtol, t.scaled)
    torch.manual_seed(seed + 100)
    go = torch.randn_like(ref)
    names = ["x", "freq", "theta", "sigma", "psi"] + (["alpha"] if isinstance(ak, torch.Tensor) else [])
    lk = [xk, *pk] + ([ak] if isinstance(ak, torch.Tensor) else [])
    lr = [xr, *pr] + ([ar] if isinstance(ar, torch.Tensor) else [])
    with cudnn_fp32_precision(t.allow_tf32):
        gr = grads_of(ref, lr, go)
    gk = grads_of(y, lk, go)
    for name, a, e in zip(names, gk, gr):
        # parameter gradients sum over the batch and every pixel: compare them relative to their scale
        scaled = t.scaled or name not in ("x",)
        assert_match(f"grad {name}", a, e, t.atol, t.rtol, scaled)


def check_conv(
    c: Case, *, relu=True, alpha: float | None = 0.6, alpha_const=False, bias=True, bn=False, tol="fp32",
    channels_last=False, seed=0, record=True,
) -> None:  # fmt: skip
    t = DTYPES[tol]
    torch.manual_seed(seed)
    conv = nn.Conv2d(c.CI, c.CO, c.k, c.stride, c.padding, c.dilation, bias=bias)
    x = torch.randn(c.B, c.CI, c.H, c.W).to(t.dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = conv.weight.detach().to(t.dtype)
    b = conv.bias.detach().to(t.dtype) if bias else None
    bn_mod = random_bn(c.CO) if bn else None

    xk, wk = leaf(x), leaf(w)
    bk = None if b is None else leaf(b)
    ak = None if alpha is None else (alpha if alpha_const else torch.tensor(alpha, device=DEVICE, requires_grad=True))
    folded = None if bn_mod is None else tuple(v.to(DEVICE) for v in fold_bn(bn_mod))
    y = conv2d_mixpool(xk, wk, bk, ak, stride=c.stride, padding=c.padding, dilation=c.dilation, relu=relu, bn=folded,
                       allow_tf32=t.allow_tf32, pool_record=record)  # fmt: skip

    xr, wr = leaf(x, torch.float32), leaf(w, torch.float32)
    br = None if b is None else leaf(b, torch.float32)
    ar = None if alpha is None else (alpha if alpha_const else torch.tensor(alpha, device=DEVICE, requires_grad=True))
    with cudnn_fp32_precision(t.allow_tf32):
        z = F.conv2d(xr, wr, br, c.stride, c.padding, c.dilation)
        z = F.relu(z) if relu else z
        z = mixpool_ref(z, ar) if alpha is not None else z
        ref = bn_mod.to(DEVICE)(z) if bn_mod is not None else z

    assert y.dtype == t.dtype
    assert_match("output", y, ref, t.atol, t.rtol, t.scaled)
    torch.manual_seed(seed + 100)
    go = torch.randn_like(ref)
    named = [("x", xk, xr), ("weight", wk, wr)]
    if bias:
        named.append(("bias", bk, br))
    if isinstance(ak, torch.Tensor):
        named.append(("alpha", ak, ar))
    with cudnn_fp32_precision(t.allow_tf32):
        gr = grads_of(ref, [r for _, _, r in named], go)
    gk = grads_of(y, [k for _, k, _ in named], go)
    for (name, _, _), a, e in zip(named, gk, gr):
        assert_match(f"grad {name}", a, e, t.atol, t.rtol, t.scaled or name != "x")


# --------------------------------------------------------------------------------------------------------------
# Forward + backward against the reference
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gabor_conv_relu_mixpool(case):
    check_gabor(CASES[case])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_conv_mixpool(case):
    check_conv(CASES[case])


@pytest.mark.parametrize(
    "mode",
    [
        dict(relu=False, alpha=None),  # plain conv
        dict(relu=True, alpha=None),  # conv + ReLU (dL/dz from the saved output)
        dict(relu=False, alpha=0.3),  # pooling without ReLU
        dict(relu=True, alpha=1.0, alpha_const=True),  # MaxPool2d: constant alpha, no alpha gradient
        dict(relu=True, alpha=0.8, bn=True),  # DGCNN eval epilogue: BN folded after the pool
        dict(relu=True, alpha=None, bn=True),  # BN folded without a pool (recompute backward, no pool)
        dict(relu=True, alpha=1.4),  # alpha trained out of [0, 1]
    ],
    ids=["conv", "relu", "pool-no-relu", "maxpool", "pool-bn", "relu-bn", "alpha-out-of-range"],
)
@pytest.mark.parametrize("record", [True, False], ids=["record", "recompute"])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_epilogue_modes(op, mode, record):
    """Every epilogue, with the backward read off the forward's record (default) and recomputing the conv."""
    case = CASES["odd H and W"]
    (check_gabor if op == "gabor" else check_conv)(case, **mode, record=record)


def test_gabor_legacy_grid():
    check_gabor(CASES["batch 1"], grid="legacy")
    check_gabor(Case(1, 2, 3, 9, 9, k=5, padding=2), grid="legacy", seed=3)  # kernel 5: non-integer legacy grid


def test_conv_without_bias():
    check_conv(CASES["odd H and W"], bias=False)


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_channels_last_input(op):
    (check_gabor if op == "gabor" else check_conv)(CASES["batch 1"], channels_last=True)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_channels_last_conv_reduces_over_channel_runs(case, monkeypatch):
    """A channels-last input takes the (tap, channel chunk) reduction on a channels-last weight and writes a
    channels-last output; forward and every gradient match the reference on each case (odd sizes, batch 1, channels
    off the block, stride, dilation, no padding, kernel 1)."""
    spy = LaunchSpy(conv_mixpool._conv_mixpool_fwd)
    monkeypatch.setattr(conv_mixpool, "_conv_mixpool_fwd", spy)
    check_conv(CASES[case], channels_last=True, seed=11)
    c = CASES[case]
    assert spy.calls[0]["CHANNELS_INNER"] == (c.CI > 1 and c.H * c.W > 1)  # else NHWC is NCHW too
    x = torch.randn(c.B, c.CI, c.H, c.W, device=DEVICE).to(memory_format=torch.channels_last)
    w = torch.randn(c.CO, c.CI, c.k, c.k, device=DEVICE)
    with torch.no_grad():
        y = conv2d_mixpool(x, w, None, 0.5, stride=c.stride, padding=c.padding, dilation=c.dilation)
    if spy.calls[-1]["CHANNELS_INNER"] and y.shape[2] * y.shape[3] > 1 and y.shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gabor_output_keeps_the_input_layout(channels_last):
    """The first layer writes what the next reads: a channels-last input gets a channels-last output."""
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        y = gabor_conv2d(x, *[p.to(DEVICE) for p in gabor_params(6, 3, 3)], 3, 1, 1, relu=True, pool_alpha=0.5)
    assert y.shape == (2, 6, 4, 4) and y.is_contiguous() != channels_last
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("record", [True, False], ids=["record", "recompute"])
@pytest.mark.parametrize("mode", [dict(alpha=0.7, bn=True), dict(alpha=None, relu=True), dict(alpha=1.4)],
                         ids=["pool-bn", "relu", "alpha-out-of-range"])  # fmt: skip
def test_channels_last_epilogues(mode, record):
    check_conv(Case(2, 20, 9, 7, 9), channels_last=True, record=record, seed=5, **mode)  # 20 channels: 2 chunks of 16


@pytest.mark.parametrize("record", [True, False], ids=["record", "recompute"])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_channels_last_backward_hands_cudnn_one_layout(op, record, monkeypatch):
    """dL/dz is written in the layout the layer ran in, so the input and weight gradients read one layout."""
    module = gabor_conv if op == "gabor" else conv_mixpool
    layouts = []
    real = module.conv_backward

    def spy(grad_z, x, *args):
        layouts.append((is_channels_last(grad_z), is_channels_last(x)))
        return real(grad_z, x, *args)

    monkeypatch.setattr(module, "conv_backward", spy)
    (check_gabor if op == "gabor" else check_conv)(CASES["odd H and W"], channels_last=True, record=record)
    assert layouts == [(True, True)]


def test_channels_last_groups_and_split_k(monkeypatch):
    """Grouped (the five branches) and split-K launches on channels-last inputs: each group's channels are one
    contiguous run; the split shares the (tap, chunk) steps. Forward and gradients against the reference."""
    torch.manual_seed(9)
    G, B, CI, CO, H, W = 3, 2, 19, 7, 5, 6
    x = torch.randn(B, G * CI, H, W).to(memory_format=torch.channels_last)
    w = torch.randn(G * CO, CI, 3, 3) * 0.2
    b = torch.randn(G * CO)
    for splits in (1, 2, 5):
        monkeypatch.setattr(conv_mixpool, "split_k", lambda geo, device, record, s=splits: s)
        for alpha in ((None,) if splits > 1 else (None, torch.rand(G))):
            xk, wk, bk, xr, wr, br = leaf(x), leaf(w), leaf(b), leaf(x), leaf(w), leaf(b)
            y = conv2d_mixpool(xk, wk, bk, alpha, groups=G, allow_tf32=False)
            with cudnn_fp32_precision(False):
                ref = F.relu(F.conv2d(xr, wr, br, padding=1, groups=G))
                ref = ref if alpha is None else group_mixpool_ref(ref, alpha.to(DEVICE), G)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert_match(f"output ({splits} splits)", y, ref, 1e-5, 1e-4)
            go = torch.randn_like(ref)
            with cudnn_fp32_precision(False):
                gr = grads_of(ref, [xr, wr, br], go)
            for name, a, e in zip(["x", "weight", "bias"], grads_of(y, [xk, wk, bk], go), gr):
                assert_match(f"grad {name} ({splits} splits)", a, e, 1e-5, 1e-4, scaled=name != "x")


@pytest.mark.parametrize("tol", [dtype_param(n) for n in ("tf32", "bf16", "fp16")])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_reduced_precision(op, tol):
    (check_gabor if op == "gabor" else check_conv)(CASES["odd H and W"], tol=tol)


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_expanded_grad_output(op):
    """``y.sum().backward()`` hands the kernel a stride-0 grad_output; explicit strides must cope."""
    case = CASES["batch 1"]
    torch.manual_seed(5)
    x = torch.randn(case.B, case.CI, case.H, case.W, device=DEVICE, requires_grad=True)
    if op == "gabor":
        params = [p.to(DEVICE) for p in gabor_params(case.CO, case.CI, 3)]
        y = gabor_conv2d(x, *params, 3, 1, 1, relu=True, pool_alpha=0.5)
        ref = mixpool_ref(F.relu(F.conv2d(x, gabor_bank(*params, 3), None, 1, 1)), 0.5)
    else:
        w = torch.randn(case.CO, case.CI, 3, 3, device=DEVICE)
        y = conv2d_mixpool(x, w, None, 0.5)
        ref = mixpool_ref(F.relu(F.conv2d(x, w, None, 1, 1)), 0.5)
    (gk,) = torch.autograd.grad(y.sum(), [x])
    (gr,) = torch.autograd.grad(ref.sum(), [x])
    assert_match("grad x", gk, gr, 1e-5, 1e-4)


# --------------------------------------------------------------------------------------------------------------
# fp32 precision: follows torch's convolution setting by default, passed explicitly, never written globally
# --------------------------------------------------------------------------------------------------------------

needs_fp32_precision_api = pytest.mark.skipif(
    not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
    reason="this torch has no torch.backends.cudnn.conv.fp32_precision",
)


@pytest.fixture
def set_conv_precision():
    """Sets ``torch.backends.cudnn.conv.fp32_precision`` for one test and restores it afterwards."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision

    def set_to(value: str) -> None:
        conv.fp32_precision = value

    yield set_to
    conv.fp32_precision = saved


class LaunchSpy:
    """Stands in for an autotuned kernel: records the keyword arguments of every launch, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def run_op_with_spies(op: str, monkeypatch, dtype=torch.float32, **kwargs) -> list[dict]:
    """Forward and backward of a small pooled layer; the launch arguments of its forward and backward kernels (the
    backward that recomputes the conv, ``pool_record=False``: the one with dots whose precision matters)."""
    kwargs.setdefault("pool_record", False)
    module, names = (gabor_conv, ("_gabor_conv_fwd", "_gabor_conv_bwd")) if op == "gabor" else (
        conv_mixpool, ("_conv_mixpool_fwd", "_conv_mixpool_bwd"))  # fmt: skip
    spies = [LaunchSpy(getattr(module, n)) for n in names]
    for name, spy in zip(names, spies):
        monkeypatch.setattr(module, name, spy)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 6, 6, device=DEVICE, dtype=dtype, requires_grad=True)
    if op == "gabor":
        params = [p.to(DEVICE, dtype).requires_grad_(True) for p in gabor_params(4, 3, 3)]
        y = gabor_conv2d(x, *params, 3, 1, 1, relu=True, pool_alpha=0.5, **kwargs)
    else:
        w = torch.randn(4, 3, 3, 3, device=DEVICE, dtype=dtype, requires_grad=True)
        y = conv2d_mixpool(x, w, None, 0.5, **kwargs)
    y.sum().backward()
    calls = spies[0].calls + spies[1].calls
    assert len(calls) == 2, "expected one forward and one backward launch"
    return calls


@needs_fp32_precision_api
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_fp32_precision_follows_torch_by_default(op, setting, monkeypatch, set_conv_precision):
    """Without ``allow_tf32`` the fp32 dots do what torch's own convolutions do (TF32 is torch's default)."""
    set_conv_precision(setting)
    assert _common.torch_conv_allows_tf32() == (setting == "tf32")
    calls = run_op_with_spies(op, monkeypatch)
    assert [c["DOT_PRECISION"] for c in calls] == [setting, setting]


@needs_fp32_precision_api
@pytest.mark.parametrize(
    "allow_tf32, dtype, expected",
    [(False, torch.float32, "ieee"), (True, torch.float32, "tf32"), (True, torch.float64, "ieee")],
    ids=["ieee-asked", "tf32-asked", "float64-never-tf32"],
)
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_explicit_precision_wins(op, allow_tf32, dtype, expected, monkeypatch, set_conv_precision):
    set_conv_precision("ieee" if allow_tf32 else "tf32")
    calls = run_op_with_spies(op, monkeypatch, dtype=dtype, allow_tf32=allow_tf32)
    assert [c["DOT_PRECISION"] for c in calls] == [expected, expected]


@needs_fp32_precision_api
def test_torch_precision_none_inherits(set_conv_precision):
    """``"none"`` at the conv level defers to the cuDNN level, then to the global setting (IEEE when all are none)."""
    set_conv_precision("none")
    assert _common.torch_conv_allows_tf32() is False


class _ReadOnlyPrecision:
    """``torch.backends.cudnn.conv`` as the kernels may see it: readable, any write fails the test."""

    def __init__(self, real):
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        raise AssertionError(f"the kernels wrote torch.backends.cudnn.conv.{name} = {value!r} (process-global)")


@pytest.mark.parametrize("allow_tf32", [None, False, True], ids=["default", "ieee", "tf32"])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_backward_writes_no_global_precision_flag(op, allow_tf32, monkeypatch):
    """Forward and backward read torch's TF32 settings and never write them (the switches are not thread-local)."""
    if hasattr(torch.backends.cudnn, "conv"):
        monkeypatch.setattr(torch.backends.cudnn, "conv", _ReadOnlyPrecision(torch.backends.cudnn.conv))
    cls = type(torch.backends.cudnn)
    descriptor = cls.__dict__["allow_tf32"]

    def refuse(_self, value):
        raise AssertionError(f"the kernels wrote torch.backends.cudnn.allow_tf32 = {value!r} (process-global)")

    monkeypatch.setattr(cls, "allow_tf32", property(lambda self: descriptor.__get__(self, cls), refuse))
    run_op_with_spies(op, monkeypatch, allow_tf32=allow_tf32)


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_allow_tf32_must_be_a_bool_or_none(op):
    x = _x(1, 2, 6, 6)
    with pytest.raises(ValueError, match="^allow_tf32"):
        if op == "gabor":
            gabor_conv2d(x, *[_x(4, 2)] * 4, 3, allow_tf32="yes")
        else:
            conv2d_mixpool(x, _x(4, 2, 3, 3), None, 0.5, allow_tf32=1)


# --------------------------------------------------------------------------------------------------------------
# Max-pool ties, saved tensors, the bank, BN folding
# --------------------------------------------------------------------------------------------------------------


def test_torch_max_pool_tie_goes_to_first_max():
    """The convention the kernels copy: PyTorch's max-pool backward routes a tie to the first max (row-major)."""
    z = torch.ones(1, 1, 2, 2, requires_grad=True)
    F.max_pool2d(z, 2, 2).sum().backward()
    assert z.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_max_pool_ties_match_reference(op):
    """A constant input region makes all four window positions equal: gradients must still match exactly."""
    B, CI, CO, H = 1, 2, 3, 8
    x = torch.full((B, CI, H, H), 0.5, device=DEVICE)
    x[..., :2, :] = torch.randn(B, CI, 2, H, device=DEVICE)  # one non-constant stripe next to the tie region
    x.requires_grad_(True)
    alpha = torch.tensor(0.75, device=DEVICE, requires_grad=True)
    if op == "gabor":
        params = [p.to(DEVICE) for p in gabor_params(CO, CI, 3, seed=7)]
        params[3] = torch.zeros_like(params[3])  # psi = 0: cos(0) > 0 keeps the centre tap positive
        y = gabor_conv2d(x, *params, 3, 1, 0, relu=True, pool_alpha=alpha)
        with cudnn_fp32_precision(False):
            ref = mixpool_ref(F.relu(F.conv2d(x, gabor_bank(*params, 3), None, 1, 0)), alpha)
    else:
        w = torch.full((CO, CI, 3, 3), 0.1, device=DEVICE)
        b = torch.tensor([0.5, -0.2, 0.1], device=DEVICE)
        y = conv2d_mixpool(x, w, b, alpha, padding=0)
        with cudnn_fp32_precision(False):
            ref = mixpool_ref(F.relu(F.conv2d(x, w, b, 1, 0)), alpha)
    assert_match("output", y, ref, 1e-6, 1e-5)
    go = torch.randn_like(ref)
    gk = grads_of(y, [x, alpha], go)
    with cudnn_fp32_precision(False):
        gr = grads_of(ref, [x, alpha], go)
    assert_match("grad x", gk[0], gr[0], 1e-5, 1e-4)
    assert_match("grad alpha", gk[1], gr[1], 1e-5, 1e-4)


@pytest.mark.parametrize("record", [True, False], ids=["record", "recompute"])
def test_backward_saves_no_prepool_activation(record):
    case = CASES["batch 1"]
    x = torch.randn(case.B, case.CI, case.H, case.W, device=DEVICE, requires_grad=True)
    w = torch.randn(case.CO, case.CI, 3, 3, device=DEVICE, requires_grad=True)
    y = conv2d_mixpool(x, w, None, 0.5, pool_record=record)
    pre_pool = (case.B, case.CO, case.H, case.W)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert all(tuple(t.shape) != pre_pool for t in saved)
    # the record: one byte and one accumulation-dtype value per pooled output value, nothing else of that size
    assert sorted(str(t.dtype) for t in saved if t.shape == y.shape) == (
        ["torch.float32", "torch.uint8"] if record else []
    )


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_backward_reads_the_record_instead_of_recomputing(op, monkeypatch):
    """With the record the backward never launches the recomputing kernel; without it, it does; no record is
    written when no gradient is needed."""
    module = gabor_conv if op == "gabor" else conv_mixpool
    calls = []
    real = module._launch_backward
    monkeypatch.setattr(module, "_launch_backward", lambda *a: calls.append(1) or real(*a))
    case = CASES["odd H and W"]
    for record in (True, False):
        calls.clear()
        x = torch.randn(case.B, case.CI, case.H, case.W, device=DEVICE, requires_grad=True)
        if op == "gabor":
            params = [p.to(DEVICE).requires_grad_() for p in gabor_params(case.CO, case.CI, 3)]
            y = gabor_conv2d(x, *params, 3, 1, 1, relu=True, pool_alpha=0.5, pool_record=record)
        else:
            w = torch.randn(case.CO, case.CI, 3, 3, device=DEVICE, requires_grad=True)
            y = conv2d_mixpool(x, w, None, 0.5, pool_record=record)
        y.backward(torch.randn_like(y))
        assert len(calls) == (0 if record else 1), record
    with torch.no_grad():
        y = conv2d_mixpool(torch.randn(1, 3, 8, 8, device=DEVICE), torch.randn(4, 3, 3, 3, device=DEVICE), None, 0.5)
    assert y.grad_fn is None


@pytest.mark.parametrize("grid", ["centered", "legacy"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_gabor_weight_matches_bank(grid, k):
    params = [p.to(DEVICE) for p in gabor_params(6, 3, k, grid)]
    assert_match("bank", gabor_weight(*params, k, grid), gabor_bank(*params, k, grid), 1e-6, 1e-5)
    p64 = [p.double() for p in params]
    assert_match("bank float64", gabor_weight(*p64, k, grid), gabor_bank(*p64, k, grid), 1e-12, 1e-10)


def test_fold_bn_equals_eval_batchnorm():
    bn = random_bn(5)
    y = torch.randn(2, 5, 3, 3)
    scale, shift = fold_bn(bn)
    assert_match("folded bn", y * scale[:, None, None] + shift[:, None, None], bn(y), 1e-6, 1e-5)
    no_affine = nn.BatchNorm2d(5, affine=False).eval()
    s2, b2 = fold_bn(no_affine)
    assert_match("folded bn (no affine)", y * s2[:, None, None] + b2[:, None, None], no_affine(y), 1e-6, 1e-5)


# --------------------------------------------------------------------------------------------------------------
# gradcheck in float64
# --------------------------------------------------------------------------------------------------------------


def test_gradcheck_gabor_float64():
    """The interpreter (and the GPU) run float64 tl.dot, so the analytical gradients face finite differences."""
    params = [p.double().to(DEVICE).requires_grad_(True) for p in gabor_params(2, 2, 3, seed=11)]
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    alpha = torch.tensor(0.6, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x, f, t, s, p, a):
        return gabor_conv2d(x, f, t, s, p, 3, 1, 1, relu=True, pool_alpha=a)

    assert torch.autograd.gradcheck(fn, (x, *params, alpha), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradcheck_conv_mixpool_float64():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x, w, b, a):
        return conv2d_mixpool(x, w, b, a)

    assert torch.autograd.gradcheck(fn, (x, w, b, alpha), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# --------------------------------------------------------------------------------------------------------------
# stage_forward: reference ConvStage on the kernels, train and eval
# --------------------------------------------------------------------------------------------------------------


def make_stage(kind: str) -> ConvStage:
    torch.manual_seed(21)
    if kind == "dgcnn-gabor":  # branch layer 1: Gabor -> ReLU -> MixPool -> BN
        return ConvStage(GaborConv2d(3, 6, 3, padding=1), MixPool2d(alpha=0.8), nn.BatchNorm2d(6), "pool_bn")
    if kind == "dgcnn-conv":  # branch layers 2-4
        return ConvStage(nn.Conv2d(3, 6, 3, padding=1), MixPool2d(alpha=0.6), nn.BatchNorm2d(6), "pool_bn")
    if kind == "cnn5":  # CNN5 / head: conv -> ReLU -> BN -> MaxPool
        return ConvStage(nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(6), "bn_pool")
    if kind == "gcnn5-gabor":  # Gabor first layer in CNN5 order
        return ConvStage(GaborConv2d(3, 6, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(6), "bn_pool")
    if kind == "before-dilated":  # last stage before the dilated block: no pool, no BN
        return ConvStage(nn.Conv2d(3, 6, 3, padding=1), None, None, "pool_bn")
    raise KeyError(kind)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["dgcnn-gabor", "dgcnn-conv", "cnn5", "gcnn5-gabor", "before-dilated"])
def test_stage_forward(kind, train):
    ref_stage = make_stage(kind).to(DEVICE)
    if ref_stage.bn is not None:
        with torch.no_grad():
            ref_stage.bn.running_mean.normal_()
            ref_stage.bn.running_var.uniform_(0.5, 2.0)
            ref_stage.bn.weight.normal_()
            ref_stage.bn.bias.normal_()
    ker_stage = make_stage(kind).to(DEVICE)
    ker_stage.load_state_dict(ref_stage.state_dict())
    ref_stage.train(train)
    ker_stage.train(train)
    x = torch.randn(2, 3, 7, 8, device=DEVICE)
    xr, xk = leaf(x), leaf(x)
    with cudnn_fp32_precision(False):
        ref = ref_stage(xr)
    out = stage_forward(ker_stage, xk)
    assert_match("output", out, ref, 1e-5, 1e-4)
    if ref_stage.bn is not None:  # running statistics updated identically (training) or untouched (eval)
        assert_match("running_mean", ker_stage.bn.running_mean, ref_stage.bn.running_mean, 1e-6, 1e-5)
        assert_match("running_var", ker_stage.bn.running_var, ref_stage.bn.running_var, 1e-6, 1e-5)
    go = torch.randn_like(ref)
    names = ["x"] + [n for n, _ in ref_stage.named_parameters()]
    with cudnn_fp32_precision(False):
        gr = grads_of(ref, [xr, *ref_stage.parameters()], go)
    gk = grads_of(out, [xk, *ker_stage.parameters()], go)
    for name, a, e in zip(names, gk, gr):
        if e is None:  # parameters the reference does not use (none expected) or a constant BN in eval
            assert a is None, f"grad {name}: the kernel path produced a gradient the reference does not have"
            continue
        assert_match(f"grad {name}", a, e, 1e-5, 1e-4, scaled=name != "x")


@pytest.mark.parametrize("kind", ["dgcnn-gabor", "dgcnn-conv", "cnn5"])
def test_stage_forward_eval_folds_bn(kind, monkeypatch):
    """Under no_grad an eval BN folds into the kernel epilogue (counted) and still equals the reference."""
    stage = make_stage(kind).to(DEVICE).eval()
    with torch.no_grad():
        stage.bn.running_mean.normal_()
        stage.bn.running_var.uniform_(0.5, 2.0)
    calls = []
    real = fused.fold_bn
    monkeypatch.setattr(fused, "fold_bn", lambda bn: calls.append(bn) or real(bn))
    x = torch.randn(2, 3, 8, 9, device=DEVICE)
    with torch.no_grad(), cudnn_fp32_precision(False):
        ref = stage(x)
        out = stage_forward(stage, x)
    assert calls == [stage.bn]
    assert_match("output", out, ref, 1e-5, 1e-4)


# --------------------------------------------------------------------------------------------------------------
# Groups: several independent convolutions (a FusionNet stage's branches) in one launch
# --------------------------------------------------------------------------------------------------------------


def group_mixpool_ref(z: torch.Tensor, alpha: torch.Tensor, groups: int) -> torch.Tensor:
    """Mixed pooling with one alpha per group of channels (a (groups,) tensor or one shared value)."""
    c = z.shape[1] // groups
    alphas = alpha.reshape(-1).expand(groups)
    return torch.cat([mixpool_ref(z[:, g * c : (g + 1) * c], alphas[g]) for g in range(groups)], 1)


GROUP_CASES = {
    "3 groups, odd sizes, channels off the block": (Case(2, 5, 6, 9, 7), 3),
    "5 groups, batch 1 (the branches)": (Case(1, 3, 4, 8, 8), 5),
    "2 groups, stride 2": (Case(2, 2, 3, 9, 9, stride=2), 2),
}


@pytest.mark.parametrize("shared_alpha", [False, True], ids=["alpha-per-group", "alpha-shared"])
@pytest.mark.parametrize("bn", [False, True], ids=["", "bn"])
@pytest.mark.parametrize("op", ["gabor", "conv"])
@pytest.mark.parametrize("case", list(GROUP_CASES), ids=list(GROUP_CASES))
def test_groups_match_grouped_reference(case, op, bn, shared_alpha):
    """``groups=G`` equals ``F.conv2d(groups=G)`` -> ReLU -> per-group mixed pooling -> BN, forward and every
    gradient (x, the weights or Gabor parameters, bias, the alphas), fp32 on fresh random values."""
    c, G = GROUP_CASES[case]
    seed = 7 * list(GROUP_CASES).index(case) + 3 * (op == "gabor") + 2 * bn + shared_alpha
    torch.manual_seed(seed)
    x = torch.randn(c.B, G * c.CI, c.H, c.W)
    alpha = torch.rand(()) if shared_alpha else torch.rand(G) * 1.2
    bn_mod = random_bn(G * c.CO, seed) if bn else None
    folded = None if bn_mod is None else tuple(v.to(DEVICE) for v in fold_bn(bn_mod))
    if op == "gabor":
        params = gabor_params(G * c.CO, c.CI, c.k, seed=seed)
        names = ["freq", "theta", "sigma", "psi"]
    else:
        params = [torch.randn(G * c.CO, c.CI, c.k, c.k) * 0.3, torch.randn(G * c.CO)]
        names = ["weight", "bias"]
    xk, xr = leaf(x), leaf(x)
    pk, pr = [leaf(p) for p in params], [leaf(p) for p in params]
    ak, ar = leaf(alpha), leaf(alpha)
    if op == "gabor":
        y = gabor_conv2d(xk, *pk, c.k, c.stride, c.padding, c.dilation, relu=True, pool_alpha=ak, bn=folded,
                         groups=G, allow_tf32=False)  # fmt: skip
    else:
        y = conv2d_mixpool(xk, pk[0], pk[1], ak, stride=c.stride, padding=c.padding, dilation=c.dilation, bn=folded,
                           groups=G, allow_tf32=False)  # fmt: skip
    with cudnn_fp32_precision(False):
        weight, bias = (gabor_bank(*pr, c.k), None) if op == "gabor" else (pr[0], pr[1])
        z = F.relu(F.conv2d(xr, weight, bias, c.stride, c.padding, c.dilation, groups=G))
        ref = group_mixpool_ref(z, ar, G)
        ref = bn_mod.to(DEVICE)(ref) if bn_mod is not None else ref
    assert_match("output", y, ref, 1e-5, 1e-4)
    go = torch.randn_like(ref)
    with cudnn_fp32_precision(False):
        gr = grads_of(ref, [xr, *pr, ar], go)
    gk = grads_of(y, [xk, *pk, ak], go)
    for name, a, e in zip(["x", *names, "alpha"], gk, gr):
        assert_match(f"grad {name}", a, e, 1e-5, 1e-4, scaled=name != "x")


@pytest.mark.parametrize("tol", [dtype_param(n) for n in ("tf32", "bf16", "fp16")])
@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_groups_reduced_precision(op, tol):
    """The grouped launch in TF32 / 16-bit against the grouped fp32 reference on the same rounded values."""
    t = DTYPES[tol]
    c, G = GROUP_CASES["3 groups, odd sizes, channels off the block"]
    torch.manual_seed(11)
    x = torch.randn(c.B, G * c.CI, c.H, c.W).to(t.dtype)
    alpha = torch.rand(G)
    if op == "gabor":
        params = gabor_params(G * c.CO, c.CI, c.k, seed=11)
        y = gabor_conv2d(leaf(x), *[leaf(p) for p in params], c.k, 1, 1, relu=True, pool_alpha=leaf(alpha),
                         groups=G, allow_tf32=t.allow_tf32)  # fmt: skip
        bank = gabor_bank(*[p.to(DEVICE) for p in params], c.k)
        weight, bias = bank.to(t.dtype).float(), None  # the kernel's rounding of the bank
    else:
        weight, bias = (torch.randn(G * c.CO, c.CI, c.k, c.k) * 0.3).to(t.dtype), torch.randn(G * c.CO).to(t.dtype)
        y = conv2d_mixpool(leaf(x), leaf(weight), leaf(bias), leaf(alpha), groups=G, allow_tf32=t.allow_tf32)
        weight, bias = weight.to(DEVICE, torch.float32), bias.to(DEVICE, torch.float32)
    with cudnn_fp32_precision(t.allow_tf32):
        z = F.relu(F.conv2d(x.to(DEVICE, torch.float32), weight, bias, 1, 1, groups=G))
        ref = group_mixpool_ref(z, alpha.to(DEVICE), G)
    assert y.dtype == t.dtype
    assert_match("output", y, ref, t.atol, t.rtol, t.scaled)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["dgcnn-gabor", "dgcnn-conv", "cnn5", "gcnn5-gabor", "before-dilated"])
def test_grouped_stages_equal_stages_one_by_one(kind, train):
    """Three branches' stages as one grouped launch (:func:`fused.grouped_stage_forward`) against each reference
    stage on its own input: outputs, every gradient, and (training) each branch's own BN running statistics."""
    G = 3
    refs = [make_stage(kind).to(DEVICE) for _ in range(G)]
    for g, stage in enumerate(refs):
        torch.manual_seed(40 + g)
        with torch.no_grad():
            for p in stage.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if stage.bn is not None:
                stage.bn.running_mean.normal_()
                stage.bn.running_var.uniform_(0.5, 2.0)
            if isinstance(stage.pool, MixPool2d):
                stage.pool.alpha.fill_(0.2 + 0.3 * g)
    kers = [make_stage(kind).to(DEVICE) for _ in range(G)]
    for k, r in zip(kers, refs):
        k.load_state_dict(r.state_dict())
        k.train(train)
        r.train(train)
    assert fused.can_group_stages(kers)
    x = torch.randn(2, G * 3, 7, 8, device=DEVICE)
    xr, xk = leaf(x), leaf(x)
    with cudnn_fp32_precision(False):
        ref = torch.cat([r(xr[:, 3 * g : 3 * g + 3]) for g, r in enumerate(refs)], 1)
    out = fused.grouped_stage_forward(kers, xk)
    assert_match("output", out, ref, 1e-5, 1e-4)
    go = torch.randn_like(ref)
    ref_params = [p for r in refs for p in r.parameters()]
    ker_params = [p for k in kers for p in k.parameters()]
    with cudnn_fp32_precision(False):
        gr = grads_of(ref, [xr, *ref_params], go)
    gk = grads_of(out, [xk, *ker_params], go)
    names = ["x"] + [f"{g}.{n}" for g, r in enumerate(refs) for n, _ in r.named_parameters()]
    for name, a, e in zip(names, gk, gr):
        if e is None:
            assert a is None, f"grad {name}: the grouped path produced a gradient the reference does not have"
            continue
        assert_match(f"grad {name}", a, e, 1e-5, 1e-4, scaled=name != "x")
    for g, (k, r) in enumerate(zip(kers, refs)):
        if r.bn is not None:
            assert_match(f"{g}.running_mean", k.bn.running_mean, r.bn.running_mean, 1e-6, 1e-5)
            assert_match(f"{g}.running_var", k.bn.running_var, r.bn.running_var, 1e-6, 1e-5)


def test_stages_that_differ_are_not_grouped():
    a = make_stage("dgcnn-conv")
    assert not fused.can_group_stages([a, make_stage("dgcnn-gabor")])  # another conv kind
    assert not fused.can_group_stages([a, make_stage("cnn5")])  # another BN order and pool
    wider = ConvStage(nn.Conv2d(3, 7, 3, padding=1), MixPool2d(2, 2, 0.5), nn.BatchNorm2d(7), "pool_bn")
    assert not fused.can_group_stages([a, wider])
    b = make_stage("dgcnn-conv")
    b.bn.eval()
    with torch.no_grad():  # one BN would fold into the launch (eval, no gradient), the other not (training)
        assert not fused.can_group_stages([a, b])
    with pytest.raises(ValueError, match="^stages"):
        fused.grouped_stage_forward([a, wider], _x(1, 6, 6, 6))


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("mode", [dict(bias=True, bn=False), dict(bias=False, bn=True)], ids=["bias", "bn"])
def test_split_k_matches_reference(splits, mode, monkeypatch):
    """An unpooled layer with its reduction shared by several programs (uneven shares, empty ones at 8) equals the
    reference, forward and (ReLU only) backward; groups included."""
    monkeypatch.setattr(conv_mixpool, "split_k", lambda geo, device, record: splits)
    torch.manual_seed(splits)
    G, B, CI, CO, H, W = 2, 2, 19, 7, 5, 6  # R = 171: 11 chunks of 16
    x = torch.randn(B, G * CI, H, W)
    w = torch.randn(G * CO, CI, 3, 3) * 0.2
    b = torch.randn(G * CO) if mode["bias"] else None
    bn_mod = random_bn(G * CO) if mode["bn"] else None
    folded = None if bn_mod is None else tuple(v.to(DEVICE) for v in fold_bn(bn_mod))
    with torch.no_grad(), cudnn_fp32_precision(False):
        y = conv2d_mixpool(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), None, groups=G, bn=folded,
                           allow_tf32=False)  # fmt: skip
        ref = F.relu(F.conv2d(x, w, b, padding=1, groups=G))
        ref = bn_mod(ref) if bn_mod is not None else ref
    assert_match("output", y, ref.to(DEVICE), 1e-5, 1e-4)
    xk, wk, xr, wr = leaf(x), leaf(w), leaf(x), leaf(w)
    yk = conv2d_mixpool(xk, wk, None, None, groups=G, allow_tf32=False)
    with cudnn_fp32_precision(False):
        yr = F.relu(F.conv2d(xr, wr, None, padding=1, groups=G))
    go = torch.randn_like(yr)
    for name, a, e in zip(["x", "weight"], grads_of(yk, [xk, wk], go), grads_of(yr, [xr, wr], go)):
        assert_match(f"grad {name}", a, e, 1e-5, 1e-4, scaled=name != "x")


def test_split_k_choice():
    """Splits only unpooled layers whose tiles would not fill a wave, never on the interpreter or with a record."""
    gpu = torch.device("meta")
    head0 = _common.ConvGeometry(B=256, CI=1280, H=4, W=4, CO=32, K=3, stride=1, padding=1, dilation=1, pool=False)
    assert conv_mixpool.split_k(head0, gpu, False) == conv_mixpool.SPLIT_K_MAX
    assert conv_mixpool.split_k(head0, torch.device("cpu"), False) == 1
    assert conv_mixpool.split_k(head0, gpu, True) == 1
    pooled = _common.ConvGeometry(B=256, CI=1280, H=4, W=4, CO=32, K=3, stride=1, padding=1, dilation=1, pool=True)
    assert conv_mixpool.split_k(pooled, gpu, False) == 1
    head1 = _common.ConvGeometry(B=256, CI=32, H=2, W=2, CO=64, K=3, stride=1, padding=1, dilation=1, pool=False)
    assert conv_mixpool.split_k(head1, gpu, False) == 2  # 9 chunks of 32: two shares of at least four
    short = _common.ConvGeometry(B=256, CI=8, H=2, W=2, CO=64, K=3, stride=1, padding=1, dilation=1, pool=False)
    assert conv_mixpool.split_k(short, gpu, False) == 1  # 3 chunks: too short a reduction to share
    wide = _common.ConvGeometry(B=256, CI=64, H=17, W=17, CO=64, K=3, stride=1, padding=1, dilation=1, pool=False)
    assert conv_mixpool.split_k(wide, gpu, False) == 1  # 1,156 tiles fill the GPU already


def test_autotune_setup():
    """One deterministic config on the interpreter; on a GPU, pruning keeps tiles that fit the problem."""
    if interpreting():
        assert len(_common.tune_configs()) == 1
    gpu = _common.make_configs(_common.GPU_CONV_CONFIGS)

    def kept(pool: bool, **args) -> list[dict]:
        configs = [_common._config_dict(c) for c in _common.prune_block_configs(gpu, args, K=3, POOL=pool)]
        return sorted(configs, key=lambda c: sorted(c.items()))

    def as_sorted(configs) -> list[dict]:
        return sorted(configs, key=lambda c: sorted(c.items()))

    layer1 = kept(True, CI=3, CO=32)  # paper layer 1: R = 27, CO = 32
    assert layer1 and all(c["BLOCK_CO"] <= 32 and c["BLOCK_R"] <= 32 for c in layer1)
    assert kept(True, CI=128, CO=256) == as_sorted(_common.GPU_POOLED_CONV_CONFIGS)  # each kind: its own list
    assert kept(False, CI=128, CO=256) == as_sorted(_common.GPU_PLAIN_CONV_CONFIGS)
    assert kept(True, CI=1, CO=1) == [_common.GPU_POOLED_CONV_CONFIGS[-1]]  # never empty: the smallest tile
    assert kept(False, CI=1, CO=1) == [_common.GPU_PLAIN_CONV_CONFIGS[-1]]


def test_triton_config_exceptions(monkeypatch):
    """Each exception names a config its kernel holds and applies to its release, dtypes and precisions only: under
    triton 3.6 the Gabor layer's small tile is replaced (per dtype), the conv backward's 16 x 128 tile is dropped
    for fp32 and the dilated weight gradient reduces over 32 pixels per step (16 in IEEE fp32); under triton 3.9
    the conv backward's 16 x 128 tile is dropped for IEEE fp32 only, and every other list is the default."""
    from fusionkern.kernels import dilated

    wgrad_default = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)
    for e in _common.TRITON_CONFIG_EXCEPTIONS:
        assert e.release.count(".") == 1 and all(p.isdigit() for p in e.release.split(".")), e
        assert e.why and e.use != e.config and e.dtypes and set(e.precisions) <= {"ieee", "tf32"}, e
        assert e.config == wgrad_default if "wgrad" in e.kernel else e.config in _common.GPU_CONV_CONFIGS, e
        for dtype in e.dtypes:  # at most one exception per config, dtype and precision (else the order would decide)
            for precision in e.precisions:
                _common.apply_config_exceptions(e.kernel, [e.config], dtype, precision, e.release)

    def kept(kernel: str, dtype: torch.dtype, precision: str, ci: int, co: int) -> list[dict]:
        x = torch.empty(0, dtype=dtype)
        uses = [e.use for e in _common.TRITON_CONFIG_EXCEPTIONS if e.use and "wgrad" not in e.kernel]
        configs = _common.make_configs(list(_common.GPU_CONV_CONFIGS) + [c for i, c in enumerate(uses)
                                                                         if c not in uses[:i]])  # fmt: skip
        pruned = _common.prune_block_configs(configs, {"x_ptr": x, "CI": ci, "CO": co}, kernel=kernel, K=3,
                                             POOL=True, DOT_PRECISION=precision)  # fmt: skip
        return [_common._config_dict(c) for c in pruned]

    def wgrad(dtype: torch.dtype, precision: str) -> int:
        return dilated._wgrad_blocks(4096, 64, 64, torch.device("cuda"), dtype, precision)[0]

    small, wide = _common.GPU_POOLED_CONV_CONFIGS[-1], _common.GPU_POOLED_CONV_CONFIGS[1]
    monkeypatch.setattr(_common, "TRITON_RELEASE", "3.9")
    for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee")):
        assert kept("_gabor_conv_fwd_kernel", dtype, precision, 3, 32) == [small]
        assert (wide in kept("_conv_mixpool_bwd_kernel", dtype, precision, 64, 128)) == (
            (dtype, precision) != (torch.float32, "ieee")
        )
        assert wgrad(dtype, precision) == 64
    monkeypatch.setattr(_common, "TRITON_RELEASE", "3.6")
    assert kept("_gabor_conv_fwd_kernel", torch.bfloat16, "ieee", 3, 32) == [{**small, "BLOCK_R": 32, "num_warps": 8}]
    assert kept("_gabor_conv_fwd_kernel", torch.float16, "ieee", 3, 32) == [{**small, "BLOCK_R": 32, "num_warps": 8}]
    assert kept("_gabor_conv_fwd_kernel", torch.float32, "tf32", 3, 32) == [{**small, "num_warps": 8, "num_stages": 2}]
    assert kept("_gabor_conv_bwd_kernel", torch.bfloat16, "ieee", 3, 32) == [{**small, "num_warps": 8, "num_stages": 2}]
    assert kept("_conv_mixpool_fwd_kernel", torch.float32, "tf32", 3, 32) == [small]  # other kernels: unchanged
    assert wide not in kept("_conv_mixpool_bwd_kernel", torch.float32, "tf32", 64, 128)
    assert small in kept("_conv_mixpool_bwd_kernel", torch.float32, "tf32", 64, 128)
    assert wide not in kept("_conv_mixpool_bwd_kernel", torch.float32, "ieee", 64, 128)
    assert wide in kept("_conv_mixpool_bwd_kernel", torch.bfloat16, "ieee", 64, 128)
    assert [wgrad(torch.float32, "tf32"), wgrad(torch.bfloat16, "ieee"), wgrad(torch.float32, "ieee")] == [32, 32, 16]
    assert dilated._wgrad_blocks(4096, 32, 64, torch.device("cuda"), torch.float32, "tf32")[0] == 64  # other tiles
    assert dilated._wgrad_blocks(4096, 64, 64, torch.device("cpu"), torch.float32, "tf32")[0] != 32  # interpreter


def test_size_bucket():
    """The autotune key's batch-dependent extent: the output pixel count rounded up to a power of two."""
    assert [_common.size_bucket(n) for n in (0, 1, 2, 3, 16, 17, 27, 32, 33, 9 * 1000)] == [
        1, 1, 2, 4, 16, 32, 32, 32, 64, 16384
    ]  # fmt: skip
    geo = _common.ConvGeometry(B=5, CI=3, H=7, W=9, CO=4, K=3, stride=1, padding=1, dilation=1, pool=True)
    assert geo.n_pixels == 5 * 3 * 4 and geo.m_bucket == 64


@pytest.mark.parametrize("op", ["gabor", "conv"])
def test_autotune_key_buckets_the_batch_and_keeps_the_flags(op, monkeypatch):
    """Two batch sizes whose output pixel counts share a power-of-two bucket share one tuned config; a new bucket, or
    any flag that changes the kernel's work (ReLU, folded BN, bias, grid, dot precision, dtype), gets its own key.

    The forward autotuner holds two configs of which pruning keeps one, so Triton computes and caches the key
    without benchmarking; the key is read back from its cache.
    """
    module, fwd, bwd = (gabor_conv, "_gabor_conv_fwd", "_gabor_conv_bwd") if op == "gabor" else (
        conv_mixpool, "_conv_mixpool_fwd", "_conv_mixpool_bwd")  # fmt: skip
    tuner = getattr(module, fwd)
    # the backward keys on the same arguments (the conv forward adds its split-K count and reduction order)
    assert getattr(module, bwd).keys == [k for k in tuner.keys if k not in ("SPLIT_K", "CHANNELS_INNER")]
    too_wide = dict(BLOCK_P=16, BLOCK_CO=1024, BLOCK_R=16, num_warps=1, num_stages=1)  # pruned at 4 channels
    monkeypatch.setattr(tuner, "configs", _common.make_configs([_common.INTERPRETER_CONV_CONFIG, too_wide]))
    monkeypatch.setattr(tuner, "cache", {})
    torch.manual_seed(11)

    def key_of(batch: int = 3, dtype: torch.dtype = torch.float32, **options) -> tuple:
        options = {"allow_tf32": False, **options}
        x = torch.randn(batch, 3, 6, 6, device=DEVICE, dtype=dtype)  # pooled output 3 x 3: 9 pixels per site
        if options.pop("channels_last", False):
            x = x.to(memory_format=torch.channels_last)
        tuner.cache.clear()
        with torch.no_grad():
            if op == "gabor":
                params = [p.to(DEVICE, dtype) for p in gabor_params(4, 3, 3)]
                gabor_conv2d(x, *params, 3, 1, 1, relu=options.pop("relu", True), pool_alpha=0.5, **options)
            else:
                w = torch.randn(4, 3, 3, 3, device=DEVICE, dtype=dtype)
                bias = torch.randn(4, device=DEVICE, dtype=dtype) if options.pop("bias", False) else None
                conv2d_mixpool(x, w, bias, 0.5, **options)
        (key,) = tuner.cache
        return key

    base = key_of()
    assert key_of(batch=2) == base  # 18 and 27 output pixels: both in the 32 bucket
    assert key_of(batch=4) != base  # 36: the 64 bucket
    scale_shift = (torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE))
    variants = {
        "no relu": dict(relu=False),
        "folded bn": dict(bn=scale_shift),
        "tf32": dict(allow_tf32=True),
        "float64": dict(dtype=torch.float64),
        **({"legacy grid": dict(grid="legacy")} if op == "gabor"
           else {"bias": dict(bias=True), "channels-last": dict(channels_last=True)}),  # its own reduction order
    }  # fmt: skip
    keys = {name: key_of(**kw) for name, kw in variants.items()}
    assert all(k != base for k in keys.values()), [name for name, k in keys.items() if k == base]
    assert len(set(keys.values())) == len(keys)


# --------------------------------------------------------------------------------------------------------------
# Unsupported options raise a clear error naming the parameter
# --------------------------------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def test_unsupported_option_error_is_a_value_error():
    assert issubclass(UnsupportedOptionError, ValueError)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: conv2d_mixpool(_x(1, 4, 6, 6), _x(4, 2, 3, 3), None, 0.5, groups=3), "^groups: 3 groups must divide"),
        (lambda: conv2d_mixpool(_x(1, 4, 6, 6), _x(4, 2, 3, 3), None, 0.5, groups=0), "^groups: must be a positive"),
        (lambda: conv2d_mixpool(_x(1, 4, 6, 6), _x(4, 2, 3, 3), None, _x(3), groups=2), "^alpha: .* a \\(2,\\) tensor"),
        (lambda: conv2d_mixpool(_x(1, 4, 6, 6), _x(4, 2, 3, 3), None, 0.5), "^weight: has 2 input channels"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 1), None, 0.5), "^weight: non-square"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), None, 0.5, stride=(1, 2)), "^stride"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), None, 0.5, padding="same"), "^padding"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3, dtype=torch.float64), None, 0.5), "^weight: dtype"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), _x(3), 0.5), "^bias"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), None, _x(2)), "^alpha"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6).int(), _x(4, 2, 3, 3).int(), None, 0.5), "^x: dtype int32"),
        (lambda: conv2d_mixpool(_x(2, 6, 6), _x(4, 2, 3, 3), None, 0.5), "^x: expected a 4-D"),
        (lambda: conv2d_mixpool(_x(1, 2, 1, 6), _x(4, 2, 1, 1), None, 0.5, padding=0), "^x: conv output 1 x 6"),
        (lambda: conv2d_mixpool(_x(1, 2, 2, 2), _x(4, 2, 3, 3), None, 0.5, padding=0), "^x: input 2 x 2"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3).to("meta"), None, 0.5), "^weight: is on meta"),
        (lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), None, 0.5, bn=(_x(4),)), "^bn"),
        (
            lambda: conv2d_mixpool(_x(1, 2, 6, 6), _x(4, 2, 3, 3), None, 0.5, bn=(_x(4).requires_grad_(), _x(4))),
            "^bn scale: a folded BatchNorm",
        ),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), *[_x(4, 2)] * 4, 3, groups=3), "^groups: 3 groups must divide"),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), *[_x(4, 2)] * 4, 3, groups=2), "^x: has 2 channels .* for 2 group"),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), *[_x(4, 2)] * 4, (3, 5)), "^kernel_size"),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), *[_x(4, 2)] * 4, 3, dilation=(2, 1)), "^dilation"),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), *[_x(4, 2)] * 4, 3, grid="offset"), "^grid"),
        (lambda: gabor_conv2d(_x(1, 3, 6, 6), *[_x(4, 2)] * 4, 3), "^x: has 3 channels"),
        (lambda: gabor_conv2d(_x(1, 2, 6, 6), _x(4, 2), _x(4, 2), _x(4, 3), _x(4, 2), 3), "^sigma"),
        (lambda: fold_bn(nn.BatchNorm2d(3)), "^bn: is in training mode"),
        (lambda: fold_bn(nn.BatchNorm2d(3, track_running_stats=False).eval()), "^bn: has no running statistics"),
        (lambda: fold_bn(nn.LayerNorm(3)), "^bn: expected a BatchNorm"),
    ],
    ids=[
        "groups", "groups-zero", "group-alpha-shape", "channel-mismatch", "non-square-kernel", "non-square-stride",
        "string-padding", "dtype-mix",
        "bias-shape", "alpha-shape", "int-dtype", "3d-input", "too-small-to-pool", "too-small-to-convolve",
        "device-mix", "bn-not-a-pair", "bn-requires-grad", "gabor-groups", "gabor-group-channels",
        "gabor-non-square-kernel",
        "gabor-non-square-dilation", "gabor-grid", "gabor-channel-mismatch", "gabor-param-shape", "fold-bn-train",
        "fold-bn-no-stats", "fold-bn-not-bn",
    ],
)  # fmt: skip
def test_unsupported_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "stage, channels, exc, match",
    [
        (lambda: ConvStage(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3), None, "pool_bn"), 3, ValueError, "^pool"),
        (lambda: ConvStage(nn.Conv2d(3, 4, 3, padding=1), MixPool2d(3, 3), None, "pool_bn"), 3, ValueError, "^pool"),
        (lambda: ConvStage(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), None, "pool_bn"), 3, ValueError, "^pool"),
        (lambda: ConvStage(nn.Conv2d(3, 4, 3, padding="same"), None, None, "pool_bn"), 3, ValueError,
         "^conv.padding"),
        (lambda: ConvStage(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), None, None, "pool_bn"), 3,
         ValueError, "^conv.padding_mode"),
        (lambda: ConvStage(nn.Conv2d(4, 4, 3, padding=1, groups=2), None, None, "pool_bn"), 6, ValueError,
         "^weight: has 2 input channels per group"),
        (lambda: ConvStage(nn.Linear(3, 4), None, None, "pool_bn"), 3, NotImplementedError,
         "GaborConv2d and nn.Conv2d"),
        (lambda: nn.Conv2d(3, 4, 3), 3, NotImplementedError, "runs a ConvStage"),
    ],
    ids=["maxpool-3", "mixpool-3", "avgpool", "same-padding", "reflect-padding", "groups-channels", "linear",
         "not-a-stage"],
)  # fmt: skip
def test_stage_forward_unsupported(stage, channels, exc, match):
    with pytest.raises(exc, match=match):
        stage_forward(stage().to(DEVICE), _x(1, channels, 6, 6))


# --------------------------------------------------------------------------------------------------------------
# sm_90 compilation of every kernel (no GPU needed)
# --------------------------------------------------------------------------------------------------------------

# A small tile keeps the compile quick; the autotune list is compiled by test_sm90_compile_autotune_configs.
_COMPILE_TILE = dict(BLOCK_P=32, BLOCK_CO=32, BLOCK_R=16)
_CONV_CONSTEXPRS = dict(K=3, RELU=True, POOL=True, BN=True, ACC_DTYPE="tl.float32", DOT_PRECISION="ieee")
_DATA_PTRS = {"x_ptr", "out_ptr", "grad_out_ptr", "grad_z_ptr", "w_ptr", "bias_ptr", "grad_w_ptr"}
_BYTE_PTRS = {"code_ptr"}  # the pooling record's byte per value

KERNELS = {
    # (module, kernel name, constexprs, pointers that carry the data dtype)
    "gabor_fwd": (gabor_conv, "_gabor_conv_fwd_kernel", {**_CONV_CONSTEXPRS, "LEGACY": False, "RECORD": True},
                  _DATA_PTRS),
    "gabor_bwd": (gabor_conv, "_gabor_conv_bwd_kernel", {**_CONV_CONSTEXPRS, "LEGACY": False}, _DATA_PTRS),
    "gabor_bank": (gabor_conv, "_gabor_bank_kernel", dict(K=3, LEGACY=False, BLOCK_R=32, BLOCK_CO=32), _DATA_PTRS),
    "gabor_param_grad": (
        gabor_conv, "_gabor_param_grad_kernel", dict(K=3, LEGACY=False, BLOCK_N=64, BLOCK_T=16), _DATA_PTRS
    ),
    "conv_mixpool_fwd": (conv_mixpool, "_conv_mixpool_fwd_kernel",
                         {**_CONV_CONSTEXPRS, "HAS_BIAS": True, "RECORD": True, "CHANNELS_INNER": False}, _DATA_PTRS),
    "conv_mixpool_fwd_nhwc": (conv_mixpool, "_conv_mixpool_fwd_kernel",
                              {**_CONV_CONSTEXPRS, "HAS_BIAS": True, "RECORD": True, "CHANNELS_INNER": True},
                              _DATA_PTRS),
    "conv_mixpool_bwd": (conv_mixpool, "_conv_mixpool_bwd_kernel", {**_CONV_CONSTEXPRS, "HAS_BIAS": True},
                         _DATA_PTRS),
    "pool_record_bwd": (_common, "_pool_record_bwd_kernel",
                        dict(RELU=True, POOL=True, BN=True, HAS_BIAS=True, ACC_DTYPE="tl.float32", BLOCK_P=32,
                             BLOCK_C=32), _DATA_PTRS),
}  # fmt: skip


def kernel_spec(key: str, dtype: str, tile: dict | None = None, label: str | None = None) -> KernelSpec:
    module, name, constexprs, data_ptrs = KERNELS[key]
    fn = getattr(module, name)
    constexprs = dict(constexprs)
    if {"BLOCK_P", "BLOCK_R"} <= set(fn.arg_names):  # the convolutions' tile
        constexprs.update(tile or _COMPILE_TILE)
    signature = {
        a: "constexpr" if a in constexprs
        else ("*" + ("u8" if a in _BYTE_PTRS else dtype if a in data_ptrs else "fp32")) if a.endswith("_ptr")
        else "i32"
        for a in fn.arg_names
    }  # fmt: skip
    return KernelSpec(module.__name__, name, signature, constexprs, label or f"{key}[{dtype}]")


def test_every_kernel_has_a_compile_spec():
    jitted = {
        f"{m.__name__}.{n}" for m in (gabor_conv, conv_mixpool, _common) for n, v in vars(m).items()
        if type(v).__name__ in ("JITFunction", "InterpretedFunction") and n.endswith("_kernel")
    }  # fmt: skip
    assert jitted == {f"{m.__name__}.{n}" for m, n, _, _ in KERNELS.values()}


@pytest.fixture(scope="module")
def sm90_results():
    specs = [kernel_spec(key, dtype) for key in KERNELS for dtype in ("fp32", "bf16")]
    return compile_sm90_isolated(specs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("key", list(KERNELS))
def test_sm90_compile(sm90_results, key, dtype):
    error = sm90_results[f"{key}[{dtype}]"]
    assert error is None, f"{key} does not compile for sm_90 ({dtype}): {error}"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FUSIONKERN_SM90_ALL_CONFIGS") != "1",
    reason="72 sm_90 compiles (minutes); set FUSIONKERN_SM90_ALL_CONFIGS=1 to run",
)
def test_sm90_compile_autotune_configs():
    """Every GPU autotune config of the conv kernels lowers for sm_90 (fp32 IEEE, TF32 and bf16)."""
    specs = []
    for key in ("gabor_fwd", "gabor_bwd", "conv_mixpool_fwd", "conv_mixpool_bwd"):
        for i, cfg in enumerate(_common.GPU_CONV_CONFIGS):
            tile = {k: cfg[k] for k in ("BLOCK_P", "BLOCK_CO", "BLOCK_R")}
            for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee")):
                spec = kernel_spec(key, dtype, tile, f"{key}[{dtype},{precision},config{i}]")
                specs.append(KernelSpec(spec.module, spec.kernel, spec.signature,
                                        {**spec.constexprs, "DOT_PRECISION": precision}, spec.label))  # fmt: skip
    failures = {k: v for k, v in compile_sm90_isolated(specs).items() if v is not None}
    assert not failures, failures


# --------------------------------------------------------------------------------------------------------------
# Full sweep on a GPU (benchmarks/gpu_check.sh runs these with TRITON_INTERPRET=0)
# --------------------------------------------------------------------------------------------------------------

# (label, C_in, C_out, H = W, gabor): the branch's pooled layers at the paper (256 px) and native (35 px) sizes
GPU_LAYERS = [
    ("paper L1", 3, 32, 256, True),
    ("paper L2", 32, 64, 128, False),
    ("paper L3", 64, 128, 64, False),
    ("paper L4", 128, 256, 32, False),
    ("native L1", 3, 32, 35, True),
    ("native L2", 32, 64, 17, False),
    ("native L3", 64, 128, 8, False),
]


def sweep_layer(layer: tuple, tol: str, batch: int, device: str, channels_last: bool = False) -> None:
    """One pooled branch layer (Gabor or conv) at full size: forward and every gradient, scale-relative tolerances;
    ``channels_last``: the input NHWC (the conv layers then reduce over channel runs)."""
    _, CI, CO, HW, gabor = layer
    t = DTYPES[tol]
    atol = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 3e-2, "fp16": 1e-2}[tol]
    rtol = 1e-4 if tol == "fp32" else 1e-2
    # A real bug gives O(1) relative error; near-ties give about 1e-3 at batch 64 (tens of flipped windows).
    norm_tol = {"fp32": 5e-3, "tf32": 1e-2, "bf16": 3e-2, "fp16": 2e-2}[tol]

    def compare(name, a, e):
        if name == "output":  # elementwise, atol relative to the tensor's max-abs
            assert_match(name, a, e, atol, rtol, scaled=True)
        else:  # see assert_norm_close: argmax near-ties at this scale
            assert_norm_close(name, a, e, norm_tol)

    def fresh(v, dtype=None):
        return v.detach().to(device, dtype or v.dtype, copy=True).requires_grad_(True)

    torch.manual_seed(0)
    x = torch.randn(batch, CI, HW, HW, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    alpha = torch.tensor(0.8, device=device)
    if gabor:
        params = [p.to(device) for p in gabor_params(CO, CI, 3)]
        kernel = [fresh(x, t.dtype), *[fresh(p) for p in params], fresh(alpha)]
        ref = [fresh(x.to(t.dtype), torch.float32), *[fresh(p) for p in params], fresh(alpha)]
        names = ["x", "freq", "theta", "sigma", "psi", "alpha"]
        y = gabor_conv2d(kernel[0], *kernel[1:5], 3, 1, 1, relu=True, pool_alpha=kernel[5], allow_tf32=t.allow_tf32)
        with cudnn_fp32_precision(t.allow_tf32):
            bank = gabor_bank(*ref[1:5], 3)
            if t.dtype != torch.float32:
                bank = bank + (bank.to(t.dtype).float() - bank).detach()
            out_ref = mixpool_ref(F.relu(F.conv2d(ref[0], bank, None, 1, 1)), ref[5])
    else:
        w = torch.randn(CO, CI, 3, 3, device=device) / math.sqrt(CI * 9)
        b = torch.randn(CO, device=device) * 0.1
        kernel = [fresh(x, t.dtype), fresh(w, t.dtype), fresh(b, t.dtype), fresh(alpha)]
        ref = [fresh(v.to(t.dtype), torch.float32) for v in (x, w, b)] + [fresh(alpha)]
        names = ["x", "weight", "bias", "alpha"]
        y = conv2d_mixpool(*kernel, allow_tf32=t.allow_tf32)
        with cudnn_fp32_precision(t.allow_tf32):
            out_ref = mixpool_ref(F.relu(F.conv2d(ref[0], ref[1], ref[2], 1, 1)), ref[3])
    compare("output", y, out_ref)
    go = torch.randn_like(out_ref)
    with cudnn_fp32_precision(t.allow_tf32):
        gr = grads_of(out_ref, ref, go)
    gk = grads_of(y, kernel, go)
    for name, a, e in zip(names, gk, gr):
        compare(f"grad {name}", a, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(interpreting(), reason="TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 on the GPU machine")
class TestGPUSweep:
    """Paper and native layer shapes, batch 64, fp32 / tf32 / bf16 / fp16, forward and every gradient."""

    @pytest.mark.parametrize("tol", [dtype_param(n) for n in ("fp32", "tf32", "bf16", "fp16")])
    @pytest.mark.parametrize("layer", GPU_LAYERS, ids=[layer[0] for layer in GPU_LAYERS])
    def test_layer(self, layer, tol):
        sweep_layer(layer, tol, batch=64, device="cuda")

    @pytest.mark.parametrize("tol", [dtype_param(n) for n in ("tf32", "bf16")])
    @pytest.mark.parametrize("layer", [x for x in GPU_LAYERS if not x[4]], ids=[x[0] for x in GPU_LAYERS if not x[4]])
    def test_layer_channels_last(self, layer, tol):
        sweep_layer(layer, tol, batch=64, device="cuda", channels_last=True)
