"""``fusionkern train``: the paper's training protocol on a user's chips."""

from __future__ import annotations

import argparse

from fusionkern import BRANCHES

NAME = "train"
HELP = "Train FusionNet or a single-input ablation model with the paper's protocol (splits, weighted CE, Adam)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None so that a YAML config's values are only overridden by flags actually given.
    p.add_argument("--config", help="YAML file with any of the options below (flags given override it)")
    p.add_argument("--data", nargs="+", metavar="DIR",
                   help="dataset folder(s): the site layout or the authors' per-band folders; several are merged, "
                   "e.g. a training set and the hard negatives of fusionkern mine")  # fmt: skip
    p.add_argument("--out", help="output folder (default runs/train)")
    p.add_argument("--model", help="fusionnet (default), physicsnet (a verifier, with --scaling physical), cnn5, "
                   "mpcnn5, gcnn5, dcnn5 or dgcnn")
    p.add_argument("--backbone", choices=("dgcnn", "cnn5"), help="FusionNet branch network (default dgcnn)")
    p.add_argument("--preset", choices=("paper", "native"),
                   help="native (default): 35 px chips as the scanner cuts them; paper: 256 px input, as published")
    p.add_argument("--width", type=float, help="channel width multiplier (default 1.0)")
    p.add_argument("--branch", choices=BRANCHES, help="input of a single-input model (default b76)")
    p.add_argument("--alphas", help="MixPool initial alphas: paper (default), authors, or comma-separated numbers")
    p.add_argument("--epochs", type=int, help="epochs per split (default 150)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="batch size (default 100)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--splits", type=int, help="number of stratified splits (default 5)")
    p.add_argument("--seed", type=int, help="seed of the splits, weights and augmentation (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=("torch", "triton"),
                   help="torch (reference, default) or triton (fused kernels; needs a CUDA device)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--scaling", choices=("minmax", "physical"),
                   help="chip scaling: minmax (default; each chip channel to its own min..max, the paper's and the "
                   "scanner's) or physical (bands in physical units: a verifier for fusionkern scan --verify)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"),
                   help="mixed precision: forward and loss under torch.autocast in bf16 or fp16, weights and optimiser "
                        "in float32 (fp16 adds a gradient scaler); with --backend triton the fused kernels run in it "
                        "too. Default off")  # fmt: skip
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="turn augmentation off")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")


def parse_alphas(text: str | None):
    if text is None or text in ("paper", "authors"):
        return text
    from fusionkern.errors import ConfigError

    try:
        return [float(a) for a in text.split(",")]
    except ValueError:
        raise ConfigError(f"--alphas must be paper, authors or comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from fusionkern.train import TrainConfig, run_training

    overrides = {k: getattr(args, k) for k in (
        "data", "out", "model", "backbone", "preset", "width", "branch", "epochs", "batch_size", "lr", "splits",
        "seed", "device", "backend", "workers", "augment", "progress", "scaling", "amp")}  # fmt: skip
    overrides["alphas"] = parse_alphas(args.alphas)
    cfg = TrainConfig.from_sources(args.config, **overrides)
    result = run_training(cfg)
    s = result["summary"]
    print(f"test accuracy {100 * s['accuracy']['mean']:.1f} +- {100 * s['accuracy']['std']:.1f} %, "
          f"cement recall {100 * s['cement_recall']['mean']:.1f} +- {100 * s['cement_recall']['std']:.1f} % "
          f"over {len(result['splits'])} split(s); report in {cfg.out}/report.md")  # fmt: skip
    return 0
