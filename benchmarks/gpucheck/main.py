"""Command line of the GPU check: the orchestrator (``run``) and the commands it starts in subprocesses.

``run`` itself uses the standard library only: it lays out the checkout (:mod:`.install`), then starts every
phase as ``python -m gpucheck phase <name>`` with a deadline (:mod:`.plan`), kills a phase that overstays, and
rewrites ``report.md`` after each one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gpucheck import install as installer
from gpucheck.plan import DEFAULT_BUDGET_S, GRACE_S, PHASES, Budget, describe_budget

REPO = Path(__file__).resolve().parents[2]


def _say(msg: str) -> None:
    print(f"gpu_check: {msg}", flush=True)


def _phases(text: str) -> tuple[str, ...]:
    names = tuple(p for p in (s.strip() for s in text.split(",")) if p)
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return tuple(p for p in PHASES if p in names)


def _default_workers() -> int:
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.sh", description="Every GPU figure of fusionkern in one call.")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="the check (default)")
    run.add_argument("--dry-run", action="store_true",
                     help="setup, imports, the phase plan and the budget; stop before the first CUDA call")  # fmt: skip
    run.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                     help=f"seconds for the whole check from the start (default {DEFAULT_BUDGET_S:.0f})")  # fmt: skip
    run.add_argument("--full", action="store_true", help="no budget: every case of every phase")
    run.add_argument("--phases", type=_phases, default=PHASES, help="comma-separated subset of " + ",".join(PHASES))
    run.add_argument("--out", type=Path, help="the report folder (default RESULTS/<date>-<gpu>)")
    run.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results",
                     help="parent of the report folder (default benchmarks/results)")  # fmt: skip
    run.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheel folder (default .whl/)")
    run.add_argument("--work", type=Path, default=REPO / ".gpu-check", help="work folder (default .gpu-check/)")
    run.add_argument("--workers", type=int, default=_default_workers(),
                     help="correctness worker processes (default: CPU cores - 2, at most 12)")  # fmt: skip
    run.add_argument("--time", type=float, default=0.3, help="seconds of timed rounds per case (default 0.3)")
    run.add_argument("--scan-px", type=int, default=1024, help="side of the generated scan region (default 1024)")
    run.add_argument("--batch", type=int, default=16, help="batch of the correctness units (default 16)")
    run.add_argument("--autotune-rep-ms", type=float, default=20.0,
                     help="ms of Triton autotune benchmarking per config (default 20; 0: Triton's 100)")  # fmt: skip
    run.add_argument("--quick", action="store_true", help="tiny shapes and widths: checks that the check runs")
    run.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: exercise the phases in tests
    run.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    run.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)

    phase = sub.add_parser("phase", help=argparse.SUPPRESS)
    phase.add_argument("name", choices=PHASES)
    phase.add_argument("--settings", type=Path, required=True)
    phase.add_argument("--deadline", type=float, required=True)

    worker = sub.add_parser("correctness-worker", help=argparse.SUPPRESS)
    worker.add_argument("--device", default="cuda")

    plan = sub.add_parser("plan", help=argparse.SUPPRESS)
    plan.add_argument("--settings", type=Path, required=True)

    for name in ("bench-report", "versions"):
        cmd = sub.add_parser(name, help=argparse.SUPPRESS)
        cmd.add_argument("--settings", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "correctness-worker":
        from gpucheck.correctness import worker_main

        return worker_main(args.device)
    settings = json.loads(args.settings.read_text(encoding="utf-8"))
    if args.command == "phase":
        return run_phase(args.name, settings, args.deadline)
    if args.command == "plan":
        return show_plan(settings)
    if args.command == "bench-report":
        from gpucheck.report import write_bench

        write_bench(Path(settings["work"]), Path(settings["dest"]), bench_settings(settings))
        return 0
    return versions(settings)


# --------------------------------------------------------------------------------------------------------------
# Commands run in subprocesses (the checkout importable)
# --------------------------------------------------------------------------------------------------------------


def bench_settings(s: dict) -> dict:
    return {"device": s["device"], "quick": s["quick"], "select": None, "target_s": s["time"], "threads": None,
            "tf32": False, "suite": "benchmarks/gpucheck", "timer": "CUDA events (host clock for CPU-side cases)",
            "autotune_rep_ms": s["autotune_rep_ms"] or 100}  # fmt: skip


def _cases(s: dict):
    from gpucheck.correctness import make_units, module_cases

    presets = ("native",) if s["quick"] else ("paper", "native")
    width = 0.125 if s["quick"] else 1.0
    return make_units(module_cases(presets, width), batch=2 if s["quick"] else s["batch"])


def show_plan(s: dict) -> int:
    """The dry run's second half: import everything the phases import, then list their work."""
    import importlib

    import torch
    import triton

    import fusionkern
    from fusionkern.bench.cases import scan_unavailable, variant_unavailable
    from gpucheck.timings import catalogue, describe_cases, plan_for_check

    loaded = Path(importlib.import_module("fusionkern.kernels").__file__)
    where = loaded.resolve()
    site = Path(s["work"]) / "site"
    if site not in loaded.parents or Path(s["repo"]).resolve() not in where.parents:
        print(f"fusionkern.kernels imports from {loaded}, not through {site} from the checkout {s['repo']}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"imports: torch {torch.__version__}, triton {triton.__version__}, fusionkern {fusionkern.__version__} "
          f"(kernels from {where.parent})")  # fmt: skip
    for what, reason in (("onnxruntime reference", variant_unavailable("onnxruntime-fp32", "cpu")),
                         ("scan phase", scan_unavailable())):  # fmt: skip
        print(f"  {what}: {'available' if reason is None else 'skipped: ' + reason}")
    units = _cases(s)
    kinds: dict[str, int] = {}
    for u in units:
        kinds[u.case.kind] = kinds.get(u.case.kind, 0) + 1
    print(f"correctness: {len(units)} units ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
          f"each fp32 and bf16, train and eval, on {s['workers']} workers")  # fmt: skip
    plan = plan_for_check(s["device"], s["quick"], s["time"], s["scan_px"])
    for phase in ("timings", "scan"):
        cases = catalogue(plan, phase)
        print(f"{phase}: {len(cases)} cases in priority order")
        print("\n".join(describe_cases(cases)))
    return 0


def versions(s: dict) -> int:
    """Machine, GPU, versions and installed packages, as JSON on stdout (``env.txt``)."""
    from fusionkern.bench.machine import describe_machine

    machine = describe_machine(s["device"])
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    import torch

    machine["cuda_available"] = torch.cuda.is_available()
    machine["tf32_defaults"] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                                "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip
    print(json.dumps({"machine": machine, "pip_freeze": freeze.splitlines()}, indent=2, default=str))
    return 0


def run_phase(name: str, s: dict, deadline: float) -> int:
    """One phase in this process (started by :func:`run` with the checkout importable)."""
    import torch

    work, dest = Path(s["work"]), Path(s["dest"])
    device = torch.device(s["device"])
    if name == "correctness":
        from gpucheck.correctness import summarise, supervise

        units = _cases(s)
        print(f"{len(units)} units on {s['workers']} workers", flush=True)
        rows = supervise(units, python=sys.executable, env=dict(os.environ), deadline=deadline,
                         workers=s["workers"], results=work / "correctness.jsonl", log=work / "correctness.log",
                         device=s["device"])  # fmt: skip
        summary = summarise(rows)
        (work / "correctness-summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        return 0
    from fusionkern.bench.cases import use_torch_fp32_defaults
    from gpucheck.correctness import apply_exclusions
    from gpucheck.report import write_bench
    from gpucheck.timings import Runner, catalogue, plan_for_check
    from gpucheck.timings import run_phase as run_cases

    notes = []
    summary_path = work / "correctness-summary.json"
    if summary_path.is_file():
        notes += apply_exclusions(json.loads(summary_path.read_text())["exclusions"])
    if s["autotune_rep_ms"]:
        notes.append(f"Triton autotuning benchmarks each config for {s['autotune_rep_ms']:g} ms")
        set_autotune_bench(s["autotune_rep_ms"])
    if device.type == "cuda":
        use_torch_fp32_defaults()  # the precision users get: TF32 convolutions, as in fusionkern bench
    plan = plan_for_check(s["device"], s["quick"], s["time"], s["scan_px"])
    runner = Runner(plan, device, work, s["time"])
    code = run_cases(catalogue(plan, name), runner, work / f"{name}.jsonl", deadline, notes)
    write_bench(work, dest, bench_settings(s))
    return code


def set_autotune_bench(rep_ms: float) -> None:
    """Shorter Triton autotuning benchmarks for the conv kernels (a fifth of Triton's default by default)."""
    from triton.testing import do_bench

    from gpucheck.correctness import AUTOTUNERS, _autotuner

    def bench(fn, quantiles):
        return do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=quantiles)

    for kind in AUTOTUNERS:
        for which in (0, 1):
            _autotuner(kind, which)._do_bench = bench


# --------------------------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------------------------


class Check:
    """State of one run: settings, environment of the phases, phase records, the report header."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.budget = Budget(args.start or time.time(), math.inf if args.full else args.budget_s)
        self.work: Path = args.work.resolve()
        self.phases: list[dict] = []
        self.header: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "setup": []}
        self.dest: Path | None = None
        self.env = dict(os.environ)

    def settings(self) -> Path:
        a = self.args
        data = {"repo": str(REPO), "work": str(self.work), "dest": str(self.dest or self.work / "report"),
                "device": a.device, "quick": a.quick, "time": a.time, "scan_px": a.scan_px, "batch": a.batch,
                "workers": a.workers, "autotune_rep_ms": a.autotune_rep_ms}  # fmt: skip
        path = self.work / "settings.json"
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        return path

    def command(self, *words: str) -> list[str]:
        return [self.args.python, "-m", "gpucheck", *words, "--settings", str(self.settings())]

    def start(self, cmd: list[str], **kwargs):
        """A subprocess of the check. It runs in the work folder: with the checkout as the current folder, ``import
        fusionkern`` would find its top-level folder, which lacks ``kernels`` and ``export``, before the link folder."""
        return subprocess.Popen(cmd, env=self.env, cwd=self.work, **kwargs)

    def run_phase(self, name: str) -> dict:
        """Start phase ``name`` with its deadline; kill it (and its children) once it overstays."""
        start = time.time()
        deadline = self.budget.phase_deadline(name, self.args.phases, start)
        record = {"phase": name, "status": "ok", "seconds": 0.0, "note": "",
                  "allowed_s": None if math.isinf(deadline) else deadline - start}  # fmt: skip
        if deadline - start < 5:
            record.update(status="skipped", note="no time left in the budget")
            return record
        log = self.work / f"{name}.log"
        attempts = 0
        while True:
            attempts += 1
            cmd = self.command("phase", name, "--deadline", str(deadline))
            with log.open("a", encoding="utf-8") as out:
                proc = self.start(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                timeout = None if math.isinf(deadline) else max(1.0, deadline + GRACE_S - time.time())
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    record.update(status="cut", note="still running past its deadline: stopped, results so far kept")
                    break
            # Workers or compile helpers it left behind must not hold the GPU for the next phase.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            if code == 3 and attempts < 3 and deadline - time.time() > 20:
                record["note"] = "the CUDA context broke: restarted for the remaining cases"
                continue
            if code != 0:
                record.update(status="failed", note=f"exit code {code} (see check.log)")
            break
        record["seconds"] = time.time() - start
        return record

    def save(self) -> None:
        from gpucheck.report import write_markdown

        (self.work / "phases.json").write_text(json.dumps(self.phases, indent=2), encoding="utf-8")
        if self.dest is not None:
            self.header["elapsed"] = f"{self.budget.elapsed():.0f} s of a {self.args.budget_s:.0f} s budget" if not \
                self.args.full else f"{self.budget.elapsed():.0f} s (no budget)"
            write_markdown(self.work, self.dest, self.header)


def _gpu_ready(say) -> str | None:
    """Why this machine cannot run the check (no driver, no GPU), or None."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found: this machine has no NVIDIA driver"
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"nvidia-smi sees no GPU: {(proc.stderr or proc.stdout).strip()[:200]}"
    say(proc.stdout.strip().splitlines()[0])
    return None


def run(args: argparse.Namespace) -> int:
    check = Check(args)
    work = check.work
    if work.exists():
        for stale in work.iterdir():  # results of an earlier run; caches and artefacts start afresh too
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    work.mkdir(parents=True, exist_ok=True)
    _say(f"{'dry run, ' if args.dry_run else ''}python {args.python}, work folder {work}")

    # Setup: the checkout importable, the wheels this Python lacks.
    inst = installer.install(REPO, work, args.python, args.wheels, dry_run=args.dry_run)
    for line in inst.lines + inst.errors:
        _say(line)
    check.header["setup"] = inst.lines + [f"error: {e}" for e in inst.errors]
    pythonpath = inst.pythonpath() + [str(REPO / "benchmarks")]
    if check.env.get("PYTHONPATH"):
        pythonpath.append(check.env["PYTHONPATH"])
    check.env.update({
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "TRITON_CACHE_DIR": str(work / "triton-cache"),
        "TRITON_CACHE_AUTOTUNING": "1",  # autotune results are kept on disk: later phases reuse them
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    check.env.pop("TRITON_INTERPRET", None)  # the kernels run compiled on the GPU, never on the interpreter
    if args.device == "cpu":
        check.env["TRITON_INTERPRET"] = "1"

    if args.dry_run:
        code = check.start(check.command("plan")).wait()
        for line in describe_budget(check.budget, args.phases):
            _say(line)
        _say("dry run: stopping before the first CUDA call (nvidia-smi, torch.cuda)" if code == 0 else
             f"dry run FAILED: the phase plan could not be built (exit code {code})")  # fmt: skip
        return 0 if code == 0 else 2

    # Phase (a): the machine. Nothing of the GPU's settings is changed, only read.
    if args.device == "cuda":
        why = _gpu_ready(_say)
        if why:
            _say(why)
            return 2
    proc = check.start(check.command("versions"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    try:
        env_info = json.loads(stdout)
    except json.JSONDecodeError:
        _say(f"the checkout does not import with {args.python}:\n{stderr[-3000:]}")
        return 2
    machine = env_info["machine"]
    if args.device == "cuda" and not machine.get("cuda_available"):
        _say(f"torch {machine.get('torch_build')} in {args.python} sees no CUDA GPU (a CPU-only build?)")
        return 2
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    check.dest = (args.out or args.results_dir / f"{date}-{machine['name']}").resolve()
    check.dest.mkdir(parents=True, exist_ok=True)
    _say(f"report folder {check.dest}")
    gpu = machine.get("gpu") or {}
    versions_ = machine.get("versions", {})
    check.header.update({
        "gpu": gpu.get("name", machine["name"]), "commit": (machine.get("commit") or {}).get("id"),
        "python": machine.get("python"), "torch": versions_.get("torch"), "triton": versions_.get("triton"),
        "driver / CUDA": f"{gpu.get('driver')} / {gpu.get('cuda')}",
    })  # fmt: skip
    smi = []
    if shutil.which("nvidia-smi"):
        for flags in ([], ["-q"]):
            out = subprocess.run(["nvidia-smi", *flags], capture_output=True, text=True)
            smi.append(f"$ nvidia-smi {' '.join(flags)}\n{out.stdout}{out.stderr}")
    (check.dest / "env.txt").write_text("\n".join(smi) + "\n" + json.dumps(env_info, indent=2) + "\n", encoding="utf-8")
    check.phases.append({"phase": "setup", "status": "failed" if inst.errors else "ok", "allowed_s": None,
                         "seconds": check.budget.elapsed(), "note": "; ".join(inst.errors)})  # fmt: skip
    check.save()

    for name in args.phases:
        _say(f"phase {name}: {check.budget.left():.0f} s of the budget left")
        record = check.run_phase(name)
        check.phases.append(record)
        _say(f"phase {name}: {record['status']} after {record['seconds']:.0f} s {record['note']}".rstrip())
        check.save()

    # The bench files again when a timing phase was cut before writing them.
    bench = check.dest / "bench.json"
    newest = max((p.stat().st_mtime for p in (work / "timings.jsonl", work / "scan.jsonl") if p.is_file()), default=0)
    if newest and (not bench.is_file() or bench.stat().st_mtime < newest):
        with contextlib.suppress(subprocess.TimeoutExpired):
            check.start(check.command("bench-report")).wait(timeout=120)
    check.save()
    from gpucheck.report import check_limits, read_jsonl, write_log

    write_log(check.dest, [(p, work / f"{p}.log") for p in ("correctness", "timings", "scan")]
              + [("correctness workers", work / "correctness.log")])  # fmt: skip
    for problem in check_limits(check.dest):
        _say(f"report folder: {problem}")
    rows = read_jsonl(work / "correctness.jsonl")
    bad_rows = [r for r in rows if r["status"] in ("fail", "error")]
    timing_errors = [r for p in ("timings", "scan") for r in read_jsonl(work / f"{p}.jsonl")
                     if r.get("status") == "error"]  # fmt: skip
    bad_phases = [p for p in check.phases if p["status"] == "failed"]
    _say(f"correctness: {len(bad_rows)} failed comparisons; timing cases failed: {len(timing_errors)}; "
         f"{check.budget.elapsed():.0f} s in all")  # fmt: skip
    _say(f"report: {check.dest / 'report.md'}")
    return 1 if (bad_rows or timing_errors or bad_phases) else 0
