"""``fusionkern demo``: the embedded default job, end to end on a CPU in a few minutes.

Generates a small synthetic, physically motivated dataset in the site layout (kiln heat in b10/b11 on all three
dates, dry altered soil raising b7/b6 around plants, seasonal landcover, confusers; 9 px of context around each
chip), then runs what a user of the scanner does, on synthetic regions that never share a seed:

1. trains a small native-preset FusionNet with the paper's protocol (round 0);
2. mines hard negatives and random background from a region with it (``fusionkern mine``) and trains again on the
   sites and the mined chips (round 1; ``--mine-rounds 2`` mines another region with that model and trains again):
   the held-out figures of the original sites are printed for every round;
3. with ``--register-works N``, trains a verifier: the same network on the bands in physical units (``fusionkern
   train --scaling physical``) on the sites, the mined chips and a register of known works (sites of known cement
   plants and of N works of other heavy industry: power, steel and lime works, whose heat and dust overlap
   cement's), so that it sees what the scan's min-max scaled chips hide, the kiln's heat in kelvin and the dust's
   reflectance; by default the split checkpoints verify;
4. calibrates the final checkpoint with the verifier on two other regions together (24 plants, about 7300 km²) at
   a budget of false detections per 1000 km² (``fusionkern calibrate``);
5. scans a last region with the calibrated thresholds and the verifier, and evaluates the detections against the
   planted plants (``fusionkern evaluate``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

NAME = "demo"
HELP = "Generate a synthetic dataset, train a small FusionNet on it (CPU, a few minutes) and report the metrics."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--cement", type=int, default=200, help="synthetic cement sites (default 200)")
    p.add_argument("--landcover", type=int, default=400, help="synthetic landcover sites (default 400)")
    p.add_argument("--context-px", type=int, default=9, help="context around each training chip (default 9)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per split (default 12)")
    p.add_argument("--splits", type=int, default=3,
                   help="stratified splits, whose checkpoints are also the verifier's ensemble (default 3; the paper "
                   "uses 5)")
    p.add_argument("--width", type=float, default=0.25, help="FusionNet width multiplier (default 0.25)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--region-px", type=int, default=2048, help="side of the evaluated synthetic region (default 2048)")
    p.add_argument("--plants", type=int, default=12, help="plants planted in the evaluated region (default 12)")
    p.add_argument("--mine-px", type=int, default=2048,
                   help="side of the region hard negatives are mined from, and of the calibration region (default 2048)")
    p.add_argument("--mine-top", type=int, default=300, help="hard negatives mined (default 300)")
    p.add_argument("--mine-lookalikes", type=int, default=96,
                   help="look-alike windows of the mining region (default 96; the other regions have 32)")
    p.add_argument("--mine-random", type=int, default=300,
                   help="random background chips mined in the first round (default 300)")
    p.add_argument("--mine-rounds", type=int, default=1,
                   help="mining rounds, each on its own region with the model of the round before (default 1)")
    p.add_argument("--verifier-model", choices=("physicsnet", "fusionnet"), default="physicsnet",
                   help="network of the physical-units verifier (default physicsnet: three conv layers and a global "
                   "maximum; fusionnet: the scan's network)")
    p.add_argument("--verifier-epochs", type=int, default=40, help="epochs of the verifier's training (default 40)")
    p.add_argument("--register-works", type=int, default=0,
                   help="train a verifier on the bands in physical units with a register of this many known works of "
                   "other heavy industry, and verify with it (default 0: verify with the split checkpoints, which "
                   "did as well on the regions measured)")
    p.add_argument("--register-plants", type=int, default=400,
                   help="known cement plants added to that verifier's training sites (default 400)")
    p.add_argument("--fp-budget", type=float, default=0.5,
                   help="false detections allowed per 1000 km² when calibrating (default 0.5)")
    p.add_argument("--calibration-regions", type=int, default=2,
                   help="regions calibrated together (seeds seed+202, seed+203, ...; default 2): one region's "
                   "budget allows one or two false sites, too few to set a threshold that carries")
    p.add_argument("--no-scan", dest="scan", action="store_false",
                   help="train only: skip mining, calibration and the region scan")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _train(args: argparse.Namespace, data: list[str], out: Path, label: str, **overrides: Any) -> dict:
    """One training run with the demo's settings; ``overrides`` replaces some (the verifier's model, width, epochs,
    splits, scaling, class_weights)."""
    from fusionkern.train import TrainConfig, run_training

    settings = dict(model="fusionnet", width=args.width, epochs=args.epochs, splits=args.splits, scaling="minmax")
    settings.update(overrides)
    cfg = TrainConfig(
        data=data, out=str(out), backbone="dgcnn", preset="native", batch_size=32, lr=args.lr, seed=args.seed,
        device=args.device, progress=args.progress, **settings,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = run_training(cfg, log=lambda line: None if not args.progress else print(line))
    s = (result.get("summary_by_data") or {}).get(data[0]) or result["summary"]
    name = "FusionNet" if cfg.model == "fusionnet" else "PhysicsNet"
    print(f"{label}: {name} (native preset, width {cfg.width}), {cfg.splits} split(s) x {cfg.epochs} epochs in "
          f"{time.perf_counter() - t0:.0f} s; held-out sites of {data[0]}:")  # fmt: skip
    for key, name in (("accuracy", "accuracy"), ("cement_recall", "cement recall"),
                      ("cement_precision", "cement precision"), ("f1", "F1")):  # fmt: skip
        print(f"  {name:17s} {100 * s[key]['mean']:5.1f} +- {100 * s[key]['std']:.1f} %")
    return result


def _best(result: dict) -> str:
    return max(result["splits"], key=lambda r: r["val"]["accuracy"])["checkpoint"]


def run(args: argparse.Namespace) -> int:
    from fusionkern.data.synthetic import make_synthetic_sites
    from fusionkern.errors import ConfigError

    if args.mine_rounds < 1:
        raise ConfigError(f"--mine-rounds must be at least 1, got {args.mine_rounds}")
    if args.register_works < 0 or (args.register_works > 0 and args.register_plants < 1):
        raise ConfigError(f"--register-works must be 0 or more and --register-plants at least 1, got "
                          f"{args.register_works} and {args.register_plants}")  # fmt: skip
    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    if data.exists():
        shutil.rmtree(data)
    sites = make_synthetic_sites(data, n_cement=args.cement, n_landcover=args.landcover, seed=args.seed,
                                 context_px=args.context_px)  # fmt: skip
    print(f"wrote {len(sites)} synthetic sites ({args.context_px} px of context) to {data} "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    if not args.scan:
        result = _train(args, [str(data)], out / "train", "training")
        print(f"report: {out / 'train' / 'report.md'}; checkpoints: {', '.join(r['checkpoint'] for r in result['splits'])}")
        print(f"done in {time.perf_counter() - t0:.0f} s")
        return 0
    folders = [str(data)]
    result = _train(args, folders, out / "train-r0", "round 0 (synthetic sites only)")
    for k in range(1, args.mine_rounds + 1):
        folders.append(str(_mine(args, out, _best(result), k)))
        last = k == args.mine_rounds
        result = _train(args, folders, out / ("train" if last else f"train-r{k}"),
                        f"round {k} (with {k} round(s) of mined chips)")  # fmt: skip
    checkpoint = _best(result)
    verify, verifier = "auto", "the split ensemble"
    if args.register_works > 0:
        verify = str(_train_verifier(args, out, folders))
        verifier = f"the physical-units verifier ({verify})"
    _calibrate(args, out, checkpoint, verify)
    from fusionkern.scan_demo import run_scan_demo

    print(f"\nscanning the evaluation region (seed {args.seed}, never mined nor calibrated on) with {checkpoint}, "
          f"verified by {verifier}:")  # fmt: skip
    run_scan_demo(out / "scan-demo", checkpoint, size_px=args.region_px, n_plants=args.plants, seed=args.seed,
                  verify=verify, progress=args.progress)  # fmt: skip
    print(f"outputs: {out / 'scan-demo' / 'scan'} (scores.tif, detections.geojson, quicklook.png, scan.json), "
          f"{out / 'scan-demo' / 'evaluation'} (evaluation.json, pr_curve.png, missed.geojson)")  # fmt: skip
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def _region(args: argparse.Namespace, folder: Path, seed: int, lookalikes: int = 32, east_km: float = 0.0):
    from fusionkern.scan_demo import make_demo_region

    return make_demo_region(folder, args.mine_px, args.plants, n_confusers=lookalikes, seed=seed, east_km=east_km)


def _mine(args: argparse.Namespace, out: Path, checkpoint: str, round_: int) -> Path:
    """One mining round on a region of its own (seeds seed+101, seed+303, ...); background chips in round 1 only,
    later rounds keep the chips the improved model still gets wrong."""
    from fusionkern.scan.mine import MineOptions, mine
    from fusionkern.scan_demo import region_truth

    seed = args.seed + 101 + 202 * (round_ - 1)
    # mined where look-alikes are dense (as a country-wide mining pass meets them): more of them to learn from
    region = _region(args, out / "regions" / f"mine-r{round_}", seed, args.mine_lookalikes)
    target = out / f"mined-r{round_}"
    options = MineOptions(
        checkpoint=checkpoint, out=str(target), plants=region_truth(region), manifest=str(region.manifest),
        top=args.mine_top, random=args.mine_random if round_ == 1 else 0, round=round_, context_px=args.context_px,
        seed=args.seed, overwrite=True, progress=args.progress,
    )  # fmt: skip
    report = mine(options)
    print(f"\nmining round {round_}, region seed {seed}: " + report.lines()[0])
    return target


def _train_verifier(args: argparse.Namespace, out: Path, folders: list[str]) -> Path:
    """The register (known cement plants and works of other heavy industry, seed seed+404) and the verifier trained
    on it with the sites and mined chips, bands in physical units, one split; returns its checkpoint."""
    from fusionkern.data.synthetic import make_synthetic_sites

    register = out / "register"
    if register.exists():
        shutil.rmtree(register)
    t0 = time.perf_counter()
    make_synthetic_sites(register, n_cement=args.register_plants, n_landcover=args.register_works,
                         seed=args.seed + 404, context_px=args.context_px, landcover="industry")  # fmt: skip
    print(f"\nregister of known works: {args.register_plants} cement plants, {args.register_works} works of other "
          f"heavy industry written to {register} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    from fusionkern.data import load_many

    sites = load_many([*folders, str(register)])[0]
    n_cement = sum(1 for s in sites if s.label == 0)
    weights = [(len(sites) - n_cement) / n_cement, 1.0]  # the classes weigh the same in the loss
    model = args.verifier_model
    result = _train(args, [*folders, str(register)], out / "train-verifier",
                    "verifier (bands in physical units, with the register)", model=model, scaling="physical",
                    splits=1, epochs=args.verifier_epochs, class_weights=weights,
                    width=1.0 if model == "physicsnet" else args.width)  # fmt: skip
    return Path(_best(result))


def _calibrate(args: argparse.Namespace, out: Path, checkpoint: str, verify: str) -> None:
    from fusionkern.errors import ConfigError, InputError
    from fusionkern.scan.calibrate import CalibrateOptions, calibrate
    from fusionkern.scan_demo import region_truth

    if args.calibration_regions < 1:
        raise ConfigError(f"--calibration-regions must be at least 1, got {args.calibration_regions}")
    seeds = [args.seed + 202 + k for k in range(args.calibration_regions)]
    # side by side, 300 km apart, so that one list of plants serves them all
    regions = [_region(args, out / "regions" / f"calibrate-{seed}", seed, east_km=300.0 * k) for k, seed in
               enumerate(seeds)]  # fmt: skip
    options = CalibrateOptions(
        checkpoint=checkpoint, out=str(out / "calibration"), plants=[p for r in regions for p in region_truth(r)],
        budget=args.fp_budget, manifest=[str(r.manifest) for r in regions], verify=verify, overwrite=True,
        progress=args.progress,
    )  # fmt: skip
    which = f"calibration regions (seeds {', '.join(map(str, seeds))})"
    try:
        record = calibrate(options)
    except InputError as exc:  # a model too weak for the budget: say so, and scan with the default threshold
        print(f"{which}: not calibrated: {exc}")
        return
    parts = [f"{mode} threshold {record[mode]['threshold']:.3g} ({record[mode]['found']}/{record['region']['plants']} "
             f"plants, {record[mode]['false']} false)" for mode in ("plain", "verified") if record.get(mode)]  # fmt: skip
    print(f"{which}: prior {record['prior']:.2g}, budget {args.fp_budget:g} false per 1000 km² over "
          f"{record['region']['area_km2']:.0f} km²: " + "; ".join(parts))  # fmt: skip
