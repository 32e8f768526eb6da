"""The benchmark suite's options and shared fixtures.

    pytest benchmarks/ --benchmark-only                      # time every case (device: cuda if visible, else cpu)
    pytest benchmarks/ --benchmark-only --bench-device cpu   # force the CPU
    pytest benchmarks/ --benchmark-disable                   # quick: each case once on tiny shapes (CI)
    pytest benchmarks/ --quick --benchmark-json out.json     # tiny shapes, one timed round each

``fusionkern bench`` runs this suite in-process and turns its JSON into bench.json / bench.md / bench.png.
Each case writes into ``benchmark.extra_info`` its case family, its variant and the baseline variant of its group
(see :func:`fusionkern.bench.cases.record`).
"""

from __future__ import annotations

import os

import pytest
import torch

from fusionkern.bench.cases import Artefacts, make_plan, use_torch_fp32_defaults
from fusionkern.bench.timing import TimingSettings


def pytest_addoption(parser):
    group = parser.getgroup("fusionkern-bench", "fusionkern benchmark suite")
    group.addoption("--quick", action="store_true", default=False,
                    help="tiny shapes, one call per case (implied by --benchmark-disable)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device of the cases (default: cuda when a GPU is visible, else cpu)")
    group.addoption("--bench-time", type=float, default=None,
                    help="seconds spent timing each case after warm-up (default 1)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="CPU threads of torch and onnxruntime during the run (default: theirs)")  # fmt: skip
    group.addoption("--bench-width", type=float, default=None,
                    help="FusionNet width of the model, train and scan cases (default: the plan's, 1.0)")
    group.addoption("--bench-scan-px", type=int, default=None,
                    help="side of the scan cases' generated region (default: the plan's)")


def _device_name(config) -> str:
    return config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _quick(config) -> bool:
    return bool(config.getoption("quick") or config.getoption("benchmark_disable", default=False))


def _plan(config):
    return make_plan(_device_name(config), _quick(config), config.getoption("bench_time"),
                     config.getoption("bench_threads"), width=config.getoption("bench_width"),
                     scan_px=config.getoption("bench_scan_px"))  # fmt: skip


_SAVED_THREADS: list[int] = []
_SAVED_TF32: list[tuple[bool, bool]] = []


def pytest_configure(config):
    threads = config.getoption("bench_threads")
    if threads:
        _SAVED_THREADS.append(torch.get_num_threads())
        torch.set_num_threads(threads)
    if _device_name(config) == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--bench-device cuda needs a CUDA GPU, and torch sees none")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError("TRITON_INTERPRET=1 is set: unset it to benchmark the kernels on the GPU")
        _SAVED_TF32.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        use_torch_fp32_defaults()  # the baseline users run: TF32 convolutions, as the fused kernels by default


def pytest_unconfigure(config):
    # An in-process run (fusionkern bench) leaves the caller's thread count and TF32 switches as they were.
    if _SAVED_THREADS:
        torch.set_num_threads(_SAVED_THREADS.pop())
    if _SAVED_TF32:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _SAVED_TF32.pop()


def pytest_report_header(config):
    plan = _plan(config)
    threads = plan.threads or torch.get_num_threads()
    return f"fusionkern bench: device {plan.device}, {'quick' if plan.quick else 'full'} plan, {threads} CPU threads"


def pytest_benchmark_generate_commit_info(config):
    """The commit, read without touching the git index (pytest-benchmark's own asks ``git describe --dirty``)."""
    from fusionkern.bench.machine import commit_info

    info = commit_info()
    return {"id": info["id"], "time": info["time"], "author_time": info["time"], "dirty": info["dirty"],
            "project": "fusionkern", "branch": info["branch"]}  # fmt: skip


def pytest_benchmark_update_machine_info(config, machine_info):
    from fusionkern.bench.machine import describe_machine

    machine_info["fusionkern"] = describe_machine(_device_name(config))


def pytest_generate_tests(metafunc):
    """Presets and batch sizes come from the plan (device and quick mode)."""
    config = metafunc.config
    plan = _plan(config)
    names = metafunc.fixturenames
    if "model_batch" in names:
        cases = [(preset, b) for preset, batches in plan.model_batches.items() for b in batches]
        metafunc.parametrize(("preset", "model_batch"), cases, ids=[f"{p}-b{b}" for p, b in cases])
    for name, presets in (("layer_preset", plan.layer_presets), ("train_preset", tuple(plan.train_batch)),
                          ("scan_preset", plan.scan_presets), ("cost_preset", plan.cost_presets)):  # fmt: skip
        if name in names:
            metafunc.parametrize(name, presets)


@pytest.fixture(scope="session")
def plan(pytestconfig):
    return _plan(pytestconfig)


@pytest.fixture(scope="session")
def device(plan) -> torch.device:
    return torch.device(plan.device)


@pytest.fixture(scope="session")
def timing(plan, device) -> TimingSettings:
    return TimingSettings(device=device, quick=plan.quick, target_s=plan.target_s)


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> Artefacts:
    """ONNX files and TensorRT engines, exported once per model and precision for the whole run."""
    return Artefacts(tmp_path_factory.mktemp("artefacts"))
