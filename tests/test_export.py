"""Export engines: the export-safe form, ONNX (graph contract and parity), parity reports, the ``fusionkern export``
command and its refusals. The TensorRT path is tested in ``test_tensorrt.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fusionkern import BRANCHES
from fusionkern.commands import export as export_cmd
from fusionkern.errors import CheckpointError, ConfigError, InputError
from fusionkern.export import (
    ParityError,
    Tolerance,
    check_parity,
    exportable,
    onnx_session,
    read_metadata,
    real_chips,
    to_onnx,
)
from fusionkern.export import onnx as export_onnx
from fusionkern.export.exportable import ChannelAffine, ConstMixPool2d, DilatedSum, ExportAttention
from fusionkern.export.parity import random_sites
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
    save_checkpoint,
)

# The operators an exported graph may use: the test's own list, so that a change of the library's allow-list
# (or of the exporter) that brings in anything else shows up here.
STANDARD_OPS = {
    "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "Flatten", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "MatMul", "MaxPool", "Mul", "ReduceMax", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid",
    "Slice", "Sub", "Transpose", "Unsqueeze", "Squeeze", "Identity",
}  # fmt: skip

# The export-safe form against the reference, eager PyTorch on both sides: the fp32 row of the house dtype table
# (folds round once; oneDNN's reduction order varies with threads, which alone moves logits by a few 1e-6).
EAGER_RTOL = 1e-4


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """A stand-in for a trained model: BatchNorm statistics measured on data, per-branch MixPool alphas, logits of
    order 1 with both classes predicted.

    The statistics come from one forward pass in training mode over random sites (cumulative averages), with each
    layer's variances kept within a factor of 4 of its median so that no channel is blown up. The first pool of
    each branch keeps alpha = 1 (the max-pool-only path); the others get distinct values, so that a fused graph
    must keep each branch's own alpha. The classifier is rescaled so that the logit margin spreads about 1 around 0.
    """
    g = torch.Generator().manual_seed(seed)
    n = 8 if model.input_size > 64 else 64
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha") and float(p) != 1.0:
                p.copy_(0.2 + 0.8 * torch.rand((), generator=g))
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        model.train()
        model(random_sites(model, n, seed=1000 + seed))  # seeds apart from those the tests draw sites with
        model.eval()
        for m in bns:
            m.running_var.clamp_(min=float(m.running_var.median()) / 4)
        x = random_sites(model, n, seed=2000 + seed)
        sign = torch.tensor([1.0, -1.0])
        model.fc.weight.mul_(1 / float((model(x) @ sign).std()))
        model.fc.bias.zero_()
        model.fc.bias[0] -= float((model(x) @ sign).median())
    return model


def seeded(cls: type[nn.Module], seed: int, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` with its initial weights drawn from ``seed`` (the global generator is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(*args, **kwargs)


def stand_in(cls: type[nn.Module], seed: int, **kwargs) -> nn.Module:
    """A seeded :func:`trained_like` model."""
    return trained_like(seeded(cls, seed, **kwargs), seed=seed)


def _classes_of(model: nn.Module, n: int = 256) -> set[int]:
    with torch.no_grad():
        return set(model(random_sites(model, n, seed=99)).argmax(1).tolist())


@pytest.fixture(scope="module")
def native() -> FusionNet:
    return stand_in(FusionNet, seed=1, preset="native", width=0.25)


@pytest.fixture(scope="module")
def native_onnx(native, tmp_path_factory) -> Path:
    return to_onnx(native, tmp_path_factory.mktemp("onnx") / "native.onnx")


@pytest.fixture(scope="module")
def paper() -> FusionNet:
    return stand_in(FusionNet, seed=8, preset="paper", width=0.125)


@pytest.fixture(scope="module")
def native16_onnx(native, tmp_path_factory) -> Path:
    return to_onnx(native, tmp_path_factory.mktemp("onnx") / "native16.onnx", precision="fp16", max_batch=512)


@pytest.fixture(scope="module")
def dgcnn_onnx(tmp_path_factory) -> tuple[DGCNN, Path]:
    model = stand_in(DGCNN, seed=2, preset="native", width=0.25)
    return model, to_onnx(model, tmp_path_factory.mktemp("onnx") / "dgcnn.onnx")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------- the export-safe form

FUSION_CASES = [
    ("native", "dgcnn", 0.25),  # the FusionNet branch network
    ("native", "cnn5", 0.25),  # Table III's other row: plain branches, bn_pool order
    ("paper", "dgcnn", 0.125),  # paper preset: 256 px, four branch pools, 3 x 3 head, small width (fixture)
    ("paper", "cnn5", 0.125),  # as built, BN statistics untouched (a calibration at 256 px costs seconds)
]


@pytest.mark.parametrize("preset, backbone, width", FUSION_CASES)
def test_exportable_fusionnet_matches_reference(preset, backbone, width, request):
    if preset == "paper":
        model = (
            request.getfixturevalue("paper")
            if backbone == "dgcnn"
            else seeded(FusionNet, 3, preset, backbone, width).eval()
        )
    else:
        model = stand_in(FusionNet, seed=3, preset=preset, backbone=backbone, width=width)
    x = random_sites(model, 4 if preset == "paper" else 16, seed=4)
    with torch.no_grad():
        ref = model(x)
        for fuse in (True, False):  # one grouped branch network, five separate ones
            out = exportable(model, fuse_branches=fuse)(x)
            assert out.shape == ref.shape == (len(x), 2)
            assert _max_rel(out, ref) <= EAGER_RTOL, f"fuse_branches={fuse}: max rel {_max_rel(out, ref):.3g}"


@pytest.mark.parametrize("cls", [CNN5, MPCNN5, GCNN5, DCNN5, DGCNN])
def test_exportable_single_input_models_match_reference(cls):
    model = stand_in(cls, seed=5, preset="native", width=0.25)
    safe = exportable(model)
    x = random_sites(model, 16, seed=6)
    with torch.no_grad():
        ref, out = model(x), safe(x)
    assert _max_rel(out, ref) <= EAGER_RTOL


def test_exportable_uses_only_plain_layers_and_folds_batchnorm(native):
    model = native
    safe = exportable(model, fuse_branches=True)  # the grouped form: its structure is the one checked here
    kinds = {type(m) for m in safe.modules()}
    assert not kinds & {GaborConv2d, MixPool2d, nn.BatchNorm2d, DilatedAvgBlock, ChannelAttention}
    assert {DilatedSum, ExportAttention, ConstMixPool2d} <= kinds
    assert not any(p.requires_grad for p in safe.parameters()) and not safe.training
    # The first convolution is the reference's Gabor bank for each branch, bit for bit, grouped by branch.
    first = safe.branches[0]
    assert isinstance(first, nn.Conv2d) and first.groups == len(BRANCHES) and first.bias is None
    banks = torch.cat([model.branches[b].stages[0].conv.weight().detach() for b in BRANCHES])
    assert torch.equal(first.weight, banks)
    # Branch BNs that follow a ReLU stay as affine maps; the dilated block's BN and the head's last BN are folded.
    n_bn_branch = sum(s.bn is not None for s in model.branches["b10"].stages)
    assert sum(isinstance(m, ChannelAffine) for m in safe.branches) == n_bn_branch
    assert not isinstance(safe.head[-1], ChannelAffine)
    # native head: BN before an unpadded 1 x 1 convolution folds into it (2 head BNs folded there, 1 into fc).
    assert sum(isinstance(m, ChannelAffine) for m in safe.head) == 2
    # Pools: alpha 1 -> max only; the other pools keep one alpha per branch (per channel once grouped).
    pools = [m for m in safe.branches if isinstance(m, ConstMixPool2d)]
    assert pools[0].mode == "max" and all(p.mode == "mix" and p.alpha.numel() > 1 for p in pools[1:])


def test_exportable_leaves_the_model_alone_and_rejects_other_modules():
    model = seeded(FusionNet, 0, preset="native", width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exportable(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="Sequential"):
        exportable(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------------------- ONNX


def test_onnx_graph_contract(native, native_onnx):
    onnx.checker.check_model(str(native_onnx), full_check=True)
    proto = onnx.load(str(native_onnx))
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= STANDARD_OPS, f"non-standard ops {ops - STANDARD_OPS}"
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {"Conv", "MaxPool", "AveragePool", "Sigmoid", "Gemm"} <= ops  # mixed pooling and attention as such
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    (inp,), (out,) = proto.graph.input, proto.graph.output

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert (inp.name, dims(inp)) == ("sites", ["batch", 5, 3, 35, 35])
    assert (out.name, dims(out)) == ("logits", ["batch", 2])
    meta = read_metadata(native_onnx)
    assert meta["model_class"] == "FusionNet" and meta["preset"] == "native" and meta["precision"] == "fp32"
    assert meta["input_size"] == 35 and meta["branches"] == list(BRANCHES) and meta["max_batch"] == 4096
    # The batch axis is dynamic: odd sizes, one site included.
    session = onnx_session(native_onnx, threads=1)
    for b in (1, 3, 7):  # minimal, odd
        x = random_sites(native, b, seed=b)
        got = session.run(None, {"sites": x.numpy()})[0]
        with torch.no_grad():
            ref = native(x).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())  # the parity goal's scale
    assert not [p for p in native_onnx.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_onnx_fp32_parity_native_1000_sites(native, native_onnx):
    report = check_parity(native, native_onnx, n_random=1000, batch=250, seed=0)
    assert _classes_of(native) == {0, 1}  # identical classes mean something: the model predicts both
    random_row = report.rows[0]
    assert random_row.kind == "random" and random_row.n == 1000
    assert report.max_rel_logit <= 1e-4, str(report)
    assert report.class_agreement == 1.0, str(report)
    assert report.passed and report.precision == "fp32" and report.backend == "onnxruntime"
    print(f"\nnative w0.25 fp32 ONNX:\n{report}")


def test_onnx_paper_preset_parity(paper, tmp_path):
    path = to_onnx(paper, tmp_path / "paper.onnx", max_batch=64)
    assert read_metadata(path)["input_size"] == 256
    report = check_parity(paper, path, n_random=8, batch=8, real_chips=False, seed=1)
    assert report.max_rel_logit <= 1e-4 and report.class_agreement == 1.0, str(report)
    print(f"\npaper w0.125 fp32 ONNX:\n{report}")


def test_onnx_cnn5_backbone_parity(tmp_path):
    model = stand_in(FusionNet, seed=9, preset="native", backbone="cnn5", width=0.25)
    path = to_onnx(model, tmp_path / "cnn5.onnx", fuse_branches=True)  # one grouped branch network (group=5)
    report = check_parity(model, path, n_random=200, real_chips=False, seed=2)
    assert report.passed, str(report)


def test_onnx_single_input_model(dgcnn_onnx):
    model, path = dgcnn_onnx
    proto = onnx.load(str(path))
    assert proto.graph.input[0].name == "chips"
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        "batch", 3, 35, 35]  # fmt: skip
    assert {n.op_type for n in proto.graph.node} <= STANDARD_OPS
    report = check_parity(model, path, n_random=300, seed=3, real_chips=False)
    assert report.passed, str(report)
    assert all(r.kind == "random" or r.kind.startswith("real:") for r in report.rows)


def test_onnx_fp16_graph_with_float32_io(native, native16_onnx):
    proto = onnx.load(str(native16_onnx))
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= STANDARD_OPS and "Cast" in ops
    floats = {t.data_type for t in proto.graph.initializer} - {onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in and out
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_metadata(native16_onnx)["precision"] == "fp16"
    report = check_parity(native, native16_onnx, n_random=300, seed=4, real_chips=False)
    assert report.precision == "fp16" and report.tolerance == Tolerance.for_precision("fp16")
    print(f"\nnative w0.25 fp16 ONNX on onnxruntime CPU, against the fp16 goal:\n{report}")
    assert report.max_prob_diff > 1e-6  # the graph really runs in float16
    # The stand-in's statistics come from noise, which makes it more sensitive to fp16 rounding than the goal's
    # trained model (rounding the input alone to fp16 moves its logits by ~1 %): a looser probability bound here,
    # the same rule for classes. The goal itself is checked on TensorRT by the GPU test.
    loose = Tolerance(max_prob_diff=5e-2, min_class_agreement=0.999, tie_band=0.1)
    assert dataclasses.replace(report, tolerance=loose).passed, str(report)


def test_to_onnx_rejects_bad_options_and_leaves_nothing(native, tmp_path, monkeypatch):
    for kwargs, match in (({"precision": "int8"}, "precision"), ({"opset": 12}, "opset"),
                          ({"max_batch": 0}, "max_batch")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            to_onnx(native, tmp_path / "bad.onnx", **kwargs)

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        to_onnx(native, tmp_path / "fails.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ parity checks


def test_check_parity_notices_a_small_weight_change(native, native_onnx):
    other = copy.deepcopy(native)
    with torch.no_grad():
        other.head.stages[0].conv.weight.mul_(1.001)  # 0.1 % on one head layer
    report = check_parity(other, native_onnx, n_random=32, real_chips=False, seed=5)
    assert not report.passed and any("max_rel_logit" in f for f in report.failures())
    assert "FAILED" in report.summary()


def test_check_parity_bad_artefacts(native, native_onnx, dgcnn_onnx, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(native_onnx.read_bytes()[: native_onnx.stat().st_size // 3])
    with pytest.raises(InputError, match="truncated.onnx"):
        check_parity(native, truncated, n_random=4)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(InputError, match="garbage.onnx"):
        check_parity(native, garbage, n_random=4)
    with pytest.raises(InputError, match="missing.onnx"):
        check_parity(native, tmp_path / "missing.onnx", n_random=4)
    with pytest.raises(ConfigError, match="model.bin"):
        check_parity(native, tmp_path / "model.bin", n_random=4)
    with pytest.raises(InputError, match=r"dgcnn.onnx takes input chips"):
        check_parity(native, dgcnn_onnx[1], n_random=4)  # a single-input export against FusionNet


def test_parity_report_figures_and_json(native, native_onnx):
    report = check_parity(native, native_onnx, n_random=32, real_chips=False, seed=6)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["n"] == 32 and d["rows"][0]["kind"] == "random"
    assert d["tolerance"] == {"max_rel_logit": 1e-4, "max_abs_logit": None, "max_prob_diff": None,
                              "min_class_agreement": 1.0, "tie_band": 1e-5}  # fmt: skip
    assert "random" in report.table() and "passed" in report.summary()
    assert Tolerance.for_precision("fp16").min_class_agreement == 0.999
    with pytest.raises(ConfigError):
        Tolerance.for_precision("int8")


def test_real_chips_from_the_shared_clips(landsat8_dir, native, native_onnx):
    from fusionkern import landsat, readers
    from fusionkern.data.transforms import minmax_scale

    clips = dict(real_chips(landsat8_dir, chip_px=35))
    assert clips, "no chip cut from the shared clips"
    for name, chips in clips.items():
        assert chips.shape[1:] == (5, 3, 35, 35) and chips.dtype == np.float32
        assert 0.0 <= chips.min() and chips.max() <= 1.0 and np.isfinite(chips).all()
        assert np.array_equal(chips[:, :, 0], chips[:, :, 2])  # one scene stands in for the three dates
    # The first chip of a clip is its top-left window; b76 is b7 / b6, min-max scaled.
    name = min(clips)
    b7 = readers.read_scene_band(landsat8_dir / name, 7)[0][:35, :35]
    b6 = readers.read_scene_band(landsat8_dir / name, 6)[0][:35, :35]
    expected = minmax_scale(landsat.band_ratio(b7, b6)[None])[0]
    np.testing.assert_allclose(clips[name][0, BRANCHES.index("b76"), 0], expected, atol=1e-6)
    report = check_parity(native, native_onnx, n_random=0, real_chips=landsat8_dir)
    assert {r.kind for r in report.rows} == {f"real:{n}" for n in clips} and report.passed, str(report)
    with pytest.raises(InputError, match="nowhere"):
        check_parity(native, native_onnx, n_random=1, real_chips=landsat8_dir / "nowhere")


# ------------------------------------------------------------------------------------------- the export command


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusionkern export")
    export_cmd.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def checkpoint(native, tmp_path_factory) -> Path:
    return save_checkpoint(native, tmp_path_factory.mktemp("ckpt") / "native.pt", epoch=3)


def test_export_command_writes_onnx_and_sidecar(checkpoint, native, tmp_path, capsys):
    out = tmp_path / "models" / "fusionnet.onnx"
    rc = export_cmd.run(_parse([str(checkpoint), "--out", str(out), "--parity-sites", "200", "--seed", "0"]))
    assert rc == 0 and out.is_file()
    sidecar = json.loads(out.with_name("fusionnet.onnx.json").read_text())
    import hashlib

    assert sidecar["artefact"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sidecar["artefact"]["format"] == "onnx" and sidecar["precision"] == "fp32" and sidecar["opset"] == 18
    assert sidecar["model"]["class"] == "FusionNet" and sidecar["model"]["preset"] == "native"
    assert sidecar["model"]["config"] == native.config
    assert sidecar["input"] == {"name": "sites", "shape": ["batch", 5, 3, 35, 35], "dtype": "float32",
                                "chip_px": 35, "resolution_m": 30.0, "input_size": 35,
                                "scaling": "minmax-per-chip-channel",
                                "branches": list(BRANCHES)}  # fmt: skip
    assert sidecar["tools"]["torch"] and sidecar["tools"]["onnx"] and sidecar["tools"]["onnxruntime"]
    assert sidecar["parity"]["passed"] and sidecar["parity"]["rows"][0]["n"] == 200
    assert sidecar["parity"]["max_rel_logit"] <= 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == ["fusionnet.onnx", "fusionnet.onnx.json"]
    assert "parity passed" in capsys.readouterr().out


def test_export_refuses_what_fails_parity(checkpoint, tmp_path, monkeypatch):
    """An artefact whose weights differ from the checkpoint's: parity fails and nothing is written."""
    original = export_onnx.exportable

    def tampered(model, **kwargs):
        safe = original(model, **kwargs)
        with torch.no_grad():
            safe.fc.bias += 0.5
        return safe

    monkeypatch.setattr(export_onnx, "exportable", tampered)
    out = tmp_path / "tampered.onnx"
    with pytest.raises(ParityError, match="tampered.onnx") as err:
        export_cmd.run(_parse([str(checkpoint), "--out", str(out), "--parity-sites", "32", "--no-real-chips"]))
    assert "max_rel_logit" in str(err.value) and str(checkpoint) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no artefact, no sidecar, no temporary folder


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_ckpt)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all")
    for path in (not_ckpt, text, tmp_path / "absent.pt"):
        out = tmp_path / "out" / "model.onnx"
        with pytest.raises(CheckpointError, match=path.name):
            export_cmd.run(_parse([str(path), "--out", str(out)]))
        assert not out.exists()


def test_export_command_rejects_mismatched_out(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="model.engine"):
        export_cmd.run(_parse([str(checkpoint), "--out", str(tmp_path / "model.engine")]))
