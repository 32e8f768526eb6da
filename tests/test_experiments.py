"""`fusionkern experiment` and `fusionkern explain` on a tiny synthetic dataset, in --quick mode.

The baselines' torchvision path is exercised with a stand-in ``torchvision.models`` module (builders and weights
enums shaped like torchvision's documented API) and stand-in networks; nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fusionkern.cli as cli
from fusionkern import BRANCHES
from fusionkern.data import make_synthetic_sites
from fusionkern.errors import CheckpointError, ConfigError, InputError, MissingDependencyError
from fusionkern.experiments import CellStore, ExperimentSettings
from fusionkern.experiments import baselines as bl
from fusionkern.experiments.explain import class_activation_maps, feature_map
from fusionkern.experiments.fusion import ReplicatedBranch
from fusionkern.experiments.report import markdown
from fusionkern.models import CNN5, DGCNN, FusionNet, load_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
def run_cli(args: list[str]) -> int:
    return cli.main(args)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The quick models are tiny: one intra-op thread is as fast, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sites") / "data"
    make_synthetic_sites(root, n_cement=10, n_landcover=20, seed=3)
    return root


@pytest.fixture(scope="module")
def ablation(data, tmp_path_factory) -> Path:
    """One quick ablation run (CNN5 and DGCNN on Band 10 and Band 7:6, two splits) with CAM and t-SNE."""
    out = tmp_path_factory.mktemp("ablation") / "out"
    code = run_cli(
        [
            "experiment",
            "ablation",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quick",
            "--no-progress",
            "--models",
            "dgcnn,cnn5",
            "--bands",
            "7:6,b10",
            "--explain",
        ]
    )  # fmt: skip (any order given)
    assert code == 0
    return out


# ------------------------------------------------------------------------------------------------------- ablation


def test_ablation_table_is_laid_out_like_table_ii(ablation):
    table = (ablation / "table.md").read_text()
    assert table.startswith("# Table II")
    assert "| Models | Band 10 | Band 7:6 |" in table  # the paper's column order, whatever order was asked
    accuracy = table.split("## Accuracy (%)")[1].split("##")[0]
    rows = [line for line in accuracy.splitlines() if line.startswith("| ") and "Models" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["CNN5", "DGCNN"]  # the paper's row order
    assert all(r.count("±") == 2 for r in rows)
    for section in ("Cement accuracy (= cement recall)", "Landcover accuracy", "Confusion matrices",
                    "The paper's figures (Table II)", "Quick run"):  # fmt: skip
        assert section in table
    assert "| CNN5 | 76.9 | 83.3 |" in table  # the paper's Table II, same columns


def test_ablation_json_holds_every_split_and_consistent_summaries(ablation):
    result = json.loads((ablation / "results.json").read_text())
    assert result["experiment"] == "ablation"
    assert [r["key"] for r in result["rows"]] == ["cnn5", "dgcnn"]
    assert [c["key"] for c in result["columns"]] == ["b10", "b76"]
    assert (
        result["settings"]["quick"] and result["settings"]["preset"] == "native" and result["settings"]["splits"] == 2
    )
    assert len(result["cells"]) == 4
    for cell in result["cells"]:
        splits = cell["splits"]
        assert [s["split"] for s in splits] == [0, 1]
        acc = [s["test"]["accuracy"] for s in splits]
        summary = cell["summary"]
        assert summary["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
        assert summary["metrics"]["accuracy"]["std"] == pytest.approx(np.std(acc))
        cm = np.sum([s["test"]["confusion_matrix"] for s in splits], axis=0)
        assert summary["confusion_matrix"] == cm.tolist() and cm.sum() == 12  # 6 test sites per split
        assert len(splits[0]["history"]) == 2  # --quick: two epochs
    # the numbers behind each PNG are in the JSON and agree with the cells
    fig = result["figures"]["per_class_accuracy.png"]
    assert fig["x"] == ["Band 10", "Band 7:6"]
    first = result["cells"][0]
    assert fig["series"][0]["accuracy"]["mean"][0] == pytest.approx(
        100 * first["summary"]["metrics"]["accuracy"]["mean"], abs=1e-3
    )
    assert result["figures"]["confusion_matrices.png"]["matrices"][0][0] == first["summary"]["confusion_matrix"]
    assert len(result["figures"]["cement_recall.png"]["series"]) == 2


def test_ablation_writes_pngs_and_loadable_checkpoints(ablation):
    for name in ("per_class_accuracy.png", "cement_recall.png", "confusion_matrices.png"):
        assert is_png(ablation / name), name
    result = json.loads((ablation / "results.json").read_text())
    for cell in result["cells"]:
        for split in cell["splits"]:
            model = load_checkpoint(ablation / split["checkpoint"])  # recorded relative to the experiment folder
            assert type(model).__name__.lower() == cell["row"]
            assert model.checkpoint["data"]["branch"] == cell["column"]
            assert model.checkpoint["metadata"]["split"] == split["split"]
            assert model.config["preset"] == "native" and model.config["width"] == 0.25


def test_ablation_explain_compares_cnn5_with_dgcnn(ablation):
    out = ablation / "explain"
    assert is_png(out / "cam.png") and is_png(out / "tsne.png")
    info = json.loads((out / "explain.json").read_text())
    assert [m["label"] for m in info["models"]] == ["CNN5 on Band 7:6", "DGCNN on Band 7:6"]
    assert "test sites of split 0" in info["sites"]["selection"]
    assert len(info["sites"]["keys"]) == 6
    for m in info["models"]:
        assert np.asarray(m["tsne"]).shape == (6, 2)
        assert len(m["probabilities"]) == 6
    cams = np.load(out / "cam.npz")
    assert cams["cams"].shape[:2] == (2, len(info["cam"]["sites"])) and cams["cams"].shape[2:] == (35, 35)
    assert 0.0 <= cams["cams"].min() and cams["cams"].max() <= 1.0


# --------------------------------------------------------------------------------------------------------- resume


def _store_records(out: Path) -> list[Path]:
    return sorted((out / "cells").glob("*/*/split_*/record.json"))


def test_resume_skips_finished_cells_and_gives_the_uninterrupted_result(data, tmp_path, monkeypatch):
    import fusionkern.train as train_mod
    from fusionkern.experiments.ablation import run_ablation

    real = train_mod.train_split
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[4])
        return real(*args, **kwargs)

    def settings(out, **kw):
        return ExperimentSettings(data=str(data), out=str(out), quick=True, progress=False, **kw)

    quiet = lambda message: None  # noqa: E731
    monkeypatch.setattr(train_mod, "train_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(settings(tmp_path / "a"), ["cnn5"], ["b10", "b76"], log=quiet)
    assert len(_store_records(tmp_path / "a")) == 3

    counted = []
    monkeypatch.setattr(train_mod, "train_split", lambda *a, **k: counted.append(a[4]) or real(*a, **k))
    resumed = run_ablation(settings(tmp_path / "a", resume=True), ["cnn5"], ["b10", "b76"], log=quiet)
    assert counted == [1]  # only the fourth (cell, split) was trained again
    full = run_ablation(settings(tmp_path / "b"), ["cnn5"], ["b10", "b76"], log=quiet)
    for a, b in zip(resumed["cells"], full["cells"]):
        assert [s["test"] for s in a["splits"]] == [s["test"] for s in b["splits"]]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_a_used_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["experiment", "ablation", "--data", str(data), "--out", str(out), "--quick", "--no-progress",
            "--models", "cnn5", "--bands", "b76", "--splits", "1"]  # fmt: skip
    assert run_cli(base) == 0
    capsys.readouterr()
    assert run_cli(base) == 2
    assert "--resume" in one_line_error(capsys)
    assert run_cli(base + ["--resume", "--epochs", "3"]) == 2
    line = one_line_error(capsys)
    assert "cannot resume" in line and "epochs: 2 then, 3 now" in line
    # more splits on resume: split 0 is reused, split 1 is trained
    assert run_cli(base[:-2] + ["--splits", "2", "--resume"]) == 0
    assert "split 0: finished before, skipped" in capsys.readouterr().out
    assert len(_store_records(out)) == 2
    assert run_cli(base + ["--overwrite"]) == 0
    assert len(_store_records(out)) == 1


def test_cell_store_records_atomically_and_treats_damaged_records_as_unfinished(tmp_path):
    store = CellStore(tmp_path, "ablation", {"epochs": 2})
    assert store.get("cnn5", "b76", 0) is None
    store.put("cnn5", "b76", 0, {"test": {"accuracy": 0.5}, "seed": 0})
    assert store.get("cnn5", "b76", 0)["test"]["accuracy"] == 0.5
    assert not list(tmp_path.rglob(".*.tmp*"))
    (store.cell_dir("cnn5", "b76", 0) / "record.json").write_text('{"split": 0, "te')
    assert store.get("cnn5", "b76", 0) is None
    with pytest.raises(ConfigError, match="'ablation' experiment, not 'fusion'"):
        CellStore(tmp_path, "fusion", {"epochs": 2}, resume=True)
    with pytest.raises(ValueError):
        store.cell_dir("../x", "b76", 0)


# --------------------------------------------------------------------------------------------------------- fusion


def test_fusion_quick_trains_the_fused_column_for_both_backbones(data, tmp_path):
    out = tmp_path / "fusion"
    assert run_cli(["experiment", "fusion", "--data", str(data), "--out", str(out), "--quick", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["FusionNet (CNN5 branches)", "FusionNet (DGCNN branches)"]
    assert [c["key"] for c in result["columns"]] == ["fused"] and result["inputs"] == "fused"
    table = (out / "table.md").read_text()
    assert table.startswith("# Table III") and "| Models | Fused (all five) |" in table
    for row, backbone in (("fusionnet-cnn5", "cnn5"), ("fusionnet-dgcnn", "dgcnn")):
        model = load_checkpoint(out / "cells" / row / "fused" / "split_0" / "best.pt", expect=FusionNet)
        assert model.config["backbone"] == backbone and "replicated_branch" not in model.checkpoint["data"]
    assert is_png(out / "per_class_accuracy.png") and is_png(out / "confusion_matrices.png")


def test_fusion_per_band_feeds_one_band_to_all_five_branches(data, tmp_path):
    out = tmp_path / "fusion"
    assert run_cli(["experiment", "fusion", "--data", str(data), "--out", str(out), "--quick", "--no-progress",
                    "--backbones", "cnn5", "--inputs", "per-band", "--bands", "b7", "--splits", "1"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in result["columns"]] == ["Band 7"]
    table = (out / "table.md").read_text()
    assert "| FusionNet (CNN5 branches) | 87.4 |" in table  # the paper's Table III figure for the same cell
    assert "all five branches" in table
    model = load_checkpoint(out / "cells" / "fusionnet-cnn5" / "b7" / "split_0" / "best.pt")
    assert model.checkpoint["data"]["replicated_branch"] == "b7"


def test_replicated_branch_repeats_the_one_band():
    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(1, 3, 8, 8), i

    x, y = ReplicatedBranch(One())[1]
    assert x.shape == (len(BRANCHES), 3, 8, 8) and y == 1
    assert all(torch.equal(x[0], x[k]) for k in range(1, len(BRANCHES)))


# ------------------------------------------------------------------------------------------------------ baselines


class ResNetLike(nn.Module):
    """Shaped like torchvision's ResNet at the top level: conv1, bn1, layer1, avgpool, fc (1000 classes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 1000)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGGLike(nn.Module):
    """Shaped like torchvision's VGG and EfficientNet: features, avgpool, classifier ending in Linear(..., 1000)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1000))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def stand_in_factory(arch: bl.Arch, pretrained: bool) -> nn.Module:
    torch.manual_seed(1234 if pretrained else 0)  # "ImageNet" weights: the same every time
    return ResNetLike() if arch.head == "fc" else VGGLike()


def test_transfer_protocol_freezes_the_feature_extractor_and_keeps_its_batchnorm_statistics():
    model = bl.build_baseline("resnet18", pretrained=True, input_size=16, factory=stand_in_factory)
    assert model.net.fc.out_features == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias"}
    model.train()
    assert not model.net.bn1.training and not model.net.layer1[1].training and model.net.fc.training
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(model.prepare(torch.rand(4, 3, 9, 9))), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN running statistics untouched too

    scratch = bl.build_baseline("resnet18", pretrained=False, input_size=16, factory=stand_in_factory)
    assert all(p.requires_grad for p in scratch.parameters())
    scratch.train()
    assert scratch.net.bn1.training
    full = bl.build_baseline("resnet18", pretrained=True, input_size=16, factory=stand_in_factory, finetune="all")
    assert all(p.requires_grad for p in full.parameters()) and not full.frozen_modules()


def test_classifier_block_head_replacement_and_input_preparation():
    model = bl.build_baseline("vgg13", pretrained=True, input_size=20, factory=stand_in_factory)
    assert model.net.classifier[3].out_features == 2 and model.net.classifier[0].out_features == 8
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "net.classifier.0.weight",
        "net.classifier.0.bias",
        "net.classifier.3.weight",
        "net.classifier.3.bias",
    }
    x = model.prepare(torch.full((1, 3, 35, 35), 0.5))
    assert x.shape == (1, 3, 20, 20)
    assert x[0, :, 0, 0].tolist() == pytest.approx([(0.5 - m) / s for m, s in zip(bl.IMAGENET_MEAN, bl.IMAGENET_STD)])
    with pytest.raises(ConfigError, match="no 'fc' classifier block"):
        bl.BaselineNet(VGGLike(), bl.ARCHS["resnet18"], False, 20)


def test_baselines_with_a_stand_in_network_write_the_transfer_learning_figure(data, tmp_path):
    settings = ExperimentSettings(data=str(data), out=str(tmp_path / "b"), quick=True, progress=False)
    result = bl.run_baselines(settings, ["resnet18", "efficientnet_b0"], ["b10", "b76"], ["b10"],
                              factory=stand_in_factory, save_checkpoints=True, log=lambda m: None)  # fmt: skip
    assert [r["label"] for r in result["rows"]] == ["ResNet18", "EfficientNet-B0", "TLResNet18", "TLEfficientNet-B0"]
    cells = {(c["row"], c["column"]) for c in result["cells"]}
    assert cells == {("resnet18", "b10"), ("resnet18", "b76"), ("efficientnet_b0", "b10"), ("efficientnet_b0", "b76"),
                     ("tl-resnet18", "b10"), ("tl-efficientnet_b0", "b10")}  # fmt: skip
    tl = next(c for c in result["cells"] if c["row"] == "tl-resnet18")
    assert tl["splits"][0]["trainable_parameters"] < tl["splits"][0]["parameters"]
    panels = result["figures"]["transfer_learning.png"]["panels"]
    assert [p["band"] for p in panels] == ["b10"] and len(panels[0]["archs"]) == 2
    assert len(panels[0]["archs"][0]["scratch"]) == 2
    out = Path(settings.out)
    assert is_png(out / "transfer_learning.png")
    table = (out / "table.md").read_text()
    assert "| TLResNet18 |" in table and "Fig. 7" in table and "| – |" in table  # TL not run on Band 7:6
    saved = torch.load(out / tl["splits"][0]["checkpoint"], weights_only=True)
    assert saved["format"] == "fusionkern-baseline" and saved["arch"] == "resnet18" and saved["pretrained"]
    net = stand_in_factory(bl.ARCHS["resnet18"], False)
    bl._replace_last_linear(net, "fc", 2)
    net.load_state_dict(saved["state_dict"])


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)


def test_baselines_skip_with_one_line_when_torchvision_is_missing(no_torchvision, data, tmp_path, capsys):
    out = tmp_path / "b"
    assert run_cli(["experiment", "baselines", "--data", str(data), "--out", str(out), "--quick"]) == 0
    line = one_line_error(capsys)
    assert line.startswith("baselines skipped:") and "torchvision" in line and "fusionkern[baselines]" in line
    assert not out.exists()
    settings = ExperimentSettings(data=str(data), out=str(out), quick=True)
    with pytest.raises(MissingDependencyError, match="torchvision"):
        bl.run_baselines(settings)


@pytest.fixture
def fake_torchvision(monkeypatch, tmp_path):
    """A ``torchvision.models`` with the documented builder and weights-enum API, building stand-in networks."""
    built = []

    class Weights:
        def __init__(self, url):
            self.url = url

    def builder(weights=None):
        built.append(weights)
        net = ResNetLike()
        if weights is not None:
            state = torch.load(bl.imagenet_cache_path(weights.url), weights_only=True)  # as torchvision reads its cache
            net.load_state_dict(state)
        return net

    models = types.ModuleType("torchvision.models")
    models.resnet18 = builder
    models.ResNet18_Weights = types.SimpleNamespace(
        IMAGENET1K_V1=Weights("https://example.invalid/resnet18-f37072fd.pth")
    )
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return built


def test_torchvision_factory_reads_weights_dir_or_cache_and_never_downloads_when_told(fake_torchvision, tmp_path):
    arch = bl.ARCHS["resnet18"]
    torch.manual_seed(7)
    reference = ResNetLike().state_dict()
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, wdir / "resnet18-f37072fd.pth")
    net = bl.torchvision_factory(weights_dir=wdir)(arch, True)
    assert torch.equal(net.conv1.weight, reference["conv1.weight"]) and fake_torchvision == [None]

    assert bl.torchvision_factory()(arch, False) is not None and fake_torchvision[-1] is None
    with pytest.raises(InputError, match="not in torchvision's cache"):
        bl.torchvision_factory(download=False)(arch, True)
    cache = bl.imagenet_cache_path("https://example.invalid/resnet18-f37072fd.pth")
    cache.parent.mkdir(parents=True)
    torch.save(reference, cache)
    net = bl.torchvision_factory(download=False)(arch, True)
    assert torch.equal(net.fc.weight, reference["fc.weight"]) and fake_torchvision[-1] is not None

    (wdir / "resnet18-f37072fd.pth").unlink()
    with pytest.raises(InputError, match="resnet18-f37072fd.pth or resnet18.pth"):
        bl.torchvision_factory(weights_dir=wdir)(arch, True)
    torch.save({"other.weight": torch.zeros(1)}, wdir / "resnet18.pth")
    with pytest.raises(CheckpointError, match="do not fit ResNet18"):
        bl.torchvision_factory(weights_dir=wdir)(arch, True)


# -------------------------------------------------------------------------------------------------------- explain


def test_cam_of_a_gap_linear_model_averages_to_its_logit():
    torch.manual_seed(0)
    model = DGCNN(preset="native", width=0.25).eval()
    x = torch.rand(3, 3, 35, 35)
    with torch.no_grad():
        fmap = feature_map(model, x)
        assert torch.allclose(fmap.mean((2, 3)), model.forward_features(x), atol=1e-6)
        raw = torch.einsum("bchw,c->bhw", fmap, model.fc.weight[1]).mean((1, 2)) + model.fc.bias[1]
        assert torch.allclose(raw, model(x)[:, 1], atol=1e-5)
        cams = class_activation_maps(model, x, torch.tensor([0, 1, 1]), 35)
    assert cams.shape == (3, 35, 35)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 and torch.all(cams.amax((1, 2)) == 1.0)


def test_explain_cli_all_sites_without_sklearn_skips_tsne(ablation, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    ckpt = ablation / "cells" / "cnn5" / "b10" / "split_1" / "best.pt"
    out = tmp_path / "x"
    assert (
        run_cli(["explain", str(ckpt), "--data", str(data), "--out", str(out), "--sites", "all", "--chips", "2"]) == 0
    )
    printed = capsys.readouterr().out
    assert "t-SNE skipped: it needs scikit-learn" in printed and "fusionkern[experiments]" in printed
    info = json.loads((out / "explain.json").read_text())
    assert len(info["sites"]["keys"]) == 30 and info["models"][0]["tsne"] is None
    assert len(info["cam"]["sites"]) == 4 and info["cam"]["sites"][0].startswith("cement/")
    assert is_png(out / "cam.png") and not (out / "tsne.png").exists()


def test_explain_fusionnet_skips_its_degenerate_cam_but_embeds_its_features(data, tmp_path, capsys):
    from fusionkern.models import save_checkpoint

    ckpt = save_checkpoint(FusionNet(preset="native", width=0.25), tmp_path / "f.pt")
    cnn = save_checkpoint(CNN5(preset="native", width=0.25), tmp_path / "c.pt", data={"branch": "b7"})
    out = tmp_path / "x"
    assert run_cli(["explain", str(ckpt), str(cnn), "--data", str(data), "--out", str(out), "--sites", "test"]) == 0
    printed = capsys.readouterr().out
    assert "records no split; using every site" in printed and "CAM skipped for FusionNet (DGCNN)" in printed
    info = json.loads((out / "explain.json").read_text())
    assert [m["label"] for m in info["models"]] == ["FusionNet (DGCNN)", "CNN5 on Band 7"]
    assert np.asarray(info["models"][0]["tsne"]).shape == (30, 2)
    assert is_png(out / "cam.png") and is_png(out / "tsne.png")
    assert np.load(out / "cam.npz")["models"].tolist() == ["CNN5 on Band 7"]


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args,message",
    [
        (["experiment", "ablation", "--models", "cnn6"], "--models: unknown 'cnn6'"),
        (["experiment", "ablation", "--bands", "b9"], "--bands: unknown 'b9'"),
        (["experiment", "fusion", "--epochs", "0"], "epochs must be at least 1"),
        (["experiment", "baselines", "--models", "alexnet"], "--models: unknown 'alexnet'"),
        (["experiment", "ablation", "--data", "{missing}"], "does not exist"),
        (["explain", "{missing}/best.pt"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, data, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    assert run_cli(args + ["--out", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "o" / "results.json").exists()


def test_markdown_tells_a_cell_not_run_from_an_undefined_metric():
    nan = float("nan")
    metrics = {k: {"mean": 0.5, "std": 0.0, "n": 1} for k in
               ("accuracy", "cement_accuracy", "landcover_accuracy", "cement_recall", "f1")}  # fmt: skip
    metrics["cement_precision"] = {"mean": nan, "std": nan, "n": 0}
    result = {
        "title": "T", "sites": {"cement": 1, "landcover": 2}, "notes": [], "paper": {},
        "settings": {"data": "d", "preset": "native", "width": 1.0, "epochs": 1, "batch_size": 1, "lr": 1.0,
                     "class_weights": [3, 1], "augment": True, "seed": 0, "quick": False},
        "rows": [{"key": "a", "label": "A"}],
        "columns": [{"key": "b10", "label": "Band 10"}, {"key": "b6", "label": "Band 6"}],
        "cells": [{"row": "a", "column": "b10", "summary": {"splits": 1, "metrics": metrics,
                                                           "confusion_matrix": [[1, 0], [0, 1]]}}],
    }  # fmt: skip
    text = markdown(result)
    assert "| A | 50.0 ± 0.0 | – |" in text
    assert "| A | n/a | – |" in text
