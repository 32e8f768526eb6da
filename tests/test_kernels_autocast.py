"""The fused ops under ``torch.autocast``: they run in autocast's lower precision as torch's own convolutions do.

On the CPU interpreter the lower precision is fp16 (the interpreter's bf16 dot is wrong, see test_kernels_conv);
the GPU runs the same code with bf16. Under autocast an op must equal the same op called on the float32 tensors
cast by hand, output and every gradient, bit for bit, with float32 gradients for float32 leaves.
"""

from __future__ import annotations

import pytest
import torch

from fusionkern.kernels import channel_attention, conv2d_mixpool, dilated_avg_block, fold_bn, gabor_conv2d
from fusionkern.models import FusionNet

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check(op, tensors, lowered: set[int]):
    """``op(*tensors)`` under autocast against ``op`` on the tensors at ``lowered`` positions cast by hand."""
    auto = _leaves(*tensors)
    with torch.autocast(DEVICE, dtype=LOW):
        y = op(*auto)
    assert y.dtype == LOW
    by_hand = _leaves(*tensors)
    y_ref = op(*[t.to(LOW) if i in lowered else t for i, t in enumerate(by_hand)])
    assert torch.equal(y, y_ref)
    g = torch.randn(y.shape, device=DEVICE).to(LOW)
    grads = torch.autograd.grad(y, auto, g)
    grads_ref = torch.autograd.grad(y_ref, by_hand, g)
    for i, (a, e, t) in enumerate(zip(grads, grads_ref, tensors)):
        assert a.dtype == t.dtype, i  # float32 leaves get float32 gradients
        assert torch.equal(a, e), i


def test_conv_mixpool_under_autocast():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 9, 7, device=DEVICE), torch.randn(6, 5, 3, 3, device=DEVICE) * 0.3, torch.randn(6)
    alpha = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    _check(lambda x, w, b: conv2d_mixpool(x, w, b, alpha), [x, w, b.to(DEVICE)], {0, 1, 2})


def test_autocast_reaches_ops_called_with_keywords():
    torch.manual_seed(4)
    x, w = torch.randn(1, 3, 6, 6, device=DEVICE), torch.randn(4, 3, 3, 3, device=DEVICE)
    with torch.autocast(DEVICE, dtype=LOW):
        y = conv2d_mixpool(x=x, weight=w, bias=None, alpha=None)
    assert y.dtype == LOW and torch.equal(y, conv2d_mixpool(x.to(LOW), w.to(LOW), None, None))


def test_gabor_conv_under_autocast():
    from fusionkern.models import GaborConv2d

    torch.manual_seed(1)
    conv = GaborConv2d(3, 6, 3, init="random")
    params = [p.detach().to(DEVICE) for p in (conv.freq, conv.theta, conv.sigma, conv.psi)]
    x = torch.rand(2, 3, 9, 9, device=DEVICE)
    # the image is cast; the Gabor parameters are read at full precision (the kernel builds the weights)
    _check(lambda x, *p: gabor_conv2d(x, *p, 3, 1, 1, relu=True, pool_alpha=0.5), [x, *params], {0})


def test_dilated_block_and_attention_under_autocast():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = [torch.randn(4, 4, 3, 3, device=DEVICE) * 0.3 for _ in range(3)]
    b = [torch.randn(4, device=DEVICE) for _ in range(3)]
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    scale_shift = tuple(v.to(DEVICE) for v in fold_bn(bn))

    def block(x, *wb):
        return dilated_avg_block(x, list(wb[:3]), list(wb[3:]), (1, 2, 3), bn=scale_shift)

    _check(block, [x, *w, *b], set(range(7)))
    w1, w2 = torch.randn(2, 4, device=DEVICE), torch.randn(4, 2, device=DEVICE)
    _check(lambda f, a, c: channel_attention(f, a, c), [x, w1, w2], {0, 1, 2})


def test_fusionnet_under_autocast_runs_in_the_lower_precision():
    """The whole model on the kernels under autocast: float32 weights, lower-precision activations, and close to
    the float32 reference."""
    torch.manual_seed(3)
    model = FusionNet(preset="native", width=0.125).to(DEVICE).eval()
    fused = FusionNet(preset="native", width=0.125).to(DEVICE).eval()
    fused.load_state_dict(model.state_dict())
    fused.to_backend("triton")
    x = torch.rand(2, 5, 3, 33, 33, device=DEVICE)
    seen = []
    hook = fused.attention.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=LOW):
        y = fused(x)
    hook.remove()
    with torch.no_grad():
        ref = model(x)
    assert seen == [LOW] and all(p.dtype == torch.float32 for p in fused.parameters())
    assert torch.isfinite(y).all()
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)
