"""The benchmark report and ``fusionkern bench``: ratios, goals and files from synthetic pytest-benchmark JSON, the
command in-process on a tiny selection, and its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionkern.cli as cli
from fusionkern.bench.cases import gabor_bank_loop, layer_shape, make_plan
from fusionkern.errors import ConfigError
from fusionkern.bench.report import (
    GOALS,
    Goal,
    build_report,
    evaluate_goals,
    render_markdown,
    rows_from_pytest_benchmark,
    write_report,
)
from fusionkern.bench.roofline import ByteCounter, site_costs
from fusionkern.bench.runner import find_suite
from fusionkern.models import DilatedAvgBlock, FusionNet, GaborConv2d, gabor_bank
from fusionkern.models.profile import conv_flops, count_flops, flops_per_site


def entry(group, case, variant, baseline, median, *, inner=1, items=1, **info):
    """One pytest-benchmark JSON entry as the suite writes it."""
    return {
        "group": group,
        "name": f"test_{case}[{variant}]",
        "fullname": f"benchmarks/test_x.py::test_{case}[{variant}]",
        "params": {},
        "param": variant,
        "extra_info": {"case": case, "variant": variant, "baseline": baseline, "inner": inner, "items": items, **info},
        "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median, "stddev": median * 0.05,
                  "median": median, "iqr": median * 0.04, "rounds": 10},  # fmt: skip
    }


def synthetic(device="cuda"):
    """A run where some goals are met and some are not (times in seconds per round)."""
    g = "layers/gabor_stage/fwd/fp32/paper"
    b = "layers/conv_stage/bwd/bf16/native"
    return {
        "version": "5.3.1",
        "datetime": "2026-11-25T00:00:00",
        "benchmarks": [
            # forward: triton 2x eager (goal 1.5: met), 1.25x compile (goal 1.0: met); 10 calls per round for triton
            entry(g, "layers", "eager", "eager", 2e-3, items=64, layer="gabor_stage", **{"pass": "fwd"}),
            entry(g, "layers", "compile", "eager", 1.25e-3, items=64, layer="gabor_stage", **{"pass": "fwd"}),
            entry(g, "layers", "triton", "eager", 1e-2, inner=10, items=64, layer="gabor_stage", **{"pass": "fwd"}),
            # backward: triton 1.1x eager (goal 1.2: not met)
            entry(b, "layers", "eager", "eager", 1.1e-3, items=256, layer="conv_stage", **{"pass": "bwd"}),
            entry(b, "layers", "triton", "eager", 1e-3, items=256, layer="conv_stage", **{"pass": "bwd"}),
            # training: triton 1.5x faster (met), memory 0.8x (goal 0.7: not met)
            entry("train/paper", "train", "eager", "eager", 0.3, items=64, peak_mem_bytes=10e9, precision="fp32"),
            entry("train/paper", "train", "triton", "eager", 0.2, items=64, peak_mem_bytes=8e9, precision="fp32"),
            # model at batch 256: tensorrt 6x eager (met), 1.2x compile-bf16 (not met)
            entry("model/native/b256", "model", "eager-fp32", "eager-fp32", 0.6, items=256, batch=256,
                  preset="native", precision="fp32", flops_per_item=3.4e8, flops_per_item_nominal=5.5e8),
            entry("model/native/b256", "model", "compile-bf16", "eager-fp32", 0.12, items=256, batch=256,
                  preset="native", precision="bf16", flops_per_item=3.4e8),
            entry("model/native/b256", "model", "tensorrt-fp16", "eager-fp32", 0.1, items=256, batch=256,
                  preset="native", precision="fp16", flops_per_item=3.4e8),
            # roofline ceilings and costs
            entry("roofline/matmul", "matmul", "fp32", "fp32", 0.02, items=2 * 8192**3),
            entry("roofline/matmul", "matmul", "bf16", "fp32", 0.002, items=2 * 8192**3),
            entry("roofline/copy", "copy", "copy", "copy", 1e-3, items=2 * 2**30),
            entry("roofline/costs/native", "costs", "costs", "costs", 1.0, timed=False, preset="native",
                  flops_per_site_effective=3.4e8, flops_per_site_nominal=5.5e8, bytes_floor_per_site=8e4,
                  bytes_eager_per_site=4e6, intensity_floor=4250.0, intensity_eager=85.0, cost_batch=256, width=1.0, input_size=35, params=15950001),
        ],
    }  # fmt: skip


def by_variant(rows, group):
    return {r.variant: r for r in rows if r.group == group}


def test_ratios_use_the_same_group_baseline_and_calls_per_round():
    rows = rows_from_pytest_benchmark(synthetic())
    fwd = by_variant(rows, "layers/gabor_stage/fwd/fp32/paper")
    assert fwd["eager"].ratio == pytest.approx(1.0) and fwd["eager"].is_baseline
    assert fwd["compile"].ratio == pytest.approx(1.6)
    assert fwd["triton"].time_s == pytest.approx(1e-3)  # 10 calls per round
    assert fwd["triton"].ratio == pytest.approx(2.0)
    assert fwd["triton"].baseline_time_s == pytest.approx(2e-3)
    assert fwd["triton"].throughput == pytest.approx(64 / 1e-3)
    train = by_variant(rows, "train/paper")
    assert train["triton"].ratio == pytest.approx(1.5)
    assert train["triton"].mem_ratio == pytest.approx(0.8)
    costs = [r for r in rows if r.case == "costs"]
    assert costs and costs[0].time_s is None and costs[0].ratio is None


def test_ratio_compares_throughput_when_items_differ():
    data = {"benchmarks": [
        entry("scan/native/torch", "scan", "inference", "inference", 1.0, items=1024),
        entry("scan/native/torch", "scan", "end_to_end", "inference", 1.0, items=512),
    ]}  # fmt: skip
    rows = by_variant(rows_from_pytest_benchmark(data), "scan/native/torch")
    assert rows["end_to_end"].ratio == pytest.approx(0.5)


def test_missing_baseline_leaves_no_ratio():
    data = {"benchmarks": [entry("layers/x", "layers", "compile", "eager", 1.0)]}
    (row,) = rows_from_pytest_benchmark(data)
    assert row.ratio is None and row.baseline_time_s is None


def test_goals_met_not_met_and_not_measured():
    rows = rows_from_pytest_benchmark(synthetic())
    results = {(g.goal, g.group): g for g in evaluate_goals(rows, "cuda")}
    assert results[("layer-fwd-eager", "layers/gabor_stage/fwd/fp32/paper")].status == "met"
    assert results[("layer-fwd-compile", "layers/gabor_stage/fwd/fp32/paper")].measured == pytest.approx(1.25)
    assert results[("layer-bwd-eager", "layers/conv_stage/bwd/bf16/native")].status == "not met"
    assert results[("train-step-eager", "train/paper")].status == "met"
    memory = results[("train-peak-memory", "train/paper")]
    assert memory.status == "not met" and memory.measured == pytest.approx(0.8)
    assert results[("trt-fp16-eager", "model/native/b256")].status == "met"
    assert results[("trt-fp16-eager", "model/native/b256")].measured == pytest.approx(6.0)
    assert results[("trt-fp16-compile-bf16", "model/native/b256")].status == "not met"
    # No onnxruntime row, and a CPU goal on a CUDA run: not measured, with the reason.
    onnx = results[("onnx-native-cpu", None)]
    assert onnx.status == "not measured" and "CPU" in onnx.reason
    assert {g.key for g in GOALS} == {key for key, _ in results}


def test_goals_on_the_wrong_device_or_in_quick_mode_are_not_measured():
    rows = rows_from_pytest_benchmark(synthetic())
    on_cpu = evaluate_goals(rows, "cpu")
    layer = next(g for g in on_cpu if g.goal == "layer-fwd-eager")
    assert layer.status == "not measured" and "CUDA" in layer.reason
    quick = evaluate_goals(rows, "cuda", quick=True)
    assert all(g.status == "not measured" and "quick" in g.reason for g in quick)


def test_not_measured_names_the_skip_reason():
    goal = Goal("g", 4, "onnx", "model", "onnxruntime-fp32", "eager-fp32", 1.5, device="cpu")
    skipped = [{"test": "test_model[native-b64-onnxruntime-fp32]", "reason": "onnxruntime not installed"}]
    (result,) = evaluate_goals([], "cpu", skipped=skipped, goals=[goal])
    assert result.status == "not measured" and "onnxruntime not installed" in result.reason


def test_report_files_carry_baselines_ratios_and_goals(tmp_path):
    machine = {"name": "test-gpu", "device": "cuda", "cpu": {"model": "cpu"}, "gpu": {"name": "gpu"}}
    outcomes = {"passed": 14, "failed": [], "skipped": [{"test": "test_scan[x]", "reason": "no rasterio"}]}
    report = build_report(synthetic(), machine=machine, settings={"device": "cuda", "quick": False},
                          outcomes=outcomes, notes=["a note"])  # fmt: skip
    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["bench.json", "bench.md", "bench.png"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == "fusionkern-bench/1"
    triton = next(r for r in doc["results"] if r["variant"] == "triton" and r["case"] == "layers"
                  and r["group"].endswith("fwd/fp32/paper"))  # fmt: skip
    assert triton["ratio"] == pytest.approx(2.0) and triton["baseline_time_s"] == pytest.approx(2e-3)
    roof = doc["roofline"]
    assert roof["matmul_peak_flops"]["bf16"] == pytest.approx(2 * 8192**3 / 0.002)
    share = next(s for s in roof["shares"] if s["variant"] == "eager-fp32")
    peak = 2 * 8192**3 / 0.02
    assert share["share_of_peak"] == pytest.approx((256 / 0.6 * 3.4e8) / peak)  # effective FLOPs
    assert share["share_of_peak_nominal"] == pytest.approx((256 / 0.6 * 5.5e8) / peak)
    assert roof["costs"]["native"]["flops_per_site_nominal"] == 5.5e8
    md = paths["md"].read_text()
    assert "| issue | goal | group | measured | goal | status |" in md
    assert "| met |" in md and "| not met |" in md and "not measured" in md
    assert "> a note" in md and "no rasterio" in md and "## Roofline" in md
    assert "| GFLOP/site nominal | GFLOP/site effective |" in md and "| 0.55 | 0.34 |" in md
    assert "layers/conv_stage/bwd/bf16/native" in md  # slower-than-baseline or goal lines name the group


def test_markdown_of_a_quick_run_says_so():
    report = build_report(synthetic(), settings={"device": "cuda", "quick": True})
    md = render_markdown(report)
    assert "Quick mode" in md and "Not compared in quick mode" in md


def test_byte_counter_counts_reads_and_writes_not_views():
    a, b = torch.rand(1000), torch.rand(1000)
    with ByteCounter() as counter:
        c = a + b
        c.view(10, 100)
    assert counter.read == 8000 and counter.written == 4000 and counter.ops == 1


def brute_force_taps(in_hw, kernel, stride, padding, dilation) -> int:
    """(output position, tap) pairs whose tap lies inside the input: a convolution of ones with ones, padded."""
    ones = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    return int(F.conv2d(ones, torch.ones(1, 1, *kernel, dtype=torch.float64), None, stride, padding, dilation).sum())


def random_conv(rng) -> tuple[nn.Conv2d, tuple[int, int]]:
    """A convolution with random kernel, stride, dilation, padding and groups, and an odd input shape it accepts."""
    kernel = tuple(int(k) for k in rng.integers(1, 6, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 5, 2))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if rng.random() < 0.2:  # PyTorch's named paddings (stride 1 only); "same" pads the odd pixel after
        stride, padding = (1, 1), str(rng.choice(["same", "valid"]))
        smallest = span if padding == "valid" else [1, 1]
    else:
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        padding = tuple(int(p) for p in rng.integers(0, 10, 2))
        smallest = [max(1, s - 2 * p) for s, p in zip(span, padding)]
    in_hw = tuple(int(rng.integers(lo, lo + 18)) | 1 for lo in smallest)  # odd sides
    groups = int(rng.choice([1, 3]))
    return nn.Conv2d(3 * groups, 2 * groups, kernel, stride, padding, dilation, groups=groups), in_hw


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_effective_flops_count_exactly_the_taps_inside_the_input():
    rng = np.random.default_rng()
    for _ in range(60):
        conv, in_hw = random_conv(rng)
        x = torch.rand(2, conv.in_channels, *in_hw)
        out = conv(x)
        taps = brute_force_taps(in_hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        per_tap = 2 * conv.out_channels * conv.in_channels // conv.groups
        case = f"{conv} on {in_hw}"
        assert conv_flops(conv, x.shape, out.shape, effective=True) == per_tap * taps, case
        assert count_flops(conv, x, effective=True) == per_tap * taps, case
        nominal = conv_flops(conv, x.shape, out.shape)
        assert nominal == per_tap * out.shape[-2] * out.shape[-1] * conv.kernel_size[0] * conv.kernel_size[1], case
        assert per_tap * taps <= nominal, case


@pytest.mark.parametrize(("kernel", "stride", "dilation", "in_hw"), [
    (1, 1, 1, (13, 7)),  # 1 x 1: every tap is inside
    (1, 3, 1, (11, 9)),  # 1 x 1, strided
    (3, 1, 1, (9, 15)),  # 3 x 3 without padding
    (3, 2, 3, (17, 13)),  # 3 x 3 without padding, strided and dilated
])  # fmt: skip
def test_effective_flops_equal_nominal_without_padding(kernel, stride, dilation, in_hw):
    conv = nn.Conv2d(5, 7, kernel, stride, 0, dilation)
    x = torch.rand(1, 5, *in_hw)
    assert count_flops(conv, x, effective=True) == count_flops(conv, x) > 0


def test_effective_flops_of_the_native_dilated_block_and_models():
    block = DilatedAvgBlock(24, (1, 2, 3))  # the native preset's block, on its 4 x 4 map
    x = torch.rand(2, 24, 4, 4)
    # per axis, taps inside of 3 x 4 pairs: 10 (dilation 1), 8 (2), 6 (3)
    assert count_flops(block, x, effective=True) == 2 * 24 * 24 * (10**2 + 8**2 + 6**2)
    assert count_flops(block, x) == 2 * 24 * 24 * 9 * 16 * 3
    gabor = GaborConv2d(3, 4, 3, padding=2, dilation=2)
    image = torch.rand(1, 3, 5, 7)
    taps = brute_force_taps((5, 7), (3, 3), 1, 2, 2)
    assert count_flops(gabor, image, effective=True) == 2 * 3 * 4 * taps < count_flops(gabor, image)
    for preset in ("native", "paper"):
        model = FusionNet(preset=preset, width=0.25)
        assert 0 < flops_per_site(model, effective=True) < flops_per_site(model)


def test_site_costs_state_both_counts_and_use_the_effective_one():
    costs = site_costs("native", make_plan("cpu", quick=True))
    assert costs["flops_per_site_effective"] < costs["flops_per_site_nominal"]
    assert costs["intensity_floor"] == pytest.approx(costs["flops_per_site_effective"] / costs["bytes_floor_per_site"])


def test_loop_bank_is_the_legacy_bank():
    g = torch.Generator().manual_seed(0)
    freq, theta, sigma, psi = (torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.5 for _ in range(4))
    torch.testing.assert_close(gabor_bank_loop(freq, theta, sigma, psi, 3), gabor_bank(freq, theta, sigma, psi, 3,
                                                                                       "legacy"))  # fmt: skip


def test_layer_shapes_follow_the_presets():
    plan = make_plan("cuda")
    assert layer_shape("gabor_stage", "paper", plan).describe() == "64x3x256x256->32"
    assert layer_shape("conv_stage", "paper", plan).describe() == "64x32x128x128->64"
    assert layer_shape("dilated_block", "paper", plan).describe() == "64x512x16x16->512 d=1,3,6,9"
    assert layer_shape("attention", "paper", plan).describe() == "64x2560x16x16->2560"
    assert layer_shape("conv_stage", "native", plan).describe() == "256x32x17x17->64"
    assert layer_shape("dilated_block", "native", plan).describe() == "256x256x4x4->256 d=1,2,3"
    quick = make_plan("cpu", quick=True)
    assert layer_shape("attention", "native", quick).describe() == "2x160x4x4->160"


def test_the_plan_takes_another_width_and_scan_region():
    plan = make_plan("cpu", width=0.25, scan_px=2048)
    assert plan.model_width == 0.25 and plan.scan_size_px == 2048
    assert make_plan("cpu").model_width == 1.0 and make_plan("cpu").scan_size_px == 256
    with pytest.raises(ConfigError, match="width must be positive"):
        make_plan("cpu", width=0.0)
    with pytest.raises(ConfigError, match="at least 64 px"):
        make_plan("cpu", scan_px=32)


@pytest.fixture
def bench_cli():
    """The ``fusionkern`` entry point, in-process."""
    return cli.main


# A tiny selection: every timed code path of the runner and the report, in a few seconds.
TINY = "gabor_bank or copy or matmul or (test_layer and conv_stage and fwd and fp32)"


def test_bench_quick_cpu_writes_the_three_files(bench_cli, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_cli(["bench", "--quick", "--device", "cpu", "--out", str(out), "-k", TINY]) == 0
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    doc = json.loads((out / "bench.json").read_text())
    assert doc["settings"]["quick"] is True and doc["settings"]["device"] == "cpu"
    assert doc["machine"]["cpu"]["model"] and doc["machine"]["torch_build"] == torch.__version__
    groups = {r["group"] for r in doc["results"]}
    assert {"gabor_bank/fwd", "gabor_bank/full", "roofline/copy", "roofline/matmul",
            "layers/conv_stage/fwd/fp32/native"} <= groups  # fmt: skip
    bank = {r["variant"]: r for r in doc["results"] if r["group"] == "gabor_bank/fwd"}
    assert bank["loop"]["is_baseline"] and bank["vectorised"]["ratio"] > 0
    assert bank["vectorised"]["baseline_time_s"] == pytest.approx(bank["loop"]["time_s"])
    skipped = {s["test"]: s["reason"] for s in doc["outcomes"]["skipped"]}
    assert any("triton" in t and "CUDA" in reason for t, reason in skipped.items())
    assert "report in" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_cuda_without_cuda_is_one_line(bench_cli, tmp_path, capsys):
    assert bench_cli(["bench", "--device", "cuda", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda needs a CUDA GPU") and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_bench_without_a_suite_says_where_it_looked(bench_cli, tmp_path, capsys):
    args = ["bench", "--quick", "--device", "cpu", "--suite", str(tmp_path), "--out", str(tmp_path / "b")]
    assert bench_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "benchmark suite not found" in err and str(tmp_path) in err and "\n" not in err


FAILING_SUITE_CONFTEST = """
def pytest_addoption(parser):
    for name in ("--quick",):
        parser.addoption(name, action="store_true")
    for name in ("--bench-device", "--bench-time", "--bench-threads"):
        parser.addoption(name)
"""

FAILING_SUITE_TEST = """
def test_bench_ok(benchmark):
    benchmark.group = "g"
    benchmark.extra_info.update(case="copy", variant="copy", baseline="copy", items=1)
    benchmark.pedantic(lambda: None, rounds=1)

def test_bench_broken(benchmark):
    raise RuntimeError("kernel exploded")
"""


def test_a_failing_case_is_reported_and_fails_the_command(bench_cli, tmp_path, capsys):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(FAILING_SUITE_CONFTEST)
    (suite / "test_bench_fake.py").write_text(FAILING_SUITE_TEST)
    out = tmp_path / "out"
    assert bench_cli(["bench", "--device", "cpu", "--suite", str(suite), "--out", str(out)]) == 1
    doc = json.loads((out / "bench.json").read_text())
    (failed,) = doc["outcomes"]["failed"]
    assert failed["test"] == "test_bench_broken" and "kernel exploded" in failed["message"]
    assert [r["group"] for r in doc["results"]] == ["g"]
    assert "## Failed" in (out / "bench.md").read_text()
    assert "1 benchmark case(s) failed" in capsys.readouterr().err


def test_default_suite_is_the_repository_folder():
    suite = find_suite()
    assert (suite / "conftest.py").is_file() and suite.name == "benchmarks"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_quick_cuda_runs_the_kernels(bench_cli, tmp_path):
    out = tmp_path / "bench"
    code = bench_cli(["bench", "--quick", "--device", "cuda", "--out", str(out), "-k",
                      "test_layer and fwd and fp32 or roofline"])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "bench.json").read_text())
    triton = [r for r in doc["results"] if r["variant"] == "triton"]
    assert triton and all(math.isfinite(r["time_s"]) for r in triton)
    assert doc["machine"]["gpu"]["name"]
