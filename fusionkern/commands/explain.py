"""``fusionkern explain``: class activation maps and t-SNE of trained models, e.g. CNN5 against DGCNN."""

from __future__ import annotations

import argparse

NAME = "explain"
HELP = ("Class activation maps over chips (cam.png) and a t-SNE of the learned features coloured by class "
        "(tsne.png) for one or more checkpoints, e.g. CNN5 against DGCNN as in the paper's Figs. 4 and 6.")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="fusionkern checkpoints (best.pt of fusionkern train or experiment), e.g. CNN5's then DGCNN's",
    )
    p.add_argument("--data", required=True, help="dataset folder the checkpoints were trained on")
    p.add_argument("--out", default="runs/explain", help="output folder (default runs/explain)")
    p.add_argument(
        "--sites",
        choices=("test", "all"),
        default="test",
        help="the first checkpoint's test sites (default, rebuilt from its recorded split) or every site",
    )
    p.add_argument("--chips", type=int, default=4, help="chips per class in the CAM grid (default 4)")
    p.add_argument(
        "--cam-class",
        dest="cam_class",
        choices=("predicted", "true", "cement", "landcover"),
        default="predicted",
        help="class whose activation map is drawn (default: each model's prediction)",
    )
    p.add_argument("--overlay-branch", dest="overlay_branch", default="b76",
                   help="FusionNet only: the band CAMs are drawn over (default b76)")  # fmt: skip
    p.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE")
    p.add_argument("--perplexity", type=float, help="t-SNE perplexity (default min(30, (sites - 1) / 3))")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from fusionkern.experiments.explain import run_explain

    result = run_explain(
        args.checkpoints, args.data, args.out, sites=args.sites, chips=args.chips, cam_class=args.cam_class,
        overlay_branch=args.overlay_branch, tsne=args.tsne, perplexity=args.perplexity, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    for m in result["models"]:
        print(f"{m['label']}: accuracy {100 * m['accuracy']:.1f} % on {len(result['sites']['keys'])} sites")
    for name, path in result["files"].items():
        print(f"{name + ':':<10}{path}")
    return 0
