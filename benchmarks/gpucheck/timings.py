"""The timing phases: the suite's cases (:mod:`fusionkern.bench.cases`) timed with CUDA events, by priority.

:func:`catalogue` lists the cases in the order they run: what the speed goals compare first (the fused stages
against eager, the training step), then the model's batch sweep, the compiled variants, the remaining layers and
precisions, and ``torch.compile`` of the whole model and training step last (minutes of compilation each). Every
case states how much time it needs at least; a case that does not fit in what is left of the phase is skipped with
that reason, and later, cheaper cases still run.

A case is timed by :func:`time_call`: warm-up calls (compilation, autotuning, cuDNN's search), then rounds, each
one call between two CUDA events (host clock and a synchronisation for work that runs on the CPU: onnxruntime and
the scan); the figure is the median. Each result is appended to the phase's JSON-lines file the moment it exists,
in the shape of a pytest-benchmark entry, so :func:`fusionkern.bench.report.build_report` turns the lot into
``bench.json`` / ``bench.md`` with the same ratios and goals as ``fusionkern bench``.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gpucheck.correctness import _STICKY_CUDA

LAYER_GOAL_STAGES = ("gabor_stage", "conv_stage")
OTHER_LAYERS = ("dilated_block", "attention")
FAST_S, LAYER_S, MODEL_S, COMPILE_LAYER_S, COMPILE_MODEL_S, COMPILE_TRAIN_S = 8, 15, 20, 60, 150, 200


@dataclass(frozen=True)
class Case:
    """One timed case: its family (as in :data:`fusionkern.bench.cases.BASELINES`), arguments and least time."""

    family: str
    args: dict[str, Any] = field(default_factory=dict)
    needs_s: float = FAST_S

    @property
    def key(self) -> str:
        """pytest-style id (``layers[gabor_stage-fwd-fp32-paper-triton]``): the report's goal reasons match on it."""
        return f"{self.family}[{'-'.join(str(v) for v in self.args.values())}]"


def catalogue(plan, phase: str = "timings") -> list[Case]:
    """The cases of ``phase`` (``timings`` or ``scan``) for ``plan`` (:func:`fusionkern.bench.cases.make_plan`),
    in the order they run."""
    if phase == "scan":
        out = []
        for preset in plan.scan_presets:
            for backend in ("torch", "triton"):
                for variant in ("inference", "io", "end_to_end"):
                    out.append(Case("scan", {"preset": preset, "backend": backend, "variant": variant}, 15))
        return out
    presets = [p for p in ("paper", "native") if p in plan.layer_presets]
    batches = [(p, b) for p in ("paper", "native") for b in plan.model_batches.get(p, ())]

    def layers(names, passes, dtypes, variants, needs):
        return [Case("layers", {"layer": layer, "pass": pass_, "dtype": dtype, "preset": preset, "variant": v},
                     needs)
                for pass_ in passes for dtype in dtypes for layer in names for preset in presets
                for v in variants]  # fmt: skip

    def models(variants, needs, only=None):
        return [Case("model", {"preset": p, "batch": b, "variant": v}, needs)
                for v in variants for p, b in batches if only is None or (p, b) in only]  # fmt: skip

    out = [Case("matmul", {"dtype": d}) for d in ("fp32", "bf16")] + [Case("copy", {"variant": "copy"})]
    out += layers(LAYER_GOAL_STAGES, ("fwd",), ("fp32",), ("eager", "triton"), LAYER_S)
    out += layers(LAYER_GOAL_STAGES, ("bwd",), ("fp32",), ("eager", "triton"), LAYER_S)
    out += [Case("train", {"preset": p, "variant": v}, 2 * MODEL_S) for p in plan.train_batch
            for v in ("eager", "triton")]  # fmt: skip
    out += models(("eager-fp32", "triton-fp32"), MODEL_S)
    out += layers(LAYER_GOAL_STAGES, ("fwd", "bwd"), ("fp32",), ("compile",), COMPILE_LAYER_S)
    out += models(("eager-bf16", "triton-bf16", "triton-bf16-nhwc"), MODEL_S)
    smallest = {p: min(plan.model_batches[p]) for p in plan.model_batches}
    out += models(("onnxruntime-fp32",), 60, only={(p, b) for p, b in smallest.items()})
    out += [Case("costs", {"preset": p}, 30) for p in plan.cost_presets]
    out += [Case("gabor_bank", {"pass": p, "variant": v}) for p in ("fwd", "full") for v in ("loop", "vectorised")]
    out += layers(LAYER_GOAL_STAGES, ("fwd", "bwd"), ("bf16",), ("eager", "triton"), LAYER_S)
    out += layers(OTHER_LAYERS, ("fwd", "bwd"), ("fp32", "bf16"), ("eager", "triton"), LAYER_S)
    out += layers(LAYER_GOAL_STAGES + OTHER_LAYERS, ("full",), ("fp32",), ("eager", "triton"), LAYER_S)
    largest = {p: max(plan.model_batches[p]) for p in plan.model_batches}
    out += models(("compile-fp32", "compile-bf16"), COMPILE_MODEL_S, only={(p, b) for p, b in largest.items()})
    out += [Case("train", {"preset": p, "variant": "compile"}, COMPILE_TRAIN_S) for p in plan.train_batch]
    out += layers(LAYER_GOAL_STAGES, ("fwd", "bwd"), ("bf16",), ("compile",), COMPILE_LAYER_S)
    out += layers(OTHER_LAYERS, ("fwd", "bwd"), ("fp32",), ("compile",), COMPILE_LAYER_S)
    return out


# --------------------------------------------------------------------------------------------------------------
# Timing one call
# --------------------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[..., Any], device, *, setup: Callable[[], tuple] | None = None, host_timer: bool = False,
    target_s: float = 0.5, warmup: int = 3, min_rounds: int = 5, max_rounds: int = 200,
) -> dict[str, Any]:  # fmt: skip
    """Warm up, then time rounds of one call each; returns pytest-benchmark-like ``stats`` plus ``timer`` and the
    warm-up times. On CUDA (unless ``host_timer``) each round is measured between two CUDA events."""
    import torch

    def args() -> tuple:
        a = setup() if setup is not None else ()
        _sync(device)
        return a

    warm = []
    for i in range(max(2, warmup)):
        a = args()
        start = time.perf_counter()
        fn(*a)
        _sync(device)
        warm.append(time.perf_counter() - start)
        if i >= 1 and warm[-1] > target_s:
            break
    est = max(min(warm[1:]), 1e-7)
    rounds = 3 if est > target_s else max(min_rounds, min(max_rounds, int(target_s / est)))
    times: list[float] = []
    events = device.type == "cuda" and not host_timer
    if events and setup is None:  # back to back: one synchronisation at the end
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for begin, end in pairs:
            begin.record()
            fn()
            end.record()
        _sync(device)
        times = [b.elapsed_time(e) / 1e3 for b, e in pairs]
    else:
        for _ in range(rounds):
            a = args()
            if events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(*a)
                end.record()
                _sync(device)
                times.append(begin.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn(*a)
                _sync(device)
                times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "stats": {
            "median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times),
            "max": max(times), "stddev": statistics.stdev(times) if len(times) > 1 else 0.0, "iqr": q[2] - q[0],
            "rounds": len(times),
        },
        "timer": "cuda-event" if events else "host",
        "warmup_s": [round(t, 6) for t in warm],
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Running the cases
# --------------------------------------------------------------------------------------------------------------


class _Record:
    """Stands in for pytest-benchmark's fixture in :func:`fusionkern.bench.cases.record`."""

    def __init__(self) -> None:
        self.group = ""
        self.extra_info: dict[str, Any] = {}


class Runner:
    """Builds and times the cases of one phase; keeps what cases share (ONNX files, the scan region, predictors)."""

    def __init__(self, plan, device, work: Path, target_s: float):
        from fusionkern.bench.cases import Artefacts

        self.plan, self.device, self.work, self.target_s = plan, device, work, target_s
        self.artefacts = Artefacts(work / "artefacts")
        self._region: Path | None = None
        self._predictors: dict[tuple, Any] = {}

    def unavailable(self, case: Case) -> str | None:
        """Why ``case`` cannot run here, or None."""
        from fusionkern.bench.cases import scan_unavailable, variant_unavailable

        variant = case.args.get("variant", "")
        if case.family == "model" and variant.startswith("onnxruntime"):
            return variant_unavailable(variant, "cpu", self.plan)  # the CPU provider, as a same-run reference
        if case.family in ("layers", "model", "train"):
            return variant_unavailable(variant, self.device.type, self.plan)
        if case.family == "scan":
            backend = {"torch": "eager-fp32", "triton": "triton-fp32"}[case.args["backend"]]
            return scan_unavailable() or variant_unavailable(backend, self.device.type, self.plan)
        return None

    def entry(self, case: Case) -> dict[str, Any]:
        """Build, check and time ``case``; returns its pytest-benchmark-like entry."""
        from fusionkern.bench import cases as C
        from fusionkern.bench.roofline import copy_call, matmul_call, site_costs
        from fusionkern.bench.timing import peak_memory

        a, plan, device, rec = case.args, self.plan, self.device, _Record()
        host, setup, extra, step = False, None, {}, None
        if case.family == "layers":
            group = C.group_name("layers", a["layer"], a["pass"], a["dtype"], a["preset"])
            C.record(rec, "layers", group, a["variant"], layer=a["layer"], dtype=a["dtype"], preset=a["preset"],
                     device=plan.device, **{"pass": a["pass"]})  # fmt: skip
            call = C.layer_call(a["layer"], a["pass"], a["dtype"], a["preset"], a["variant"], plan, device)
            if a["variant"] == "compile":
                extra["compile_backend"] = plan.compile_backend
        elif case.family == "gabor_bank":
            C.record(rec, "gabor_bank", C.group_name("gabor_bank", a["pass"]), a["variant"], dtype="fp32",
                     device=plan.device, **{"pass": a["pass"]})  # fmt: skip
            call = C.gabor_bank_call(a["pass"], a["variant"], plan, device)
        elif case.family == "model":
            backend, _, precision = a["variant"].partition("-")
            C.record(rec, "model", C.group_name("model", a["preset"], f"b{a['batch']}"), a["variant"],
                     preset=a["preset"], batch=a["batch"], backend=backend, precision=precision, device=plan.device,
                     width=plan.model_width)  # fmt: skip
            call = C.model_call(a["preset"], a["batch"], a["variant"], plan, device, self.artefacts)
            extra["flops_per_item"] = C.model_flops(a["preset"], plan.model_width)
            host = backend == "onnxruntime"
        elif case.family == "train":
            C.record(rec, "train", C.group_name("train", a["preset"]), a["variant"], preset=a["preset"],
                     precision="fp32", device=plan.device, width=plan.model_width)  # fmt: skip
            call, step = C.train_call(a["preset"], a["variant"], plan, device)
            extra["flops_per_item"] = 3 * C.model_flops(a["preset"], plan.model_width)
        elif case.family in ("matmul", "copy"):
            group = "roofline/matmul" if case.family == "matmul" else "roofline/copy"
            variant = a.get("dtype", "copy")
            fields = {"dtype": variant} if "dtype" in a else {}
            C.record(rec, case.family, group, variant, device=plan.device, **fields)
            call = matmul_call(variant, plan, device) if case.family == "matmul" else copy_call(plan, device)
        elif case.family == "costs":
            C.record(rec, "costs", f"roofline/costs/{a['preset']}", "costs", preset=a["preset"], timed=False)
            start = time.perf_counter()
            rec.extra_info.update(site_costs(a["preset"], plan))
            elapsed = time.perf_counter() - start
            stats = {"median": elapsed, "mean": elapsed, "min": elapsed, "max": elapsed, "stddev": 0.0, "iqr": 0.0,
                     "rounds": 1}  # fmt: skip
            return {"group": rec.group, "name": case.key, "stats": stats, "extra_info": rec.extra_info}
        elif case.family == "scan":
            C.record(rec, "scan", C.group_name("scan", a["preset"], a["backend"]), a["variant"], preset=a["preset"],
                     backend=a["backend"], device=plan.device, width=plan.model_width)  # fmt: skip
            predictor = self.predictor(a["preset"], a["backend"])
            call = C.scan_call(a["variant"], self.region(), predictor, C.get_preset(a["preset"]).chip_px, plan)
            extra.update(self.parity(a["preset"], a["backend"], predictor))
            host = True
        else:
            raise ValueError(f"unknown case family {case.family!r}")
        setup = call.setup
        rec.extra_info.update(items=call.items, **call.info, **extra)
        timed = time_call(call.fn, device, setup=setup, host_timer=host, target_s=self.target_s)
        rec.extra_info.update(inner=1, rounds=timed["stats"]["rounds"], timer=timed["timer"],
                              warmup_s=timed["warmup_s"])  # fmt: skip
        if step is not None:
            rec.extra_info.update(peak_memory(device, step))
        elif case.family == "layers" and a["pass"] == "full":
            rec.extra_info.update(peak_memory(device, call.fn))
        return {"group": rec.group, "name": case.key, "stats": timed["stats"], "extra_info": rec.extra_info}

    def region(self) -> Path:
        if self._region is None:
            from fusionkern.scan.engine import make_benchmark_region

            size = self.plan.scan_size_px
            self._region = make_benchmark_region(self.work / "scan-region", size, block_px=min(512, size))
        return self._region

    def parity(self, preset: str, backend: str, predictor) -> dict[str, Any]:
        """The scan's scores on this device against the CPU reference, once per predictor (recorded, not gated)."""
        from fusionkern.bench.cases import get_preset, scan_feed_parity

        key = ("parity", preset, backend)
        if key not in self._predictors:
            try:
                self._predictors[key] = scan_feed_parity(predictor, get_preset(preset).chip_px, self.plan.scan_batch)
            except Exception as exc:  # recorded beside the timing; the timing itself still runs
                self._predictors[key] = {"feed_parity": f"failed: {type(exc).__name__}: {exc}"[:300]}
        return self._predictors[key]

    def predictor(self, preset: str, backend: str):
        from fusionkern.bench.cases import scan_predictor

        key = (preset, backend)
        if key not in self._predictors:
            self._predictors[key] = scan_predictor(backend, preset, self.plan, self.device, self.work / "scan-cache")
        return self._predictors[key]


def done_keys(results: Path) -> tuple[set[str], set[str]]:
    """Keys with a final record, and keys started but never finished (their process died), in ``results``."""
    final, started = set(), set()
    if results.is_file():
        for line in results.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("status") == "started":
                started.add(rec["key"])
            elif "key" in rec:
                final.add(rec["key"])
    return final, started - final


def run_phase(
    cases: Sequence[Case], runner: Runner, results: Path, deadline: float, notes: Sequence[str] = (),
) -> int:  # fmt: skip
    """Run ``cases`` in order until ``deadline``, appending one JSON line per event to ``results``.

    Returns 0, or 3 when the CUDA context broke (the caller may start a fresh process for the rest).
    """
    final, died = done_keys(results)

    def write(rec: dict) -> None:
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    for line in notes:
        write({"status": "note", "text": line})
    for key in died:
        write({"key": key, "status": "error", "error": "the process running this case died (see check.log)"})
        final.add(key)
    for case in cases:
        if case.key in final:
            continue
        left = deadline - time.time()
        if left < case.needs_s:
            reason = f"time: {max(0.0, left):.0f} s left in the phase, the case needs about {case.needs_s:.0f} s"
            write({"key": case.key, "status": "skipped", "reason": reason})
            continue
        reason = runner.unavailable(case)
        if reason:
            write({"key": case.key, "status": "skipped", "reason": reason})
            continue
        write({"key": case.key, "status": "started"})
        start = time.time()
        try:
            entry = runner.entry(case)
        except Exception as exc:  # one failing case is reported; the rest still run
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            print(f"case {case.key} raised:\n{traceback.format_exc()}", flush=True)
            write({"key": case.key, "status": "error", "error": text[-1500:], "seconds": time.time() - start})
            if runner.device.type == "cuda" and _STICKY_CUDA.search(text):
                return 3
            continue
        write({"key": case.key, "status": "ok", "entry": entry, "seconds": time.time() - start})
        print(f"{case.key}: {entry['stats']['median'] * 1e3:.3f} ms ({time.time() - start:.1f} s)", flush=True)
    return 0


def read_results(paths: Sequence[Path]) -> dict[str, Any]:
    """Entries, skips, failures and notes of the phases' JSON-lines files (the last record of a key wins)."""
    by_key: dict[str, dict] = {}
    notes: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("status") == "note":
                notes.append(rec["text"])
            elif rec.get("status") != "started":
                by_key[rec["key"]] = rec
    ok = [r["entry"] for r in by_key.values() if r["status"] == "ok"]
    skipped = [{"test": k, "reason": r["reason"]} for k, r in by_key.items() if r["status"] == "skipped"]
    failed = [{"test": k, "when": "call", "message": r["error"].splitlines()[-1][:300]}
              for k, r in by_key.items() if r["status"] == "error"]  # fmt: skip
    return {"benchmarks": ok, "skipped": skipped, "failed": failed, "notes": notes}


def plan_for_check(device: str, quick: bool, target_s: float | None, scan_px: int | None):
    """The suite's plan for ``device`` (or its quick plan), the scan region sized for the check unless quick."""
    import dataclasses

    from fusionkern.bench.cases import make_plan

    plan = make_plan(device, quick=quick, target_s=target_s)
    if scan_px and not quick:
        plan = dataclasses.replace(plan, scan_size_px=int(scan_px))
    return plan


def describe_cases(cases: Sequence[Case]) -> list[str]:
    """One line per family: how many cases and the least time they need together."""
    by: dict[str, list[Case]] = {}
    for case in cases:
        by.setdefault(case.family, []).append(case)
    return [f"  {fam:<11} {len(cs):3d} cases, at least {sum(c.needs_s for c in cs):5.0f} s together"
            for fam, cs in by.items()]  # fmt: skip

