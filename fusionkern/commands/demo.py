"""``fusionkern demo``: the embedded default job, end to end on a CPU in a few minutes.

Generates a small synthetic, physically motivated dataset in the site layout (kiln heat in b10/b11 on all three
dates, dry altered soil raising b7/b6 around plants, seasonal landcover, confusers), trains a small native-preset
FusionNet with the paper's protocol, then scans a synthetic region (thousands of pixels a side, plants planted at
known places) with the best checkpoint and scores the detections against the planted truth.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

NAME = "demo"
HELP = "Generate a synthetic dataset, train a small FusionNet on it (CPU, a few minutes) and report the metrics."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--cement", type=int, default=120, help="synthetic cement sites (default 120)")
    p.add_argument("--landcover", type=int, default=240, help="synthetic landcover sites (default 240)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per split (default 12)")
    p.add_argument("--splits", type=int, default=2, help="stratified splits (default 2; the paper uses 5)")
    p.add_argument("--width", type=float, default=0.25, help="FusionNet width multiplier (default 0.25)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--region-px", type=int, default=2048, help="side of the scanned synthetic region (default 2048)")
    p.add_argument("--plants", type=int, default=12, help="plants planted in the region (default 12)")
    p.add_argument("--no-scan", dest="scan", action="store_false", help="train only, skip the region scan")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from fusionkern.data.synthetic import make_synthetic_sites
    from fusionkern.train import TrainConfig, run_training

    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    if data.exists():
        shutil.rmtree(data)
    sites = make_synthetic_sites(data, n_cement=args.cement, n_landcover=args.landcover, seed=args.seed)
    print(f"wrote {len(sites)} synthetic sites to {data} ({time.perf_counter() - t0:.1f} s)")
    cfg = TrainConfig(
        data=str(data), out=str(out / "train"), model="fusionnet", backbone="dgcnn", preset="native",
        width=args.width, epochs=args.epochs, batch_size=32, lr=args.lr, splits=args.splits, seed=args.seed,
        device=args.device, progress=args.progress,
    )  # fmt: skip
    result = run_training(cfg)
    s = result["summary"]
    print()
    print(f"FusionNet (native preset, width {args.width}) on {len(sites)} synthetic sites, "
          f"{args.splits} split(s), {args.epochs} epochs, {time.perf_counter() - t0:.0f} s in all:")  # fmt: skip
    for key, label in (("accuracy", "accuracy"), ("cement_recall", "cement recall"),
                       ("cement_precision", "cement precision"), ("f1", "F1")):  # fmt: skip
        print(f"  {label:17s} {100 * s[key]['mean']:5.1f} +- {100 * s[key]['std']:.1f} %")
    print(f"report:      {out / 'train' / 'report.md'}")
    print(f"metrics:     {out / 'train' / 'metrics.json'}")
    print(f"checkpoints: {', '.join(r['checkpoint'] for r in result['splits'])}")
    if args.scan:
        from fusionkern.scan_demo import run_scan_demo

        best = max(result["splits"], key=lambda r: r["val"]["accuracy"])
        print(f"\nscanning a synthetic region with {best['checkpoint']} (best validation accuracy):")
        run_scan_demo(out / "scan-demo", best["checkpoint"], size_px=args.region_px, n_plants=args.plants,
                      seed=args.seed, progress=args.progress)  # fmt: skip
        print(f"scan outputs: {out / 'scan-demo' / 'scan'} (scores.tif, detections.geojson, quicklook.png, scan.json)")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
