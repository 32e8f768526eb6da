"""Whole models on the Triton kernels against the reference: one switch, the same state_dict, forward and backward.

Runs on Triton's CPU interpreter here (tiny widths and inputs) and on CUDA where present.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fusionkern import load_checkpoint, save_checkpoint
from fusionkern.errors import ConfigError
from fusionkern.models import DGCNN, FusionNet

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float64 on both sides. The kernels sum in another order than the reference; in fp32 that moves values by ~1e-7,
# enough to flip a near-tied max-pool or ReLU decision somewhere in a five-branch model now and then, and a flipped
# decision changes the summed gradient of the first layer's Gabor parameters by far more than rounding. In float64
# such flips are out of reach, so every gradient can be compared element by element with tight bounds. Per-dtype
# kernel tolerances (fp32, tf32, bf16) are tested op by op in test_kernels_*.py.
DTYPE = torch.float64
ATOL, RTOL = 1e-9, 1e-7


def _perturb_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode folding is really tested."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _pair(model: torch.nn.Module, channels_last: bool = False):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    _perturb_batchnorm(model, gen)
    ref = model.to(DEVICE, DTYPE)
    fused = copy.deepcopy(ref).to_backend("triton", channels_last=channels_last)
    return ref, fused, gen


def _assert_grads_close(ref: torch.nn.Module, fused: torch.nn.Module) -> None:
    fused_params = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        q = fused_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fusionnet_on_kernels_matches_reference(mode, layout, monkeypatch):
    from fusionkern.kernels import conv_mixpool

    launched = []  # CHANNELS_INNER of every fused convolution launch
    real = conv_mixpool._conv_mixpool_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["CHANNELS_INNER"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(conv_mixpool, "_conv_mixpool_fwd", Spy())
    # channels not a multiple of the block; NHWC: the activations channels-last from the first layer on
    ref, fused, gen = _pair(FusionNet(preset="native", width=0.125), channels_last=layout == "nhwc")
    ref.train(mode == "train")
    fused.train(mode == "train")
    x = torch.rand(2, 5, 3, 33, 33, generator=gen, dtype=DTYPE).to(DEVICE)  # odd size, above the 32 px minimum
    y_ref, y_fused = ref(x), fused(x)
    torch.testing.assert_close(y_fused, y_ref, atol=ATOL, rtol=RTOL)
    assert launched and (any(launched) if layout == "nhwc" else not any(launched))
    g = torch.randn(y_ref.shape, generator=gen, dtype=DTYPE).to(DEVICE)
    y_ref.backward(g)
    y_fused.backward(g)
    _assert_grads_close(ref, fused)
    if mode == "train":  # BatchNorm running statistics moved the same way
        for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def test_single_input_model_on_kernels_batch_one():
    ref, fused, gen = _pair(DGCNN(preset="native", width=0.125))
    ref.eval()
    fused.eval()
    x = torch.rand(1, 3, 17, 17, generator=gen, dtype=DTYPE).to(DEVICE)  # batch 1, odd size
    torch.testing.assert_close(fused(x), ref(x), atol=ATOL, rtol=RTOL)


def test_checkpoint_trained_on_one_backend_runs_on_the_other(tmp_path):
    model = FusionNet(preset="native", width=0.125).to(DEVICE, DTYPE).to_backend("triton")
    path = save_checkpoint(model, tmp_path / "m.pt")
    ref = load_checkpoint(path, map_location=DEVICE).to(DTYPE)
    fused = load_checkpoint(path, map_location=DEVICE).to(DTYPE).to_backend("triton")
    assert ref.backend == "torch" and fused.backend == "triton"
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(2, 5, 3, 32, 32, dtype=DTYPE).to(DEVICE)
    torch.testing.assert_close(fused(x), ref(x), atol=ATOL, rtol=RTOL)


def test_unknown_backend():
    with pytest.raises(ConfigError, match="unknown backend"):
        FusionNet(preset="native", width=0.125).to_backend("cuda")


def test_inference_mode_first_then_training_on_kernels():
    """Kernel-side caches filled under inference_mode (as the scanner runs) must not break a later training step."""
    import fusionkern.kernels.dilated as dilated
    import fusionkern.kernels.gabor_conv as gabor_conv

    gabor_conv._tap_grid.cache_clear()
    dilated._plan_tensors.cache_clear()
    model = DGCNN(preset="native", width=0.125).to(DEVICE, DTYPE).to_backend("triton")
    x = torch.rand(2, 3, 32, 32, dtype=DTYPE).to(DEVICE)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.features.stages[0].conv.freq.grad is not None
