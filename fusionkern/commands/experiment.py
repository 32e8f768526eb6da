"""``fusionkern experiment ablation|fusion|baselines``: the paper's tables and figures on a user's chips."""

from __future__ import annotations

import argparse
import math
import sys

NAME = "experiment"
HELP = ("Reproduce the paper's experiments on your chips: ablation (Table II), fusion (Table III), "
        "baselines and transfer learning (Figs. 7, 9).")  # fmt: skip

_DESCRIPTIONS = {
    "ablation": "Table II: CNN5, MPCNN5, GCNN5, DCNN5 and DGCNN on each of Band 11, 10, 7, 6 and 7:6.",
    "fusion": "Table III: FusionNet with CNN5 branches against DGCNN branches; per band (that band in all five "
              "branches, as the authors' code trained it) and fused (the five inputs of each site).",
    "baselines": "VGG13, ResNet18, ResNet50 and EfficientNet-B0 from scratch on each band and ImageNet-pretrained "
                 "with the paper's frozen-backbone protocol on Band 10 (needs torchvision: the 'baselines' extra).",
}  # fmt: skip


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--data", required=True, help="dataset folder: the site layout or the authors' per-band folders")
    p.add_argument("--out", default=None, help=f"output folder (default runs/{name})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: native preset, width 0.25, 2 epochs, 2 splits, batch 32, lr 2e-3 "
                        "(flags given explicitly still win)")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out, skipping finished cells"
    )
    p.add_argument("--overwrite", action="store_true", help="delete the previous run's cells in --out and start over")
    p.add_argument("--preset", choices=("paper", "native"), help="paper (256 px input, default) or native (35 px)")
    p.add_argument("--width", type=float, help="channel width multiplier (default 1.0)")
    p.add_argument("--alphas", help="MixPool initial alphas: paper (default), authors, or comma-separated numbers")
    p.add_argument("--epochs", type=int, help="epochs per cell and split (default 150)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="batch size (default 100)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--splits", type=int, help="stratified splits (default 5, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, weights and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op CPU threads (default: torch's, or 1 with --quick, whose tiny models gain "
                        "nothing from more and lose much on a busy CPU)")  # fmt: skip
    p.add_argument("--no-augment", dest="augment", action="store_false", help="turn augmentation off")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    a = sub.add_parser("ablation", help=_DESCRIPTIONS["ablation"], description=_DESCRIPTIONS["ablation"])
    _common(a, "ablation")
    a.add_argument("--models", help="comma-separated rows (default cnn5,mpcnn5,gcnn5,dcnn5,dgcnn)")
    a.add_argument("--bands", help="comma-separated columns (default b11,b10,b7,b6,b76)")
    a.add_argument(
        "--explain",
        action="store_true",
        help="afterwards, CAMs and t-SNE of CNN5 against DGCNN (split 0, Band 7:6) in OUT/explain",
    )

    f = sub.add_parser("fusion", help=_DESCRIPTIONS["fusion"], description=_DESCRIPTIONS["fusion"])
    _common(f, "fusion")
    f.add_argument("--backbones", help="comma-separated rows (default cnn5,dgcnn)")
    f.add_argument("--bands", help="per-band columns (default b11,b10,b7,b6,b76)")
    f.add_argument("--inputs", choices=("fused", "per-band", "both"),
                   help="per-band columns, the fused column, or both (default both; fused with --quick)")  # fmt: skip

    b = sub.add_parser("baselines", help=_DESCRIPTIONS["baselines"], description=_DESCRIPTIONS["baselines"])
    _common(b, "baselines")
    b.add_argument("--models", help="comma-separated (default vgg13,resnet18,resnet50,efficientnet_b0)")
    b.add_argument("--bands", help="bands of the from-scratch rows (default b11,b10,b7,b6,b76; b10 with --quick)")
    b.add_argument("--tl-bands", dest="tl_bands", help="bands of the ImageNet-pretrained rows (default b10)")
    b.add_argument("--init", help="scratch, imagenet or both comma-separated (default scratch,imagenet)")
    b.add_argument(
        "--tl-finetune",
        dest="tl_finetune",
        choices=("head", "all"),
        default="head",
        help="head: frozen feature extractor, classifier trained (the paper, default); all: every layer",
    )
    b.add_argument("--input-size", dest="input_size", type=int,
                   help="side the chips are resized to (default the preset's: 256 paper, 35 native)")  # fmt: skip
    b.add_argument("--weights-dir", dest="weights_dir",
                   help="folder with torchvision's ImageNet weights files (e.g. resnet18-f37072fd.pth); "
                        "default: torchvision's cache, downloaded into on first use")  # fmt: skip
    b.add_argument("--no-download", dest="download", action="store_false",
                   help="never download ImageNet weights: use --weights-dir or torchvision's cache only")  # fmt: skip
    b.add_argument("--save-checkpoints", dest="save_checkpoints", action="store_true",
                   help="also keep each cell's best weights (best.pt)")  # fmt: skip


def _settings(args: argparse.Namespace):
    from fusionkern.commands.train import parse_alphas
    from fusionkern.experiments import ExperimentSettings

    alphas = parse_alphas(args.alphas)
    return ExperimentSettings(
        data=args.data, out=args.out or f"runs/{args.experiment}", preset=args.preset, width=args.width,
        alphas=alphas if alphas is not None else "paper", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        splits=args.splits, seed=args.seed, device=args.device, workers=args.workers, augment=args.augment,
        progress=args.progress, quick=args.quick, resume=args.resume, overwrite=args.overwrite,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from fusionkern.experiments.core import parse_bands, parse_list

    settings = _settings(args)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        import torch

        from fusionkern.errors import ConfigError

        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if args.experiment == "ablation":
        from fusionkern.experiments.ablation import MODELS, run_ablation

        result = run_ablation(settings, parse_list(args.models, MODELS, "--models"), parse_bands(args.bands),
                              explain=args.explain)  # fmt: skip
    elif args.experiment == "fusion":
        from fusionkern.experiments.fusion import BACKBONES, run_fusion

        result = run_fusion(settings, parse_list(args.backbones, BACKBONES, "--backbones"), parse_bands(args.bands),
                            args.inputs)  # fmt: skip
    else:
        from fusionkern.errors import MissingDependencyError
        from fusionkern.experiments.baselines import ARCH_ALIASES, ARCHS, INITS, run_baselines, torchvision_status

        archs = parse_list(args.models, tuple(ARCHS), "--models", ARCH_ALIASES)
        inits = parse_list(args.init, INITS, "--init", {"tl": "imagenet", "pretrained": "imagenet"})
        bands, tl_bands = parse_bands(args.bands), parse_bands(args.tl_bands, "--tl-bands")
        reason = torchvision_status()
        if reason is not None:
            print(f"baselines skipped: {reason}", file=sys.stderr)
            return 0
        try:
            result = run_baselines(settings, archs, bands, tl_bands, inits, input_size=args.input_size,
                                   tl_finetune=args.tl_finetune, weights_dir=args.weights_dir, download=args.download,
                                   save_checkpoints=args.save_checkpoints)  # fmt: skip
        except MissingDependencyError as exc:
            print(f"baselines skipped: {exc}", file=sys.stderr)
            return 0
    _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    cells = {(c["row"], c["column"]): c for c in result["cells"]}
    cols = result["columns"]
    width = max(len(r["label"]) for r in result["rows"]) + 2
    col_w = [max(16, len(c["label"]) + 2) for c in cols]
    print()
    print(f"{result['title']}: test accuracy (%), mean +- std over splits")
    print(" " * width + "".join(f"{c['label']:>{w}}" for c, w in zip(cols, col_w)))
    for r in result["rows"]:
        line = f"{r['label']:<{width}}"
        for c, w in zip(cols, col_w):
            cell = cells.get((r["key"], c["key"]))
            if cell is None:
                line += f"{'-':>{w}}"
            else:
                m = cell["summary"]["metrics"]["accuracy"]
                line += f"{_pm(m['mean'], m['std']):>{w}}"
        print(line)
    print()
    for name, path in result.get("files", {}).items():
        print(f"{name + ':':<22}{path}")


def _pm(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} +- {100 * std:.1f}"
