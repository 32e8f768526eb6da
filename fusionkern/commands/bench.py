"""``fusionkern bench``: the benchmark suite in ``benchmarks/``, run in-process, and its report."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = ("Benchmark layers, kernels, backends, the scan and the roofline on this machine; writes bench.json, "
        "bench.md and bench.png, each figure with its same-run baseline and the ratio.")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one call per case: checks that the suite runs (figures are not measurements)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run the cases (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--out", default="bench-out",
                   help="folder of bench.json, bench.md and bench.png (default bench-out)")
    p.add_argument("--suite", default=None,
                   help="the benchmark suite folder (default: benchmarks/ next to the installed package)")
    p.add_argument("-k", "--select", default=None, metavar="EXPR",
                   help="run only the cases matching this pytest -k expression, e.g. 'layers and fp32'")
    p.add_argument("--time", type=float, default=None, dest="target_s", metavar="SECONDS",
                   help="seconds spent timing each case after its warm-up (default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch and onnxruntime (default: theirs; 1 gives steadier figures on a busy "
                        "machine)")
    p.add_argument("--width", type=float, default=None,
                   help="FusionNet width of the model, train and scan cases (default 1.0), e.g. the width of the "
                   "checkpoint a scan --plan should find a record for")  # fmt: skip
    p.add_argument("--scan-px", type=int, default=None, metavar="PX",
                   help="side of the scan cases' generated region (default: 256 on CPU, 2048 on CUDA)")
    p.add_argument("--note", action="append", default=[], help="a line quoted at the top of bench.md (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every case as it runs")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from fusionkern.bench.runner import run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.target_s is not None and args.target_s <= 0:
        from fusionkern.errors import ConfigError

        raise ConfigError(f"--time must be positive, got {args.target_s}")
    result = run_bench(
        device=device, out=args.out, quick=args.quick, suite=args.suite, select=args.select, target_s=args.target_s,
        threads=args.threads, notes=args.note, verbose=args.verbose,
        extra_pytest_args=[*(["--bench-width", str(args.width)] if args.width is not None else []),
                           *(["--bench-scan-px", str(args.scan_px)] if args.scan_px is not None else [])],
    )  # fmt: skip
    goals = result.report["goals"]
    met = sum(g["status"] == "met" for g in goals)
    not_met = sum(g["status"] == "not met" for g in goals)
    print(f"{len(result.report['results'])} figures, goals: {met} met, {not_met} not met, "
          f"{len(goals) - met - not_met} not measured; report in {result.paths['md']}")  # fmt: skip
    if result.failed:
        print(f"error: {len(result.failed)} benchmark case(s) failed (listed in {result.paths['md']})", file=sys.stderr)
        return 1
    if result.exit_code not in (0, 5):  # 5: nothing selected, already visible in the report
        print(f"error: pytest exited with code {result.exit_code}", file=sys.stderr)
        return result.exit_code
    return 0
