"""The paper's state-of-the-art baselines (Fig. 7) and its transfer-learning study (section III-D, Fig. 9).

VGG13, ResNet18, ResNet50 and EfficientNet-B0 from torchvision (the ``baselines`` extra), each with its classifier's
last linear layer replaced by one with two outputs (cement, landcover), trained on one band's three-date chips:

* **from scratch** (rows ``VGG13`` ...): random initialisation, every weight trained; by default on every band
  (``--quick``: Band 10 only);
* **transfer learning** (rows ``TLVGG13`` ...): ImageNet weights, then the paper's protocol: "all hidden layers
  were frozen and only the higher layers were fine-tuned". The convolutional feature extractor is frozen (no
  gradient, and its batch-norm layers keep ImageNet's statistics: they stay in evaluation mode while the rest
  trains); the classifier block is trained: VGG13's three fully connected layers, ResNet's ``fc``,
  EfficientNet's dropout and linear layer. ``tl_finetune="all"`` fine-tunes every layer instead. By default on
  Band 10, the band of Fig. 9.

Both variants see the same input: the chip, min-max scaled per channel like every model here, resized to
``input_size`` (default the preset's: 256 px for ``paper``, as the authors resize, 35 px for ``native``) and
normalised with ImageNet's channel mean and standard deviation, the statistics the pretrained filters expect. The
training protocol is the paper's (Adam, cross-entropy weighted [3, 1], augmentation, best-on-validation weights,
splits), as for every other experiment.

ImageNet weights come from a file the user gives (``weights_dir``: torchvision's file name, e.g.
``resnet18-f37072fd.pth``, or ``<arch>.pth``), or else from torchvision's own cache (``torch.hub.get_dir()/
checkpoints``), which torchvision fills from its download site on first use unless ``download=False``.

Everything above the torchvision builders goes through a *network factory* ``factory(arch, pretrained) ->
nn.Module`` returning the ImageNet-shaped network, so that the protocol can run with any network that has the
same head attribute (``fc`` or ``classifier``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fusionkern.errors import CheckpointError, ConfigError, FusionkernError, InputError, MissingDependencyError
from fusionkern.experiments.core import (
    BAND_LABELS,
    PAPER_BAND_ORDER,
    Axis,
    ExperimentSettings,
    assemble,
    load_data,
    run_grid,
)
from fusionkern.experiments.resume import CellStore
from fusionkern.models import get_preset, resize_chips


@dataclass(frozen=True)
class Arch:
    """A torchvision architecture: its builder (``torchvision.models.<key>``), weights enum and classifier block."""

    key: str
    label: str
    weights: str  # name of the torchvision weights enum
    head: str  # attribute of the network holding the classifier block (trained under the transfer protocol)


ARCHS = {
    a.key: a
    for a in (
        Arch("vgg13", "VGG13", "VGG13_Weights", "classifier"),
        Arch("resnet18", "ResNet18", "ResNet18_Weights", "fc"),
        Arch("resnet50", "ResNet50", "ResNet50_Weights", "fc"),
        Arch("efficientnet_b0", "EfficientNet-B0", "EfficientNet_B0_Weights", "classifier"),
    )
}
"""The paper's baselines, in its order."""

ARCH_ALIASES = {"efficientnet": "efficientnet_b0", "efficientnet-b0": "efficientnet_b0", "effnet": "efficientnet_b0"}

IMAGENET_WEIGHTS = "IMAGENET1K_V1"
"""The torchvision weights of every pretrained baseline (the original ImageNet-1k release of each)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INITS = ("scratch", "imagenet")

QUICK_BANDS = ("b10",)
"""Default bands of the from-scratch rows with ``--quick``: Band 10 only, where they meet the pretrained rows (Fig. 9);
VGG13's 129 M parameters make each of its cells the slowest of the quick run."""
FINETUNE = ("head", "all")

PAPER_FIG7_B76 = {"vgg13": 89.6, "resnet50": 89.5, "resnet18": 89.3, "efficientnet_b0": 89.2}
"""Accuracy (%) of the baselines on Band 7:6 quoted in the paper's text on Fig. 7 (FusionNet: 90.6)."""

TITLE = "Baselines: VGG13, ResNet18, ResNet50, EfficientNet-B0 from scratch and ImageNet-pretrained (Figs. 7 and 9)"

NetworkFactory = Callable[[Arch, bool], nn.Module]
"""``factory(arch, pretrained)``: the ImageNet-shaped network (1000 outputs), with ImageNet weights if asked."""


# --------------------------------------------------------------------------------------------- torchvision access


class TorchvisionUnusable(MissingDependencyError):
    """torchvision is installed but cannot be imported beside this torch (a build for another torch)."""

    def __init__(self, reason: str):
        FusionkernError.__init__(
            self,
            f"the baselines need a torchvision built for this torch {torch.__version__}; importing the installed one "
            f"failed ({reason}): pip install 'fusionkern[baselines]' with the torchvision matching this torch",
        )
        self.package, self.extra = "torchvision", "baselines"


def _import_torchvision_models():
    try:
        import torchvision.models as models
    except ImportError as exc:
        raise MissingDependencyError(
            "torchvision", "baselines", "The VGG13, ResNet and EfficientNet baselines"
        ) from exc
    except (RuntimeError, OSError, AttributeError) as exc:  # e.g. "operator torchvision::nms does not exist"
        raise TorchvisionUnusable((str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]) from exc
    return models


def torchvision_status() -> str | None:
    """None when torchvision can be used, else the one-line reason why not."""
    try:
        _import_torchvision_models()
    except MissingDependencyError as exc:
        return str(exc)
    return None


def imagenet_cache_path(url: str) -> Path:
    """Where torchvision keeps (or would download) the weights file at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def find_weights_file(weights_dir: str | os.PathLike, arch: Arch, url: str | None = None) -> Path:
    """The ImageNet weights of ``arch`` in ``weights_dir``: torchvision's file name, ``<key>.pth`` or ``<key>.pt``,
    or else the one file named ``<key>-*.pth``."""
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise InputError(f"--weights-dir {folder} does not exist or is not a folder")
    names = ([os.path.basename(url)] if url else []) + [f"{arch.key}.pth", f"{arch.key}.pt"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    matches = sorted(folder.glob(f"{arch.key}-*.pth"))
    if len(matches) == 1:
        return matches[0]
    raise InputError(
        f"--weights-dir {folder} has no ImageNet weights for {arch.label}: expected {' or '.join(names)}"
        + (f" (torchvision's file, from {url})" if url else "")
    )


def load_state_dict_file(net: nn.Module, path: str | os.PathLike, label: str) -> None:
    """Load a state dict saved with ``torch.save`` (plain, under ``state_dict``, or from DataParallel) into ``net``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path} is not a readable weights file ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit {label} ({first})") from None


def torchvision_factory(weights_dir: str | os.PathLike | None = None, download: bool = True) -> NetworkFactory:
    """The network factory over torchvision's builders (``torchvision.models.vgg13(weights=...)`` ...).

    Args:
        weights_dir: Folder with the ImageNet weights files; when given, nothing is fetched.
        download: Let torchvision download missing ImageNet weights into its cache; when False, a weights file
            that is neither in ``weights_dir`` nor in the cache is an error.

    Raises (when called):
        MissingDependencyError: torchvision is not installed.
        InputError: The ImageNet weights cannot be found or fetched.
    """

    def build(arch: Arch, pretrained: bool) -> nn.Module:
        models = _import_torchvision_models()
        builder = getattr(models, arch.key)
        if not pretrained:
            return builder(weights=None)
        enum = getattr(getattr(models, arch.weights), IMAGENET_WEIGHTS)
        if weights_dir is not None:
            net = builder(weights=None)
            load_state_dict_file(net, find_weights_file(weights_dir, arch, enum.url), arch.label)
            return net
        cached = imagenet_cache_path(enum.url)
        if not download and not cached.is_file():
            raise InputError(
                f"the ImageNet weights of {arch.label} are not in torchvision's cache ({cached}); download "
                f"{enum.url} and pass its folder with --weights-dir, or allow the download"
            )
        try:
            return builder(weights=enum)  # torchvision reads its cache, downloading into it first when absent
        except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise InputError(
                f"could not get the ImageNet weights of {arch.label} ({first}); download {enum.url} and pass its "
                "folder with --weights-dir"
            ) from None

    return build


# ------------------------------------------------------------------------------------------------ the protocol


def _replace_last_linear(net: nn.Module, head: str, num_classes: int) -> nn.Module:
    """Swap the last ``nn.Linear`` of ``net.<head>`` for a fresh one with ``num_classes`` outputs; returns it."""
    block = getattr(net, head, None)
    if block is None:
        raise ConfigError(f"{type(net).__name__} has no '{head}' classifier block")
    if isinstance(block, nn.Linear):
        new = nn.Linear(block.in_features, num_classes)
        setattr(net, head, new)
        return new
    linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"the '{head}' block of {type(net).__name__} has no linear layer to replace")
    name, old = linears[-1]
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    new = nn.Linear(old.in_features, num_classes)
    setattr(parent, name.rpartition(".")[2], new)
    return new


class BaselineNet(nn.Module):
    """A baseline network with a two-class head, its input preparation and the transfer-learning freeze.

    Args:
        net: The ImageNet-shaped network (from the factory).
        arch: Its architecture (names the classifier block).
        pretrained: Whether ``net`` holds ImageNet weights; with ``finetune="head"`` everything outside the classifier
            block is then frozen.
        input_size: Side the chips are resized to.
        num_classes: Outputs of the new last layer.
        finetune: ``"head"`` (the paper's protocol) or ``"all"``; only used when ``pretrained``.
    """

    def __init__(self, net: nn.Module, arch: Arch, pretrained: bool, input_size: int, num_classes: int = 2,
                 finetune: str = "head"):  # fmt: skip
        super().__init__()
        if finetune not in FINETUNE:
            raise ConfigError(f"--tl-finetune: unknown {finetune!r}; choose one of {', '.join(FINETUNE)}")
        if input_size < 1:
            raise ConfigError(f"--input-size must be a positive number of pixels, got {input_size}")
        self.arch, self.pretrained, self.input_size, self.finetune = arch, pretrained, int(input_size), finetune
        _replace_last_linear(net, arch.head, num_classes)
        self.net = net
        self.frozen = bool(pretrained and finetune == "head")
        if self.frozen:
            for name, child in net.named_children():
                if name != arch.head:
                    child.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def frozen_modules(self) -> list[nn.Module]:
        """The top-level parts of the network that the transfer protocol freezes (empty when nothing is frozen)."""
        return [child for name, child in self.net.named_children() if name != self.arch.head] if self.frozen else []

    def train(self, mode: bool = True) -> BaselineNet:
        """Train mode for the trainable part; the frozen part stays in eval mode (batch-norm statistics kept)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) chips in [0, 1] -> resized to ``input_size`` and ImageNet-normalised."""
        return (resize_chips(x, self.input_size) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_baseline(arch: str | Arch, pretrained: bool, input_size: int, factory: NetworkFactory | None = None,
                   finetune: str = "head", num_classes: int = 2) -> BaselineNet:  # fmt: skip
    """A baseline ready to train: the factory's network (default torchvision's) with the two-class head and freeze."""
    arch = arch if isinstance(arch, Arch) else ARCHS[arch]
    net = (factory or torchvision_factory())(arch, pretrained)
    return BaselineNet(net, arch, pretrained, input_size, num_classes, finetune)


def fit_baseline(
    build: Callable[[], BaselineNet],
    settings: ExperimentSettings,
    train_ds,
    eval_ds,
    split,
    index: int,
    device: torch.device,
    log: Callable[[str], None] = print,
    save_path: Path | None = None,
) -> dict:
    """Train one baseline on one split with the paper's protocol; keep the best-on-validation weights.

    The loop is :func:`fusionkern.train.fit` (Adam over the trainable parameters, weighted cross-entropy,
    augmentation from ``train_ds``); the best weights are kept in memory, since torchvision models are not fusionkern
    checkpoints, and ``save_path`` also writes them (``torch.save`` of plain values and tensors).
    """
    from fusionkern.train import evaluate, fit, split_loaders

    torch.manual_seed(split.seed)
    model = build().to(device)
    train_loader, val_loader, test_loader = split_loaders(train_ds, eval_ds, split, settings.batch_size,
                                                          settings.workers)  # fmt: skip
    best: dict[str, Any] = {}

    def keep_best(epoch: int, val: dict) -> None:
        best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    history, best_epoch = fit(
        model, train_loader, val_loader, epochs=settings.epochs, lr=settings.lr,
        weight_decay=settings.weight_decay, class_weights=settings.class_weights, device=device,
        on_best=keep_best, index=index, log=log,
    )  # fmt: skip
    model.load_state_dict(best["state"])
    test, val = evaluate(model, test_loader, device), evaluate(model, val_loader, device)
    checkpoint = None
    if save_path is not None:
        checkpoint = str(_save_baseline(model, save_path, split=index, split_seed=split.seed, epoch=best_epoch,
                                        val=val, settings=settings.as_dict()))  # fmt: skip
    return {"split": index, "seed": split.seed, "best_epoch": best_epoch, "val": val, "test": test,
            "checkpoint": checkpoint, "history": history,
            "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _save_baseline(model: BaselineNet, path: Path, **metadata: Any) -> Path:
    from fusionkern.models.checkpoint import _plain, atomic_save

    payload = {
        "format": "fusionkern-baseline", "version": 1, "arch": model.arch.key, "pretrained": model.pretrained,
        "finetune": model.finetune, "input_size": model.input_size, "imagenet_normalised": True,
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "metadata": _plain(metadata, "metadata"),
    }  # fmt: skip
    return atomic_save(payload, path)


def row_key(arch: str, pretrained: bool) -> str:
    return f"tl-{arch}" if pretrained else arch


def row_label(arch: Arch, pretrained: bool) -> str:
    return f"TL{arch.label}" if pretrained else arch.label


def run_baselines(
    settings: ExperimentSettings,
    archs: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
    tl_bands: Sequence[str] | None = None,
    inits: Sequence[str] | None = None,
    *,
    input_size: int | None = None,
    tl_finetune: str = "head",
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    save_checkpoints: bool = False,
    factory: NetworkFactory | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the baselines from scratch on ``bands`` and ImageNet-pretrained on ``tl_bands``; write the report.

    Args:
        settings: Training settings and folders (``settings.resume`` continues an interrupted run).
        archs: Architectures, default all four of :data:`ARCHS`.
        bands: Bands of the from-scratch rows, default all five (Band 10 only with ``settings.quick``).
        tl_bands: Bands of the transfer-learning rows, default Band 10 (the paper's Fig. 9).
        inits: ``"scratch"`` and/or ``"imagenet"``, default both.
        input_size: Side the chips are resized to, default the preset's input size.
        tl_finetune: ``"head"`` (frozen feature extractor, the paper) or ``"all"``.
        weights_dir: Folder with the ImageNet weights files (see :func:`find_weights_file`).
        download: Let torchvision fetch ImageNet weights that are not in its cache.
        save_checkpoints: Also write each cell's best weights as ``best.pt``.
        factory: Network factory; default :func:`torchvision_factory` (``weights_dir``, ``download``).
        log: Progress lines.

    Raises:
        MissingDependencyError: torchvision is not installed and no ``factory`` is given.
    """
    from fusionkern.experiments.report import write_report
    from fusionkern.devices import resolve_device

    if factory is None:
        _import_torchvision_models()  # the one-line "needs torchvision" before any data is read
        factory = torchvision_factory(weights_dir, download)
    archs = [a for a in ARCHS if a in set(archs or ARCHS)]
    inits = [i for i in INITS if i in set(inits or INITS)]
    default_bands = QUICK_BANDS if settings.quick else PAPER_BAND_ORDER
    bands = [b for b in PAPER_BAND_ORDER if b in set(bands or default_bands)]
    tl_bands = [b for b in PAPER_BAND_ORDER if b in set(tl_bands or ("b10",))]
    if tl_finetune not in FINETUNE:
        raise ConfigError(f"--tl-finetune: unknown {tl_finetune!r}; choose one of {', '.join(FINETUNE)}")
    size = int(input_size or get_preset(settings.preset).input_size)
    if size < 1:
        raise ConfigError(f"--input-size must be a positive number of pixels, got {size}")
    used_bands = (bands if "scratch" in inits else []) + (tl_bands if "imagenet" in inits else [])
    device = resolve_device(settings.device)
    data = load_data(settings, used_bands, log)
    fingerprint = {**settings.fingerprint(), "dataset": data.identity, "input_size": size, "tl_finetune": tl_finetune}
    store = CellStore(settings.out, "baselines", fingerprint, resume=settings.resume, overwrite=settings.overwrite)

    rows, cells = [], []
    columns = [Axis(b, BAND_LABELS[b]) for b in PAPER_BAND_ORDER if b in set(used_bands)]
    by_key = {c.key: c for c in columns}
    for init in inits:
        pretrained = init == "imagenet"
        for key in archs:
            row = Axis(row_key(key, pretrained), row_label(ARCHS[key], pretrained))
            rows.append(row)
            cells += [(row, by_key[b]) for b in (tl_bands if pretrained else bands)]

    def train(row: Axis, column: Axis, split, index: int, split_dir: Path) -> dict:
        pretrained = row.key.startswith("tl-")
        arch = ARCHS[row.key.removeprefix("tl-")]
        seed = split.seed if settings.augment else None
        return fit_baseline(
            lambda: build_baseline(arch, pretrained, size, factory, tl_finetune), settings,
            data.view([column.key], seed), data.view([column.key], None), split, index, device, log,
            save_path=split_dir / "best.pt" if save_checkpoints else None,
        )  # fmt: skip

    notes = [
        f"Inputs resized to {size} x {size} px and ImageNet-normalised for every row.",
        "TL rows: ImageNet weights ("
        + ("frozen feature extractor, classifier block trained" if tl_finetune == "head" else "every layer fine-tuned")
        + ").",
    ]

    def result_of(records) -> dict[str, Any]:
        return assemble("baselines", TITLE, settings, data, rows, columns, records, notes=notes,
                        paper={"source": "Fig. 7 (text), Band 7:6", "metric": "accuracy",
                               "values": {k: {"b76": v} for k, v in PAPER_FIG7_B76.items()}},
                        extra={"input_size": size, "tl_finetune": tl_finetune, "tl_bands": tl_bands,
                               "archs": {k: dataclasses.asdict(ARCHS[k]) for k in archs}})  # fmt: skip

    records = run_grid(store, rows, columns, data.splits, train, cells=cells, log=log,
                       on_cell=lambda recs: write_report(result_of(recs), settings.out, figures=False))  # fmt: skip
    result = result_of(records)
    result["files"] = write_report(result, settings.out, log=log)
    return result


__all__ = [
    "ARCHS", "Arch", "BaselineNet", "IMAGENET_WEIGHTS", "NetworkFactory", "PAPER_FIG7_B76", "build_baseline",
    "find_weights_file", "fit_baseline", "imagenet_cache_path", "load_state_dict_file", "run_baselines",
    "torchvision_factory", "torchvision_status",
]  # fmt: skip
