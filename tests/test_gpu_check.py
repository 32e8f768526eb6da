"""The GPU check (benchmarks/gpu_check.sh, package benchmarks/gpucheck) on the CPU: the offline setup, the budget,
the correctness units and their comparisons on the Triton interpreter, the timing phase and the report.

On a GPU the same code runs compiled kernels and CUDA events; here it runs the interpreter and the host clock, so
that the check cannot rot between visits to a GPU machine (``make test`` also runs ``gpu_check.sh --dry-run``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpucheck import correctness as corr  # noqa: E402
from gpucheck import install, plan, report  # noqa: E402
from gpucheck import timings as timing_phase  # noqa: E402

TIMING_PHASE = plan.PHASES[1]  # (the no-timed-asserts check reads the phase's name as a duration)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU self-test of the GPU check; on a GPU run benchmarks/gpu_check.sh itself"
)


# ---------------------------------------------------------------------------------------------------- setup


def test_link_folder_imports_the_checkout(tmp_path):
    rep = install.install(REPO, tmp_path, sys.executable, None)
    code = "import fusionkern.kernels as k, fusionkern.export as e, fusionkern.bench; print(k.__file__, e.__file__)"
    env = {"PYTHONPATH": ":".join(rep.pythonpath()), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=env).stdout.split()  # fmt: skip
    assert [str(Path(p).resolve()) for p in out] == [str(REPO / "kernels" / "__init__.py"),
                                                     str(REPO / "export" / "__init__.py")]  # fmt: skip
    assert str(rep.site) == out[0].split("/fusionkern/")[0]  # imported through the link folder, not the venv's finder


def test_link_folder_matches_setup_package_dir():
    text = (REPO / "setup.py").read_text()
    mapped = dict(re.findall(r'"fusionkern\.(\w+)": "(\w+)"', text))
    assert mapped == install.PACKAGE_DIRS


def _wheel(folder: Path, name: str, version: str = "1.0", tag: str = "py3-none-any", module: str = "") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        if module:
            z.writestr(f"{module}.py", "VALUE = 42\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_wheels_install_only_what_this_python_lacks(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe", module="gpucheck_probe")  # missing here: installed
    _wheel(wheels, "pytest", "0.1")  # present here: left alone
    _wheel(wheels, "other_probe", tag="cp399-cp399-manylinux_2_28_x86_64")  # another Python's
    dry = install.install(REPO, tmp_path / "dry", sys.executable, wheels, dry_run=True)
    assert "pytest" in dry.present and not dry.installed
    assert "cp399" in dry.unusable["other_probe-1.0-cp399-cp399-manylinux_2_28_x86_64.whl"]
    assert any("would install" in line and "gpucheck_probe" in line for line in dry.lines)
    rep = install.install(REPO, tmp_path / "work", sys.executable, wheels)
    assert rep.installed == ["gpucheck_probe-1.0-py3-none-any.whl"] and not rep.errors
    out = subprocess.run([sys.executable, "-c", "import gpucheck_probe; print(gpucheck_probe.VALUE)"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(rep.deps)})  # fmt: skip
    assert out.stdout.strip() == "42"


# ---------------------------------------------------------------------------------------------------- budget


def test_phase_deadlines_share_what_is_left():
    b = plan.Budget(start=1000.0, total_s=450.0)
    now = 1010.0
    left = 450 - 10 - plan.REPORT_RESERVE_S
    assert b.phase_deadline("correctness", plan.PHASES, now) == now + min(plan.CORRECTNESS_MAX_S,
                                                                          plan.CORRECTNESS_SHARE * left)  # fmt: skip
    assert b.phase_deadline(TIMING_PHASE, plan.PHASES, now) == now + left - plan.SCAN_S
    assert b.phase_deadline(TIMING_PHASE, (TIMING_PHASE,), now) == now + left  # no scan phase: nothing kept for it
    assert b.phase_deadline("scan", plan.PHASES, now) == b.end - plan.REPORT_RESERVE_S
    assert b.phase_deadline("scan", plan.PHASES, b.end) == b.end  # past the end: no time, never negative
    assert math.isinf(plan.Budget(0.0, math.inf).phase_deadline(TIMING_PHASE, plan.PHASES))
    with pytest.raises(ValueError, match="unknown phase"):
        b.phase_deadline("warmup", plan.PHASES)


# ---------------------------------------------------------------------------------------------------- correctness


@pytest.fixture(scope="module")
def native_cases():
    return corr.module_cases(("native",), width=1.0)


def test_units_cover_every_config_the_launchers_can_pick(native_cases):
    kinds = [c.kind for c in native_cases]
    assert kinds.count("gabor") == 1 and kinds.count("dilated") == 1 and kinds.count("attention") == 1
    assert [c.path for c in native_cases][:2] == ["branches.b10.stages.0", "branches.b10.stages.1"]  # one branch
    units = corr.make_units(native_cases)
    for case in native_cases:
        mine = [u for u in units if u.case == case and u.layout == "nchw"]
        if case.kind in corr.AUTOTUNERS:
            assert sorted(u.config for u in mine) == sorted(corr.pickable_configs(case))
        nhwc = [u.config for u in units if u.case == case and u.layout == "nhwc"]
        assert sorted(nhwc) == (sorted(corr.pickable_configs(case)) if case.kind == "conv" else [])
    first_nhwc = next(i for i, u in enumerate(units) if u.layout == "nhwc")
    assert all(u.layout == "nhwc" for u in units[first_nhwc:])  # after every default-layout unit
    gabor = next(c for c in native_cases if c.kind == "gabor")
    assert corr.pickable_configs(gabor) == ["P16-CO32-R16-w4-s3"]  # 3 -> 32 channels, 27 taps: one tile fits
    dilated = [u for u in units if u.case.kind == "dilated"]
    assert len({u.pick for u in dilated}) == len(dilated) == 2  # narrow tiles, and wide ones for a large batch
    assert max(u.batch for u in dilated) >= 1024


def test_forced_config_and_exclusions_restore_the_autotuners(monkeypatch):
    from fusionkern.kernels import conv_mixpool

    tuner = conv_mixpool._conv_mixpool_fwd
    before = list(tuner.configs)
    label = corr.config_label(corr.gpu_conv_configs()[2])
    with corr.forced_config("conv", label):
        assert [corr.config_label(c) for c in tuner.configs] == [label]
    assert tuner.configs == before
    monkeypatch.setattr(tuner, "configs", corr.gpu_conv_configs())
    lines = corr.apply_exclusions({"conv_mixpool._conv_mixpool_fwd": [label]})
    assert label not in [corr.config_label(c) for c in tuner.configs]
    assert len(tuner.configs) == len(corr.gpu_conv_configs()) - 1
    assert "excluded" in lines[0]


def _tiny_unit(kind: str, batch: int = 2) -> corr.Unit:
    case = next(c for c in corr.module_cases(("native",), width=0.125) if c.kind == kind)
    label = corr.pickable_configs(case)[0] if kind in corr.AUTOTUNERS else None
    return corr.Unit(f"tiny {kind}", case, batch, config=label, pick=None if label else "launcher")


@pytest.mark.parametrize("kind", ["gabor", "conv", "dilated", "attention", "conv-nhwc"])
def test_unit_matches_the_reference_on_the_interpreter(kind):
    kind, _, layout = kind.partition("-")
    unit = _tiny_unit(kind)
    unit = dataclasses.replace(unit, layout=layout) if layout else unit
    rows = corr.run_unit(unit, torch.device("cpu"))
    assert {(r["precision"], r["mode"]) for r in rows} == {
        (p, m) for p in ("fp32-ieee", "fp32-torch-defaults") for m in ("train", "eval")
    }  # bf16 is a GPU-only comparison (the interpreter's bf16 dot is wrong)
    assert all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"]
    train = next(r for r in rows if r["mode"] == "train" and r["precision"] == "fp32-ieee")
    assert train["grad_err"] is not None and train["out_err"] < 1e-5


def test_a_wrong_kernel_fails_and_its_config_is_excluded(monkeypatch):
    import fusionkern.models.fused as fused

    real = fused.stage_forward
    monkeypatch.setattr(fused, "stage_forward", lambda stage, x, **kw: real(stage, x, **kw) * 1.2)
    unit = _tiny_unit("conv")
    rows = corr.run_unit(unit, torch.device("cpu"))
    assert all(r["status"] == "fail" and "output" in r["failed"] for r in rows)
    assert all(r["seed"] == 1 for r in rows)  # failed on both seeds
    assert corr.exclusions_from(rows) == {"conv_mixpool._conv_mixpool_fwd": [unit.config],
                                          "conv_mixpool._conv_mixpool_bwd": [unit.config]}  # fmt: skip
    assert corr.summarise(rows)["unit_status"]["fail"] == 1


def test_zero_reference_gradient_is_compared_at_the_rounding_floor():
    big = torch.randn(100)
    zero = torch.zeros(10)
    assert corr.gradient_errors([big, zero + 1e-9], [big, zero])[1] < 1e-5  # a cancelled sum: rounding only
    assert corr.gradient_errors([big, zero + 1.0], [big, zero])[1] > 1.0  # a real error is still caught
    assert corr.scaled_max_error(torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf


def test_supervisor_runs_units_in_workers_and_reports_what_time_left_out(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), *sys.path])}
    units = [_tiny_unit("attention"), _tiny_unit("conv")]
    rows = corr.supervise(units, python=sys.executable, env=env, deadline=1e12, workers=1,
                          results=tmp_path / "rows.jsonl", log=tmp_path / "log", device="cpu")  # fmt: skip
    assert {r["unit"] for r in rows} == {u.id for u in units} and all(r["status"] == "pass" for r in rows)
    assert len(report.read_jsonl(tmp_path / "rows.jsonl")) == len(rows)
    late = corr.supervise(units, python=sys.executable, env=env, deadline=0.0, workers=1,
                          results=tmp_path / "late.jsonl", log=tmp_path / "log", device="cpu")  # fmt: skip
    assert [r["status"] for r in late] == ["not run", "not run"]


# ---------------------------------------------------------------------------------------------------- timings


def test_time_call_on_the_host_clock():
    calls = []
    got = timing_phase.time_call(lambda: calls.append(1), torch.device("cpu"), target_s=0.01, min_rounds=5)
    assert got["timer"] == "host" and got["stats"]["rounds"] >= 5 and got["stats"]["median"] >= 0
    assert len(calls) == got["stats"]["rounds"] + len(got["warmup_s"])


def test_catalogue_runs_the_goals_first():
    cuda = timing_phase.plan_for_check("cuda", False, 0.3, 1024)
    cases = timing_phase.catalogue(cuda)
    assert len({c.key for c in cases}) == len(cases)
    first_compile = next(i for i, c in enumerate(cases) if "compile" in c.key)
    goal_cases = [i for i, c in enumerate(cases) if c.family == "layers" and c.args["pass"] in ("fwd", "bwd")
                  and c.args["dtype"] == "fp32" and c.args["variant"] in ("eager", "triton")
                  and c.args["layer"] in timing_phase.LAYER_GOAL_STAGES]  # fmt: skip
    trains = [i for i, c in enumerate(cases) if c.family == "train" and c.args["variant"] != "compile"]
    assert max(goal_cases + trains) < first_compile
    assert {c.args["variant"] for c in timing_phase.catalogue(cuda, "scan")} == {"inference", "io", "end_to_end"}


def test_timing_phase_writes_results_and_the_report(tmp_path):
    quick = timing_phase.plan_for_check("cpu", True, 0.01, None)
    runner = timing_phase.Runner(quick, torch.device("cpu"), tmp_path, 0.01)
    cases = [
        timing_phase.Case("matmul", {"dtype": "fp32"}),
        timing_phase.Case("layers", {"layer": "conv_stage", "pass": "fwd", "dtype": "fp32", "preset": "native",
                                "variant": "eager"}),  # fmt: skip
        timing_phase.Case("layers", {"layer": "conv_stage", "pass": "fwd", "dtype": "fp32", "preset": "native",
                                "variant": "triton"}),  # fmt: skip
        timing_phase.Case("model", {"preset": "native", "batch": 2, "variant": "eager-fp32"}, needs_s=1e13),
        timing_phase.Case("nonsense", {}),
    ]
    results = tmp_path / "timings.jsonl"
    assert timing_phase.run_phase(cases, runner, results, deadline=1e12, notes=["a note"]) == 0
    res = timing_phase.read_results([results])
    assert [e["name"] for e in res["benchmarks"]] == [cases[0].key, cases[1].key]
    skipped = {s["test"]: s["reason"] for s in res["skipped"]}
    assert "CUDA GPU" in skipped[cases[2].key] and skipped[cases[3].key].startswith("time:")
    assert [f["test"] for f in res["failed"]] == [cases[4].key] and res["notes"] == ["a note"]
    entry = res["benchmarks"][1]
    assert entry["group"] == "layers/conv_stage/fwd/fp32/native" and entry["extra_info"]["timer"] == "host"

    dest = tmp_path / "out"
    (tmp_path / "phases.json").write_text(json.dumps([{"phase": TIMING_PHASE, "status": "ok", "seconds": 1.0}]))
    settings = {"device": "cpu", "quick": True, "target_s": 0.01}
    paths = report.write_bench(tmp_path, dest, settings)
    bench = json.loads(paths["json"].read_text())
    assert bench["gpu_check"]["phases"][0]["phase"] == TIMING_PHASE and len(bench["results"]) == 2
    md = report.write_markdown(tmp_path, dest, {"gpu": "test", "date": "today", "setup": ["linked"]}).read_text()
    assert "## Goals" in md and "not measured" in md and "Not run." in md and "nonsense" in md
    report.write_log(dest, [(TIMING_PHASE, tmp_path / "missing.log")])
    assert report.check_limits(dest) == [] and len(list(dest.iterdir())) <= report.MAX_FILES
