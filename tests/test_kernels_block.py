"""Kernels 3 and 4: the dilated block and channel attention against the reference layers, forward and backward.

CPU runs use Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py) on tiny shapes; the ``gpu`` class runs
the paper and native shapes on a CUDA device (``TRITON_INTERPRET=0 pytest -m gpu``).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from fusionkern.kernels import attention as att_mod
from fusionkern.kernels import dilated as dil_mod
from fusionkern.kernels._common import KernelSpec, compile_sm90_isolated, interpreting
from fusionkern.kernels.attention import channel_attention, channel_pool
from fusionkern.kernels.dilated import dilated_avg_block, fold_bn, tap_plan
from fusionkern.models.fused import attention_forward, block_forward
from fusionkern.models.layers import ChannelAttention, DilatedAvgBlock

# dtype -> (atol, rtol). Low-precision rows compare against a float64 reference run on the same rounded inputs.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
# The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 storage, so the dilated kernel's bf16
# path can only be checked on a GPU (and by the sm_90 compile test below).
INTERPRETER_BF16_DOT = "Triton's interpreter computes tl.dot on bfloat16 bit patterns as integers; checked on GPU"


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, reported in every mismatch message so a failure can be replayed."""
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, seed: int, atol=None
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, reporting the first bad index.

    ``atol`` overrides the dtype's absolute tolerance (a number, or a tensor broadcast against ``expected``).
    """
    default_atol, rtol = TOL[dtype]
    atol = default_atol if atol is None else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad &= ~(a.isnan() & e.isnan())
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what} ({dtype}, seed {seed}): {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
            f"got {a[idx].item():.8g}, expected {e[idx].item():.8g} (atol {_at(atol, idx):.3g}, rtol {rtol}); "
            f"max abs diff {(a - e).abs().max().item():.3g}"
        )


def _at(atol, idx) -> float:
    return float(atol[idx]) if isinstance(atol, torch.Tensor) else float(atol)


def _make_block(c_in, c_out, dilations, dtype=torch.float32) -> DilatedAvgBlock:
    block = DilatedAvgBlock(c_in, dilations, out_channels=c_out)
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 2.0)
    return block.to(dtype)


def _run_block(block, x, g, use_kernel: bool):
    """Forward and backward of one block with one shared grad_output; returns output, x grad, param grads, and
    dL/dH (the gradient reaching the BatchNorm's input)."""
    x = x.detach().clone().requires_grad_()
    seen = {}

    def keep_grad(_module, inputs):
        if inputs[0].requires_grad:
            inputs[0].register_hook(lambda grad: seen.setdefault("grad_h", grad.detach().clone()))

    handle = block.bn.register_forward_pre_hook(keep_grad)
    try:
        y = block_forward(block, x) if use_kernel else block(x)
    finally:
        handle.remove()
    y.backward(g)
    grads = {name: p.grad.detach().clone() for name, p in block.named_parameters()}
    return y.detach(), x.grad.detach(), grads, seen.get("grad_h")


def _compare_block(kernel_block, ref_block, x, g, dtype, seed):
    y_k, gx_k, gp_k, _ = _run_block(kernel_block, x, g, True)
    y_r, gx_r, gp_r, grad_h = _run_block(ref_block, x, g, False)
    assert_close(y_k, y_r, dtype, "output", seed)
    assert_close(gx_k, gx_r, dtype, "grad x", seed)
    for name in gp_r:
        atol = None
        if ref_block.training and name.startswith("convs.") and name.endswith(".bias") and grad_h is not None:
            # A conv bias before a training-mode BatchNorm has an exact gradient of zero (BN removes any per-channel
            # shift), so both sides are sums of dL/dH that cancel to rounding noise; the noise scales with the sum
            # of the magnitudes, not with the (near-zero) result.
            atol = TOL[dtype][0] + TOL[dtype][1] * grad_h.abs().sum(dim=(0, 2, 3)).double()
        assert_close(gp_k[name], gp_r[name], dtype, f"grad {name}", seed, atol=atol)
    for name, buf in ref_block.named_buffers():
        assert_close(dict(kernel_block.named_buffers())[name].double(), buf.double(), torch.float32, name, seed)


# ---------------------------------------------------------------------------------------------------- dilated block

BLOCK_SHAPES = [  # (B, C_in, C_out, H, W, dilations)
    pytest.param(2, 1, 1, 2, 2, (1, 2), id="minimal"),  # 8 values per channel: training BN on 2 is ill-conditioned
    pytest.param(1, 3, 4, 6, 6, (1, 3, 6, 9), id="batch 1"),
    pytest.param(2, 3, 5, 7, 9, (1, 3, 6, 9), id="odd H and W"),
    pytest.param(2, 5, 7, 5, 5, (1, 3, 6, 9), id="channels not a multiple of the block"),
    pytest.param(2, 4, 4, 4, 4, (1, 3, 6, 9), id="map smaller than the dilation"),
    pytest.param(2, 8, 8, 4, 4, (1, 2, 3), id="native dilations (1,2,3)"),
]


@pytest.mark.parametrize("b, c_in, c_out, h, w, dilations", BLOCK_SHAPES)
def test_block_train_mode_matches_reference(b, c_in, c_out, h, w, dilations, seed):
    ref = _make_block(c_in, c_out, dilations).train()
    kern = copy.deepcopy(ref)
    x = torch.randn(b, c_in, h, w)
    g = torch.randn(b, c_out, h, w)
    _compare_block(kern, ref, x, g, torch.float32, seed)  # includes the BN running statistics


@pytest.mark.parametrize(
    "b, c_in, c_out, h, w, dilations",
    [
        pytest.param(2, 3, 5, 4, 5, (1, 3, 6, 9), id="paper dilations, small map"),
        pytest.param(2, 6, 6, 4, 4, (1, 2, 3), id="native dilations (1,2,3)"),
    ],
)
def test_block_eval_mode_folds_bn(b, c_in, c_out, h, w, dilations, seed):
    ref = _make_block(c_in, c_out, dilations).eval()  # non-trivial running statistics and affine
    kern = copy.deepcopy(ref)
    x = torch.randn(b, c_in, h, w)
    g = torch.randn(b, c_out, h, w)
    _compare_block(kern, ref, x, g, torch.float32, seed)  # gradients reach bn.weight / bn.bias through fold_bn
    with torch.no_grad():  # the inference path: one launch, nothing saved
        assert_close(block_forward(kern, x), ref(x), torch.float32, "no-grad output", seed)


def test_block_without_running_stats_uses_batch_statistics_in_eval(seed):
    ref = DilatedAvgBlock(3, (1, 2))
    ref.bn = torch.nn.BatchNorm2d(3, track_running_stats=False)
    ref.eval()
    kern = copy.deepcopy(ref)
    _compare_block(kern, ref, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.float32, seed)


def test_multiple_tiles_in_every_dimension(monkeypatch, seed):
    # Force 16-wide tiles so pixels, input channels (17 = 2 K steps) and output channels (17 = 2 tiles) all span
    # several blocks, with masked remainders.
    monkeypatch.setattr(dil_mod, "_conv_blocks", lambda *a: (16, 16, 16, 1, 1))
    monkeypatch.setattr(dil_mod, "_wgrad_blocks", lambda *a: (16, 16, 16, 1, 1))
    ref = _make_block(17, 17, (1, 2)).train()
    kern = copy.deepcopy(ref)
    _compare_block(kern, ref, torch.randn(1, 17, 3, 6), torch.randn(1, 17, 3, 6), torch.float32, seed)


def test_channels_last_input_and_grad(seed):
    ref = _make_block(4, 4, (1, 3, 6, 9)).train()
    kern = copy.deepcopy(ref)
    x = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last)  # explicit strides, not NCHW
    g = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last)
    _compare_block(kern, ref, x, g, torch.float32, seed)
    y = dilated_avg_block(x, [c.weight for c in kern.convs], [c.bias for c in kern.convs], kern.dilations)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dilated_low_precision(dtype, seed):
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip(INTERPRETER_BF16_DOT)
    dil = (1, 3, 6, 9)
    x = torch.randn(2, 4, 5, 6).to(dtype)
    ws = [(torch.randn(5, 4, 3, 3) * 0.2).to(dtype) for _ in dil]
    bs = [(torch.randn(5) * 0.1).to(dtype) for _ in dil]
    scale, shift = torch.rand(5) + 0.5, torch.randn(5) * 0.1
    g = torch.randn(2, 5, 5, 6).to(dtype)

    def run(kernel: bool):
        cast = (lambda t: t.detach().clone()) if kernel else (lambda t: t.detach().double())
        xx = cast(x).requires_grad_()
        ww = [cast(w).requires_grad_() for w in ws]
        bb = [cast(b).requires_grad_() for b in bs]
        if kernel:
            y = dilated_avg_block(xx, ww, bb, dil, bn=(scale, shift), relu=True)
        else:
            h = [F.conv2d(xx, w_, b_, padding=d, dilation=d) for w_, b_, d in zip(ww, bb, dil)]
            pre = h[0] + torch.stack(h[1:]).mean(0)
            y = F.relu(pre * cast(scale).view(1, -1, 1, 1) + cast(shift).view(1, -1, 1, 1))
        y.backward(cast(g))
        return y, xx.grad, [w.grad for w in ww], [b.grad for b in bb]

    got = run(kernel=True)
    ref = run(kernel=False)
    assert got[0].dtype == dtype
    assert_close(got[0], ref[0], dtype, "output", seed)
    assert_close(got[1], ref[1], dtype, "grad x", seed)
    for j in range(len(dil)):
        assert_close(got[2][j], ref[2][j], dtype, f"grad w[{j}]", seed)
        assert_close(got[3][j], ref[3][j], dtype, f"grad b[{j}]", seed)


def test_dilated_gradcheck_float64(seed):
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)  # odd width, dilation 3 reaches rows only
    ws = [torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bs = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    scale = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, scale, shift, *params):
        return dilated_avg_block(x, params[:3], params[3:], (1, 2, 3), bn=(scale, shift), relu=True)

    assert torch.autograd.gradcheck(fn, (x, scale, shift, *ws, *bs), fast_mode=True)


@pytest.mark.parametrize("which", ["no biases, all gradients", "biases only", "one weight only"])
def test_partial_gradients_and_bias_free_branches(which, seed):
    dil = (1, 2, 3)
    x = torch.randn(2, 3, 4, 5)
    ws = [torch.randn(4, 3, 3, 3) for _ in dil]
    bs = None if which.startswith("no biases") else [torch.randn(4) for _ in dil]
    g = torch.randn(2, 4, 4, 5)
    results = []
    for kernel in (True, False):
        xx = x.clone().requires_grad_(which.endswith("all gradients"))
        ww = [w.clone().requires_grad_(which != "biases only" and (j == 1 or which != "one weight only"))
              for j, w in enumerate(ws)]  # fmt: skip
        bb = None if bs is None else [b.clone().requires_grad_(which == "biases only") for b in bs]
        if kernel:
            y = dilated_avg_block(xx, ww, bb, dil, relu=False)
        else:
            h = [F.conv2d(xx, w_, None if bb is None else bb[j], padding=d, dilation=d)
                 for j, (w_, d) in enumerate(zip(ww, dil))]  # fmt: skip
            y = h[0] + torch.stack(h[1:]).mean(0)
        y.backward(g)
        grads = [t.grad for t in (xx, *ww, *(bb or []))]
        results.append((y.detach(), grads))
    assert_close(results[0][0], results[1][0], torch.float32, "output", seed)
    for j, (a, b) in enumerate(zip(results[0][1], results[1][1])):
        assert (a is None) == (b is None), f"gradient {j}: kernel {a is not None}, reference {b is not None}"
        if a is not None:
            assert_close(a, b, torch.float32, f"gradient {j}", seed)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("b, c_in, c_out, h, w, dilations", [
    pytest.param(2, 3, 5, 7, 9, (1, 3, 6, 9), id="odd H and W"),
    pytest.param(1, 5, 7, 4, 4, (1, 2, 3), id="batch 1, native dilations, channels off the block"),
])  # fmt: skip
def test_grouped_blocks_equal_blocks_one_by_one(b, c_in, c_out, h, w, dilations, train, seed):
    """Three blocks (a FusionNet's branches) as one grouped launch (:func:`grouped_blocks_forward`) against each
    reference block on its own channels: output, input gradient, every parameter gradient, running statistics."""
    from fusionkern.models.fused import grouped_blocks_forward

    G = 3
    refs = [_make_block(c_in, c_out, dilations) for _ in range(G)]
    kers = [copy.deepcopy(r) for r in refs]
    for blk in refs + kers:
        blk.train(train)
    x = torch.randn(b, G * c_in, h, w)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = torch.cat([r(xr[:, g * c_in : (g + 1) * c_in]) for g, r in enumerate(refs)], 1)
    y_ker = grouped_blocks_forward(kers, xk)
    assert_close(y_ker, y_ref, torch.float32, "output", seed)
    go = torch.randn_like(y_ref)
    y_ref.backward(go)
    y_ker.backward(go)
    assert_close(xk.grad, xr.grad, torch.float32, "grad x", seed)
    for g, (k, r) in enumerate(zip(kers, refs)):
        kp = dict(k.named_parameters())
        for name, p in r.named_parameters():
            # conv biases before a training BN have a true gradient of zero: compare at the scale of the weights'
            atol = 1e-4 if (train and name.startswith("convs.") and name.endswith(".bias")) else None
            assert_close(kp[name].grad, p.grad, torch.float32, f"{g}.grad {name}", seed, atol=atol)
        for name, buf in r.named_buffers():
            assert_close(dict(k.named_buffers())[name].double(), buf.double(), torch.float32, f"{g}.{name}", seed)


def test_blocks_of_other_shapes_are_not_grouped():
    from fusionkern.models.fused import grouped_blocks_forward

    a, other = _make_block(2, 3, (1, 2)), _make_block(2, 3, (1, 3))
    assert grouped_blocks_forward([a, other], torch.randn(1, 4, 4, 4)) is None


def test_tap_plan_merges_and_drops_taps():
    assert tap_plan((1, 3, 6, 9), 16, 16).num_taps == 1 + 8 * 4  # centre taps of all branches merged
    assert tap_plan((1, 3, 6, 9), 4, 4).num_taps == 1 + 8 * 2  # dilations 6 and 9 read only padding on 4 x 4
    assert tap_plan((1, 2, 3), 4, 4).num_taps == 1 + 8 * 3
    assert tap_plan((2, 2), 8, 8).num_taps == 9  # a repeated dilation shares all its taps
    plan = tap_plan((1, 9), 4, 20)  # rows out of reach, columns within
    assert plan.offsets[0] == (0, 0)
    assert plan.num_taps == 1 + 8 + 2  # (0, -9) and (0, 9) survive


def test_fold_bn_matches_eval_batchnorm(seed):
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    h = torch.randn(2, 5, 3, 3)
    scale, shift = fold_bn(bn)
    assert_close(h * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(h), torch.float32, "folded BN", seed)


def _block_args(c_in=2, c_out=3, dilations=(1, 2)):
    x = torch.randn(1, c_in, 4, 4)
    ws = [torch.randn(c_out, c_in, 3, 3) for _ in dilations]
    bs = [torch.randn(c_out) for _ in dilations]
    return x, ws, bs, dilations


@pytest.mark.parametrize(
    "change, param",
    [
        (lambda a: a.update(x=a["x"][0]), "x"),  # 3-D input
        (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
        (lambda a: a.update(dilations=(1,), weights=a["weights"][:1], biases=a["biases"][:1]), "dilations"),
        (lambda a: a.update(dilations=(0, 1)), "dilations"),
        (lambda a: a.update(dilations=(1.5, 2)), "dilations"),
        (lambda a: a.update(dilations=(1, 2, 3)), "weights"),  # one weight per dilation
        (lambda a: a.update(weights=[torch.randn(3, 2, 5, 5)] * 2), r"weights\[0\]"),  # only 3 x 3 kernels
        (lambda a: a.update(weights=[a["weights"][0], a["weights"][1].double()]), r"weights\[1\]"),
        (lambda a: a.update(biases=a["biases"][:1]), "biases"),
        (lambda a: a.update(biases=[torch.randn(3), torch.randn(4)]), r"biases\[1\]"),
        (lambda a: a.update(bn=(torch.ones(4), torch.zeros(4))), "bn"),
        (lambda a: a.update(bn=torch.nn.BatchNorm2d(3).train()), "bn"),  # training-mode BN cannot be folded
        (lambda a: a.update(bn="batchnorm"), "bn"),
        (lambda a: a.update(relu=1), "relu"),
        (lambda a: a.update(allow_tf32=1), "allow_tf32"),  # True, False or None (follow torch)
    ],
)
def test_dilated_errors_name_the_parameter(change, param):
    x, ws, bs, dil = _block_args()
    args = dict(x=x, weights=ws, biases=bs, dilations=dil)
    change(args)
    with pytest.raises(ValueError, match=rf"^{param}"):
        dilated_avg_block(args.pop("x"), args.pop("weights"), args.pop("biases"), args.pop("dilations"), **args)


def test_block_forward_refuses_other_modules():
    with pytest.raises(ValueError, match="^block"):
        block_forward(torch.nn.Conv2d(2, 2, 3), torch.randn(1, 2, 4, 4))
    block = DilatedAvgBlock(2, (1, 2))
    block.convs[1].padding = (1, 1)  # padding no longer equals the dilation
    with pytest.raises(ValueError, match="^block"):
        block_forward(block, torch.randn(1, 2, 4, 4))


# ---------------------------------------------------------------------------------------------------- attention

ATT_SHAPES = [  # (B, C, H, W)
    pytest.param(1, 1, 1, 1, id="minimal"),
    pytest.param(1, 6, 3, 3, id="batch 1"),
    pytest.param(2, 6, 5, 7, id="odd H and W"),
    pytest.param(2, 7, 4, 4, id="channels not a multiple of the block"),
    pytest.param(2, 8, 1, 1, id="1x1 map"),
]


def _compare_attention(att, f, g, dtype, seed):
    ref = copy.deepcopy(att)
    results = []
    for module, use_kernel in ((att, True), (ref, False)):
        x = f.detach().clone().requires_grad_()
        y = attention_forward(module, x) if use_kernel else module(x)
        y.backward(g)
        results.append((y.detach(), x.grad, [p.grad for p in module.parameters()]))
    (y_k, gf_k, gp_k), (y_r, gf_r, gp_r) = results
    assert_close(y_k, y_r, dtype, "output", seed)
    assert_close(gf_k, gf_r, dtype, "grad f", seed)
    for j, (a, b) in enumerate(zip(gp_k, gp_r)):
        assert_close(a, b, dtype, f"grad mlp weight {j}", seed)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("b, c, h, w", ATT_SHAPES)
def test_attention_matches_reference(b, c, h, w, mode, seed):
    att = ChannelAttention(c)
    att.train(mode == "train")
    _compare_attention(att, torch.randn(b, c, h, w), torch.randn(b, c, h, w), torch.float32, seed)


def test_attention_several_pixel_and_channel_tiles(monkeypatch, seed):
    monkeypatch.setattr(att_mod, "_tiles", lambda c, hw: (4, 8, 1))  # 5 x 5 map = 4 pixel tiles, C = 10 = 3 tiles
    att = ChannelAttention(10)
    _compare_attention(att, torch.randn(2, 10, 5, 5), torch.randn(2, 10, 5, 5), torch.float32, seed)


@pytest.mark.parametrize("block_hw", [4, 16], ids=["ties across tiles", "ties within a tile"])
def test_attention_max_gradient_goes_to_first_argmax(block_hw, monkeypatch, seed):
    monkeypatch.setattr(att_mod, "_tiles", lambda c, hw: (4, block_hw, 1))
    att = ChannelAttention(4)
    f = torch.full((2, 4, 3, 3), 0.7)  # constant map: every position ties
    f[1, 2, 2, 1] = 0.9  # one later maximum...
    f[1, 2, 2, 2] = 0.9  # ...tied with the position after it
    _, idx_ref = F.adaptive_max_pool2d(f, 1, return_indices=True)
    _, _, idx = channel_pool(f)
    assert torch.equal(idx.long(), idx_ref.view(2, 4)), f"argmax {idx.tolist()} != {idx_ref.view(2, 4).tolist()}"
    _compare_attention(att, f, torch.randn(2, 4, 3, 3), torch.float32, seed)


def test_channel_pool_nan_and_inf_follow_torch(monkeypatch):
    monkeypatch.setattr(att_mod, "_tiles", lambda c, hw: (4, 4, 1))  # NaNs in two different tiles
    f = torch.randn(1, 3, 3, 3)
    f[0, 0, 0, 1] = float("nan")
    f[0, 0, 2, 0] = float("nan")  # torch keeps the last NaN
    f[0, 1] = float("-inf")  # all -inf: the first position
    f[0, 2, 1, 1] = float("inf")
    mx_ref, idx_ref = F.adaptive_max_pool2d(f, 1, return_indices=True)
    avg, mx, idx = channel_pool(f)
    assert torch.equal(idx.long(), idx_ref.view(1, 3))
    assert torch.equal(mx.isnan(), mx_ref.view(1, 3).isnan())
    assert torch.equal(mx[~mx.isnan()], mx_ref.view(1, 3)[~mx.isnan()])
    assert torch.allclose(avg, F.adaptive_avg_pool2d(f, 1).view(1, 3), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_low_precision(dtype, seed):
    att = ChannelAttention(6).to(dtype)
    f = torch.randn(2, 6, 3, 5).to(dtype)
    g = torch.randn(2, 6, 3, 5).to(dtype)
    ref = copy.deepcopy(att).double()
    out = []
    for module, x_in, use_kernel in ((att, f, True), (ref, f.double(), False)):
        x = x_in.detach().clone().requires_grad_()
        y = attention_forward(module, x) if use_kernel else module(x)
        y.backward(g.to(x.dtype))
        out.append((y, x.grad, [p.grad for p in module.parameters()]))
    assert out[0][0].dtype == dtype
    assert_close(out[0][0], out[1][0], dtype, "output", seed)
    assert_close(out[0][1], out[1][1], dtype, "grad f", seed)
    for j in range(2):
        assert_close(out[0][2][j], out[1][2][j], dtype, f"grad mlp weight {j}", seed)


def test_attention_gradcheck_float64(seed):
    f = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_attention, (f, w1, w2), fast_mode=True)


def test_attention_channels_last(seed):
    att = ChannelAttention(6)
    f = torch.randn(2, 6, 3, 4).to(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 3, 4).to(memory_format=torch.channels_last)
    _compare_attention(att, f, g, torch.float32, seed)
    assert attention_forward(att, f).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "args, param",
    [
        (lambda: (torch.randn(6, 3, 3), torch.randn(3, 6), torch.randn(6, 3)), "f"),
        (lambda: (torch.randn(1, 6, 3, 3).to(torch.int64), torch.randn(3, 6), torch.randn(6, 3)), "f"),
        (lambda: (torch.randn(1, 6, 0, 3), torch.randn(3, 6), torch.randn(6, 3)), "f"),  # empty map
        (lambda: (torch.randn(1, 6, 3, 3), torch.randn(3, 5), torch.randn(6, 3)), "w1"),
        (lambda: (torch.randn(1, 6, 3, 3), torch.randn(3, 6, 3, 3), torch.randn(6, 3)), "w1"),  # not 1x1
        (lambda: (torch.randn(1, 6, 3, 3), torch.randn(3, 6), torch.randn(6, 4)), "w2"),
        (lambda: (torch.randn(1, 6, 3, 3), torch.randn(3, 6).double(), torch.randn(6, 3)), "w1"),
    ],
)
def test_attention_errors_name_the_parameter(args, param):
    with pytest.raises(ValueError, match=rf"^{param}"):
        channel_attention(*args())


def test_attention_forward_refuses_biased_mlp():
    att = ChannelAttention(4)
    att.mlp[0] = torch.nn.Conv2d(4, 2, 1, bias=True)
    with pytest.raises(ValueError, match="^att"):
        attention_forward(att, torch.randn(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------------- sm_90 builds


def _kernel_specs() -> list[KernelSpec]:
    """Every @triton.jit kernel of both modules in fp32 and bf16 (and the conv kernel with TF32 dots)."""
    d, a = "fusionkern.kernels.dilated", "fusionkern.kernels.attention"
    specs = []
    for dt in ("fp32", "bf16"):
        acc = "fp32"
        conv_ptrs = dict(x_ptr=dt, w_ptr=dt, off_ptr="i32", bias_ptr=acc, scale_ptr=acc, shift_ptr=acc, y_ptr=dt)
        conv_meta = dict(HAS_BIAS=True, HAS_AFFINE=True, RELU=True, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64,
                         BLOCK_K=32)  # fmt: skip
        specs.append((d, "_dilated_conv_kernel", conv_ptrs, conv_meta, f"conv {dt}"))
        specs.append((d, "_dilated_conv_wgrad_kernel", dict(x_ptr=dt, g_ptr=dt, off_ptr="i32", gw_ptr=acc, gb_ptr=acc),
                      dict(HAS_BIAS=True, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_K=64, BLOCK_N=64),
                      f"weight grad {dt}"))  # fmt: skip
        vec = dict(BLOCK_C=16, BLOCK_HW=256)
        specs.append((a, "_channel_pool_kernel", dict(f_ptr=dt, avg_ptr=acc, max_ptr=acc, idx_ptr="i32"), vec,
                      f"pool {dt}"))  # fmt: skip
        specs.append((a, "_channel_scale_kernel", dict(f_ptr=dt, a_ptr=acc, y_ptr=dt), vec, f"scale {dt}"))
        specs.append((a, "_channel_scale_grad_kernel", dict(g_ptr=dt, f_ptr=dt, ga_ptr=acc), vec, f"scale grad {dt}"))
        specs.append((a, "_channel_attention_grad_input_kernel",
                      dict(g_ptr=dt, a_ptr=acc, gavg_ptr=acc, gmax_ptr=acc, idx_ptr="i32", gf_ptr=dt), vec,
                      f"attention grad input {dt}"))  # fmt: skip
    tf32_meta = dict(HAS_BIAS=False, HAS_AFFINE=False, RELU=False, INPUT_PRECISION="tf32", BLOCK_M=128, BLOCK_N=128,
                     BLOCK_K=32)  # fmt: skip
    specs.append((d, "_dilated_conv_kernel", dict(x_ptr="fp32", w_ptr="fp32", off_ptr="i32", bias_ptr="fp32",
                                                  scale_ptr="fp32", shift_ptr="fp32", y_ptr="fp32"),
                  tf32_meta, "conv tf32"))  # fmt: skip
    out = []
    for module, name, ptrs, meta, label in specs:
        fn = getattr(dil_mod if module == d else att_mod, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in ptrs:
                signature[arg] = "*" + ptrs[arg]
            elif arg in meta:
                signature[arg] = "constexpr"
            else:
                signature[arg] = "i32"  # sizes and strides
        out.append(KernelSpec(module, name, signature, meta, label))
    return out


SPECS = _kernel_specs()


@pytest.fixture(scope="module")
def sm90_results() -> dict:
    return compile_sm90_isolated(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_kernel_compiles_for_sm90(spec, sm90_results):
    assert sm90_results[spec.name] is None, f"{spec.name} does not compile for sm_90: {sm90_results[spec.name]}"


def test_every_kernel_has_an_sm90_spec():
    def is_kernel(k, v):  # launched kernels end in _kernel; other @triton.jit helpers compile inside them
        return hasattr(v, "arg_names") and hasattr(v, "fn") and k.endswith("_kernel")

    kernels = {(m.__name__, k) for m in (dil_mod, att_mod) for k, v in vars(m).items() if is_kernel(k, v)}
    assert kernels == {(s.module, s.kernel) for s in SPECS}


# ---------------------------------------------------------------------------------------------------- GPU sweep

GPU_REASON = "needs a CUDA device and TRITON_INTERPRET=0"
GPU_TOL = {"fp32": 2e-4, "tf32": 5e-3, "bf16": 3e-2}  # max |error| relative to max |reference|


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason=GPU_REASON)
class TestGPUSweep:
    """Paper and native shapes on a CUDA device, fp32 / tf32 / bf16, forward and every gradient."""

    @pytest.fixture(autouse=True)
    def _precision(self):
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # the reference in true fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

    @pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
    @pytest.mark.parametrize("mode", ["train", "eval"])
    @pytest.mark.parametrize(
        "b, c, hw, dilations", [(64, 512, 16, (1, 3, 6, 9)), (64, 256, 4, (1, 2, 3))], ids=["paper", "native"]
    )
    def test_dilated_block(self, b, c, hw, dilations, mode, precision, seed):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ref = _make_block(c, c, dilations).cuda().train(mode == "train")
        kern = copy.deepcopy(ref).to(dtype)
        x = torch.randn(b, c, hw, hw, device="cuda")
        g = torch.randn(b, c, hw, hw, device="cuda")
        xr = x.clone().requires_grad_()
        xk = x.to(dtype).requires_grad_()
        yr = ref(xr)
        yr.backward(g)
        yk = block_forward(kern, xk, allow_tf32=precision == "tf32")
        yk.backward(g.to(dtype))
        tol = GPU_TOL[precision]
        assert _rel_err(yk, yr) < tol
        assert _rel_err(xk.grad, xr.grad) < tol
        for (name, pk), pr in zip(kern.named_parameters(), ref.parameters()):
            assert _rel_err(pk.grad, pr.grad) < tol, name

    @pytest.mark.parametrize("precision", ["fp32", "bf16"])
    @pytest.mark.parametrize("b, c, hw", [(64, 2560, 16), (64, 1280, 4)], ids=["paper", "native"])
    def test_attention(self, b, c, hw, precision, seed):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ref = ChannelAttention(c).cuda()
        kern = copy.deepcopy(ref).to(dtype)
        f = torch.randn(b, c, hw, hw, device="cuda")
        g = torch.randn(b, c, hw, hw, device="cuda")
        fr = f.clone().requires_grad_()
        fk = f.to(dtype).requires_grad_()
        ref(fr).backward(g)
        yk = attention_forward(kern, fk)
        yk.backward(g.to(dtype))
        tol = GPU_TOL[precision]
        assert _rel_err(yk, ref(f)) < tol
        assert _rel_err(fk.grad, fr.grad) < tol
        for pk, pr in zip(kern.parameters(), ref.parameters()):
            assert _rel_err(pk.grad, pr.grad) < tol
