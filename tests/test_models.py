"""The reference model: every layer against the paper's equations, shapes, gradients, presets, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusionkern
from fusionkern import BRANCHES
from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.models import (
    CNN5,
    DCNN5,
    DGCNN,
    GCNN5,
    MPCNN5,
    ChannelAttention,
    DilatedAvgBlock,
    FusionNet,
    GaborConv2d,
    MixPool2d,
    PhysicsNet,
    count_parameters,
    flops_per_site,
    gabor_bank,
    load_checkpoint,
    save_checkpoint,
)
from fusionkern.models.layers import GABOR_FREQS, GABOR_THETAS

SINGLE = (CNN5, MPCNN5, GCNN5, DCNN5, DGCNN)


def _params(out_c, in_c, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    freq = torch.rand(out_c, in_c, generator=g, dtype=dtype) * 2 + 0.1
    theta = torch.rand(out_c, in_c, generator=g, dtype=dtype) * math.pi
    sigma = torch.rand(out_c, in_c, generator=g, dtype=dtype) * 2 + 0.5
    psi = torch.rand(out_c, in_c, generator=g, dtype=dtype) * math.pi
    return freq, theta, sigma, psi


# ---------------------------------------------------------------- Gabor bank


@pytest.mark.parametrize("k", [3, 4, 5])  # odd and even kernel sizes
def test_gabor_bank_matches_elementwise_formula(k):
    freq, theta, sigma, psi = _params(3, 2)
    bank = gabor_bank(freq, theta, sigma, psi, k)
    assert bank.shape == (3, 2, k, k)
    for o in range(3):
        for i in range(2):
            f, t, s, p = (float(v[o, i]) for v in (freq, theta, sigma, psi))
            for r in range(k):
                for c in range(k):
                    x, y = c - (k - 1) / 2, r - (k - 1) / 2  # column offset, row offset
                    xr = x * math.cos(t) + y * math.sin(t)
                    yr = -x * math.sin(t) + y * math.cos(t)
                    want = math.exp(-(xr**2 + yr**2) / (2 * s**2)) * math.cos(f * xr + p)
                    assert bank[o, i, r, c].item() == pytest.approx(want, rel=1e-12, abs=1e-12), (o, i, r, c)


def test_gabor_bank_legacy_reproduces_authors_grid_and_normalisation():
    freq, theta, sigma, psi = _params(2, 3)
    bank = gabor_bank(freq, theta, sigma, psi, 3, grid="legacy")
    lin = [-1.0, 0.5, 2.0]  # linspace(-ceil(3/2) + 1, ceil(3/2), 3): off centre
    for o in range(2):
        for i in range(3):
            f, t, s, p = (float(v[o, i]) for v in (freq, theta, sigma, psi))
            for r in range(3):
                for c in range(3):
                    x, y = lin[r], lin[c]  # meshgrid(indexing="ij"): x along rows, y along columns
                    xr = x * math.cos(t) + y * math.sin(t)
                    yr = -x * math.sin(t) + y * math.cos(t)
                    g = math.exp(-0.5 * (xr**2 + yr**2) / (s + 1e-3) ** 2) * math.cos(f * xr + p)
                    assert bank[o, i, r, c].item() == pytest.approx(g / (2 * math.pi * s**2), rel=1e-12)


def test_gabor_bank_gradcheck_all_four_parameters():
    params = [p.requires_grad_() for p in _params(2, 2)]
    assert torch.autograd.gradcheck(lambda *a: gabor_bank(*a, 3), params)
    assert torch.autograd.gradcheck(lambda *a: gabor_bank(*a, 3, grid="legacy"), params)


def test_gabor_bank_rejects_unknown_grid():
    with pytest.raises(ValueError, match="grid"):
        gabor_bank(*_params(1, 1), 3, grid="offset")


# ---------------------------------------------------------------- GaborConv2d


def test_gabor_conv_grid_init_cycles_the_paper_bank():
    layer = GaborConv2d(3, 32, 3, padding=1, init="grid")
    freqs, thetas = torch.tensor(GABOR_FREQS), torch.tensor(GABOR_THETAS)
    flat_f, flat_t = layer.freq.detach().flatten(), layer.theta.detach().flatten()
    for p in range(96):
        cell = p % 40
        assert flat_f[p].item() == pytest.approx(freqs[cell // 8].item())
        assert flat_t[p].item() == pytest.approx(thetas[cell % 8].item())
    torch.testing.assert_close(layer.sigma.detach(), math.pi / layer.freq.detach())
    assert ((layer.psi >= 0) & (layer.psi <= math.pi)).all()
    # all 40 grid cells are used once the layer has at least 40 pairs
    assert len({(round(f, 6), round(t, 6)) for f, t in zip(flat_f.tolist(), flat_t.tolist())}) == 40


def test_gabor_conv_random_init_draws_from_the_bank():
    layer = GaborConv2d(3, 8, 3, init="random")
    assert all(any(abs(f - g) < 1e-6 for g in GABOR_FREQS) for f in layer.freq.flatten().tolist())
    assert all(any(abs(t - g) < 1e-6 for g in GABOR_THETAS) for t in layer.theta.flatten().tolist())


def test_gabor_conv_equals_conv_with_bank_and_trains():
    layer = GaborConv2d(3, 5, 3, stride=2, padding=2, dilation=2)  # stride, dilation
    x = torch.randn(2, 3, 17, 19)  # odd sizes
    want = F.conv2d(x, gabor_bank(layer.freq, layer.theta, layer.sigma, layer.psi, 3), None, 2, 2, 2)
    torch.testing.assert_close(layer(x), want)
    before = [p.detach().clone() for p in (layer.freq, layer.theta, layer.sigma, layer.psi)]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    for name in ("freq", "theta", "sigma", "psi"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    opt.step()
    for name, b in zip(("freq", "theta", "sigma", "psi"), before):
        assert not torch.equal(getattr(layer, name).detach(), b), f"{name} did not move under an optimiser step"


# ---------------------------------------------------------------- MixPool, dilated block, attention


def test_mixpool_is_the_alpha_mix_of_max_and_avg():
    x = torch.randn(2, 4, 35, 35)  # odd size: floor to 17
    mx, av = F.max_pool2d(x, 2), F.avg_pool2d(x, 2)
    torch.testing.assert_close(MixPool2d(alpha=1.0)(x), mx)
    torch.testing.assert_close(MixPool2d(alpha=0.0)(x), av)
    pool = MixPool2d(alpha=0.3)
    out = pool(x)
    assert out.shape == (2, 4, 17, 17)
    torch.testing.assert_close(out, 0.3 * mx + 0.7 * av)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(pool.alpha.grad, (g * (mx - av)).sum())


def test_dilated_block_is_first_plus_mean_of_rest_then_bn_relu():
    block = DilatedAvgBlock(6, (1, 3, 6, 9)).eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 11, 13)
    h = [F.conv2d(x, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(block.convs, (1, 3, 6, 9))]
    want = F.relu(block.bn(h[0] + (h[1] + h[2] + h[3]) / 3))
    torch.testing.assert_close(block(x), want)
    assert block(x).shape == x.shape
    with pytest.raises(ValueError):
        DilatedAvgBlock(4, (1,))


def test_channel_attention_formula():
    att = ChannelAttention(10, reduction=2)
    f = torch.randn(3, 10, 5, 7)
    w1, w2 = att.mlp[0].weight[:, :, 0, 0], att.mlp[2].weight[:, :, 0, 0]

    def mlp(v):  # (B, C)
        return F.relu(v @ w1.T) @ w2.T

    a = torch.sigmoid(mlp(f.mean((2, 3))) + mlp(f.amax((2, 3))))[:, :, None, None]
    torch.testing.assert_close(att(f), f + f * a)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("cls", SINGLE)
@pytest.mark.parametrize("preset,size", [("native", 35), ("native", 32), ("native", 41), ("paper", 64)])
def test_single_input_models_shapes(cls, preset, size):
    model = cls(preset=preset, width=0.25)
    assert model(torch.randn(1, 3, size, size)).shape == (1, 2)  # batch 1


@pytest.mark.parametrize("backbone", ["dgcnn", "cnn5"])
def test_fusionnet_native_shapes_and_minimum_size(backbone):
    model = FusionNet(preset="native", backbone=backbone, width=0.25)
    for size in (32, 35, 47):  # minimum, the chip, odd and larger
        assert model(torch.randn(2, 5, 3, size, size)).shape == (2, 2)
    with pytest.raises(InputError, match="at least 32"):
        model(torch.randn(1, 5, 3, 31, 31))
    with pytest.raises(InputError, match=r"\(B, 5, 3, H, W\)"):
        model(torch.randn(1, 4, 3, 35, 35))


def test_fusionnet_paper_preset_small_width_forward_and_minimum():
    model = FusionNet(preset="paper", width=0.125).eval()  # eval: the head's last BN sees a 1 x 1 map
    x = torch.rand(1, 5, 3, 35, 35)
    with pytest.raises(InputError, match="at least 256"):
        model(x)
    assert model(model.prepare(x)).shape == (1, 2)  # prepare() resizes 35 -> 256


def test_paper_preset_parameter_count_matches_the_authors():
    model = FusionNet(preset="paper")
    total = count_parameters(model)
    assert total == pytest.approx(63.9e6, abs=0.05e6)
    branch = model.branches["b10"]
    assert count_parameters(branch) == pytest.approx(11.0e6, abs=0.05e6)
    assert count_parameters(branch.dilated) == pytest.approx(9.44e6, abs=0.005e6)
    assert count_parameters(model.attention) == 2 * 2560 * 1280
    assert count_parameters(model.head) + count_parameters(model.fc) == pytest.approx(2.31e6, abs=0.005e6)
    # five independent branches, not one shared
    assert len({id(b) for b in model.branches.values()}) == 5


def test_flops_per_site_paper_and_native():
    assert flops_per_site(FusionNet(preset="paper")) / 1e9 == pytest.approx(37.2, abs=0.1)
    native = flops_per_site(FusionNet(preset="native")) / 1e9
    assert 0.3 < native < 1.0  # documented in the README: about 0.55 GFLOP per site


def test_fusionnet_dict_input_and_branch_order():
    model = FusionNet(preset="native", width=0.25).eval()
    x = torch.randn(2, 5, 3, 35, 35)
    as_dict = {b: x[:, i] for i, b in enumerate(BRANCHES)}
    torch.testing.assert_close(model(as_dict), model(x))
    with pytest.raises(InputError, match="b76"):
        model({b: x[:, i] for i, b in enumerate(BRANCHES[:4])})
    # the fused map is the branch maps concatenated in BRANCHES order
    maps = [model.branches[b](x[:, i]) for i, b in enumerate(BRANCHES)]
    torch.testing.assert_close(model.fuse(x), model.attention(torch.cat(maps, 1)))
    # a change in one branch's input changes only that branch's part of the pre-attention map
    y = x.clone()
    y[:, 3] += torch.randn_like(y[:, 3])
    changed = [not torch.allclose(model.branches[b](x[:, i]), model.branches[b](y[:, i])) for i, b in enumerate(BRANCHES)]
    assert changed == [False, False, False, True, False]


def test_gradients_reach_every_gabor_parameter_and_alpha_and_move_them():
    torch.manual_seed(torch.seed() % 2**31)
    model = FusionNet(preset="native", width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracked = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.endswith(("freq", "theta", "sigma", "psi", "alpha"))}  # fmt: skip
    assert len(tracked) == 5 * (4 + 3)  # per branch: four Gabor parameters and three MixPool alphas
    loss = F.cross_entropy(model(torch.randn(4, 5, 3, 35, 35)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    params = dict(model.named_parameters())
    for name in tracked:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    opt.step()
    for name, before in tracked.items():
        assert not torch.equal(params[name].detach(), before), name


def test_alpha_presets_and_bad_options():
    model = DGCNN(preset="paper", width=0.25)
    alphas = [m.alpha.item() for m in model.modules() if isinstance(m, MixPool2d)]
    assert alphas == pytest.approx([1.0, 0.8, 0.6, 0.4])
    model = DGCNN(preset="paper", width=0.25, alphas="authors")
    assert [m.alpha.item() for m in model.modules() if isinstance(m, MixPool2d)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    with pytest.raises(ConfigError, match="preset"):
        FusionNet(preset="huge")
    with pytest.raises(ConfigError, match="backbone"):
        FusionNet(backbone="resnet")
    with pytest.raises(ConfigError, match="alphas"):
        DGCNN(alphas="nope")


def test_ablation_ladder_components():
    def kinds(model):
        return {type(m).__name__ for m in model.modules()}

    assert {"GaborConv2d", "MixPool2d", "DilatedAvgBlock"}.isdisjoint(kinds(CNN5(width=0.25)))
    assert "MixPool2d" in kinds(MPCNN5(width=0.25))
    assert "GaborConv2d" in kinds(GCNN5(width=0.25))
    assert "DilatedAvgBlock" in kinds(DCNN5(width=0.25))
    assert {"GaborConv2d", "MixPool2d", "DilatedAvgBlock"} <= kinds(DGCNN(width=0.25))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    model = FusionNet(preset="native", backbone="cnn5", width=0.25, alphas="authors").eval()
    path = save_checkpoint(model, tmp_path / "m.pt", epoch=3, metrics={"accuracy": 0.9})
    raw = torch.load(path, weights_only=True)  # loads with the safe unpickler
    assert raw["data"]["chip_px"] == 35 and raw["data"]["input_size"] == 35
    assert raw["data"]["scaling"] == "minmax-per-chip-channel"
    loaded = fusionkern.load_checkpoint(path)
    assert isinstance(loaded, FusionNet) and loaded.config == model.config
    assert loaded.checkpoint["metadata"]["epoch"] == 3
    x = torch.randn(2, 5, 3, 35, 35)
    torch.testing.assert_close(loaded(x), model(x))
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left behind (fusionkern.files naming)


def test_physicsnet_is_a_global_max_over_conv_features_and_checkpoints(tmp_path):
    """The verifier network: fifteen channels together, conv -> ReLU -> BN (two max-pools), global maximum,
    Linear; its checkpoint rebuilds it and records the five branches."""
    torch.manual_seed(0)
    model = PhysicsNet(width=0.5).eval()
    x = torch.randn(3, 5, 3, 35, 35) * 2.0
    features = model.features(x.reshape(3, 15, 35, 35))
    assert features.shape == (3, 32, 8, 8)  # 35 -> 17 -> 8
    torch.testing.assert_close(model(x), model.fc(features.amax(dim=(2, 3))))
    path = save_checkpoint(model, tmp_path / "v.pt", data={"scaling": "physical-units"})
    loaded = load_checkpoint(path)
    assert isinstance(loaded, PhysicsNet) and loaded.checkpoint["data"]["branches"] == list(BRANCHES)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(InputError, match="PhysicsNet takes"):
        model(x[:, 0])
    with pytest.raises(ConfigError, match="preset native"):
        PhysicsNet(preset="paper")
    with pytest.raises(ConfigError, match="torch backend only"):
        model.to_backend("triton")


def test_checkpoint_errors_name_the_file(tmp_path):
    model = DGCNN(preset="native", width=0.25)
    path = save_checkpoint(model, tmp_path / "dgcnn.pt")
    with pytest.raises(CheckpointError, match="holds a DGCNN, expected a FusionNet"):
        load_checkpoint(path, expect=FusionNet)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)  # a bare state_dict is not a fusionkern checkpoint
    with pytest.raises(CheckpointError, match="plain.pt is not a fusionkern checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="metadata"):
        save_checkpoint(model, tmp_path / "bad.pt", thing=object())


class _Payload:
    """An object whose unpickling would run code: the safe loader must refuse it."""

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fusionkern-checkpoint", "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
