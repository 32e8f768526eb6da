"""`fusionkern train` in-process on a tiny synthetic dataset: outputs, checkpoints, configs, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fusionkern import CLASSES
from fusionkern.cli import main
from fusionkern.data import make_synthetic_sites
from fusionkern.metrics import classification_metrics, summarise
from fusionkern.models import DGCNN, FusionNet, load_checkpoint


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    make_synthetic_sites(root, n_cement=10, n_landcover=20, seed=7)
    return root


def test_train_fusionnet_writes_report_metrics_and_loadable_checkpoints(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(tiny_data), "--out", str(out), "--preset", "native", "--width", "0.25",
                 "--epochs", "2", "--batch-size", "8", "--splits", "2", "--lr", "1e-3", "--no-progress"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == list(CLASSES)
    assert metrics["sites"] == {"cement": 10, "landcover": 20}
    assert len(metrics["splits"]) == 2
    for run in metrics["splits"]:
        test = run["test"]
        cm = test["confusion_matrix"]
        assert sum(map(sum, cm)) == test["n"] == 6  # 20 % of 30 sites, stratified: 2 cement + 4 landcover
        assert sum(cm[0]) == 2
        assert 0.0 <= test["accuracy"] <= 1.0
        assert len(run["history"]) == 2
    for key in ("accuracy", "cement_recall", "cement_precision", "f1", "cement_accuracy", "landcover_accuracy"):
        assert set(metrics["summary"][key]) == {"mean", "std", "n"}
    report = (out / "report.md").read_text()
    assert "mean +- std" in report and "| 0 |" in report and "| 1 |" in report
    for k in range(2):
        raw = torch.load(out / f"split_{k}" / "best.pt", weights_only=True)
        assert raw["metadata"]["split"] == k
        model = load_checkpoint(out / f"split_{k}" / "best.pt", expect=FusionNet)
        assert model.config["preset"] == "native" and model.config["width"] == 0.25
        assert model(torch.rand(1, 5, 3, 35, 35)).shape == (1, 2)
    assert "test accuracy" in capsys.readouterr().out


def test_train_single_input_model_from_yaml_config_with_flag_override(tiny_data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {tiny_data}\nmodel: dgcnn\nbranch: b7\npreset: native\nwidth: 0.25\n"
                   f"epochs: 3\nbatch_size: 16\nsplits: 1\nprogress: false\nalphas: authors\n")  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1  # the flag wins over the file
    assert metrics["config"]["branch"] == "b7" and metrics["config"]["alphas"] == "authors"
    model = load_checkpoint(out / "split_0" / "best.pt", expect="DGCNN")
    assert isinstance(model, DGCNN) and model.checkpoint["data"]["branch"] == "b7"


def test_train_on_physical_units_records_it_and_the_scan_refuses_it_as_first_pass(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--preset", "native", "--width", "0.25",
                 "--epochs", "1", "--batch-size", "16", "--splits", "1", "--scaling", "physical",
                 "--no-progress"]) == 0  # fmt: skip
    model = load_checkpoint(out / "split_0" / "best.pt", expect=FusionNet)
    assert model.checkpoint["data"]["scaling"] == "physical-units"
    assert json.loads((out / "metrics.json").read_text())["config"]["scaling"] == "physical"
    assert "physical scaling" in (out / "report.md").read_text()
    capsys.readouterr()
    code = main(["scan", str(out / "split_0" / "best.pt"), "--scenes", "a", "b", "c", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "physical-units" in err[0] and "--verify" in err[0]
    assert not (tmp_path / "s").exists()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {tiny_data}\nscaling: zscore\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown scaling 'zscore'" in err[0]


def test_train_physicsnet_verifier(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--model", "physicsnet", "--scaling", "physical",
                 "--preset", "native", "--width", "0.25", "--epochs", "1", "--batch-size", "16", "--splits", "1",
                 "--no-progress"]) == 0  # fmt: skip
    model = load_checkpoint(out / "split_0" / "best.pt", expect="PhysicsNet")
    assert model.checkpoint["data"]["scaling"] == "physical-units" and model.checkpoint["data"]["branch"] is None
    assert model(torch.rand(2, 5, 3, 35, 35)).shape == (2, 2)
    assert "PhysicsNet (verifier)" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{missing}"], "missing"),
        (["--model", "resnet"], "unknown 'resnet'"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--alphas", "1,x"], "--alphas"),
    ],
)
def test_train_bad_options_are_one_line_errors(args, message, tiny_data, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    base = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--preset", "native"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_config_file_unknown_key_and_bad_yaml(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: x\nepochz: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['epochz']" in capsys.readouterr().err
    cfg.write_text("data: [unclosed\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "cfg.yaml is not valid YAML" in capsys.readouterr().err
    cfg.write_text("data: x\namp: fp8\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "amp: unknown 'fp8'" in capsys.readouterr().err


def test_metrics_match_hand_counts():
    y_true = [0, 0, 0, 1, 1, 1, 1, 1]
    y_pred = [0, 0, 1, 1, 1, 1, 0, 1]
    m = classification_metrics(y_true, y_pred)
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["cement_recall"] == pytest.approx(2 / 3) == m["cement_accuracy"]
    assert m["landcover_accuracy"] == pytest.approx(4 / 5)
    assert m["cement_precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    s = summarise([{"accuracy": 0.5}, {"accuracy": 0.7}], keys=["accuracy"])
    assert s["accuracy"]["mean"] == pytest.approx(0.6) and s["accuracy"]["std"] == pytest.approx(0.1)


def test_triton_backend_without_cuda_is_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--preset", "native",
                 "--backend", "triton", "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "triton backend runs on a CUDA device" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_lone_last_training_site_does_not_stop_training(tiny_data, tmp_path):
    # 30 sites in one split leave 19 to train on: batches of 18 would end on a batch of one site, which batch norm
    # refuses in training mode ("Expected more than 1 value per channel").
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--preset", "native", "--width", "0.25",
                 "--epochs", "1", "--batch-size", "18", "--splits", "1", "--no-progress"]) == 0  # fmt: skip
    assert len(json.loads((out / "metrics.json").read_text())["splits"]) == 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training(amp, tiny_data, tmp_path):
    """``--amp``: the forward runs in the lower precision under autocast, the weights stay float32, the run is
    recorded with its setting, and fp16 scales the loss."""
    from torch.nn.modules.module import register_module_forward_hook

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    linear_out = []
    hook = register_module_forward_hook(
        lambda mod, args, out: linear_out.append(out.dtype) if isinstance(mod, torch.nn.Linear) else None
    )
    scalers = []
    real_scaler = torch.amp.GradScaler

    def scaler(*args, **kwargs):
        scalers.append(kwargs.get("enabled"))
        return real_scaler(*args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.amp, "GradScaler", scaler)
            out = tmp_path / "run"
            assert main(["train", "--data", str(tiny_data), "--out", str(out), "--preset", "native", "--width",
                         "0.25", "--epochs", "1", "--batch-size", "8", "--splits", "1", "--lr", "1e-3", "--amp", amp,
                         "--no-progress"]) == 0  # fmt: skip
    finally:
        hook.remove()
    assert linear_out and set(linear_out) == {low}
    assert scalers == [amp == "fp16"]
    raw = torch.load(out / "split_0" / "best.pt", weights_only=True)
    assert raw["metadata"]["train_config"]["amp"] == amp
    assert all(v.dtype == torch.float32 for v in raw["state_dict"].values() if v.is_floating_point())
    run = json.loads((out / "metrics.json").read_text())["splits"][0]
    assert 0.0 <= run["test"]["accuracy"] <= 1.0 and all(math.isfinite(h["train_loss"]) for h in run["history"])
