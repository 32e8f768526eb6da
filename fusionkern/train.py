"""Training and evaluation with the paper's protocol (section II-C).

Adam, cross-entropy with class weights [3, 1] (cement, landcover), the paper's augmentations on the training part,
five stratified splits (20 % test, the rest 80/20 train/validation). Per split the checkpoint with the best
validation accuracy is kept and scored on the test part; the report gives each split and mean +- std over splits.

Outputs in ``out``::

    metrics.json          config, per-split metrics (accuracy, per-class accuracy, cement recall/precision, F1,
                          confusion matrix), mean and std over splits
    report.md             the same as Markdown tables
    split_<k>/best.pt     best checkpoint of split k (fusionkern checkpoint, loads with weights_only=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fusionkern import BRANCHES, CLASSES
from fusionkern.data.transforms import SCALINGS, scaling_name
from fusionkern.devices import resolve_device  # noqa: F401  (re-exported: the trainer's callers import it here)
from fusionkern.errors import ConfigError, FusionkernError
from fusionkern.files import write_text_atomic
from fusionkern.metrics import SUMMARY_KEYS, classification_metrics, summarise
from fusionkern.models import FIVE_INPUT_MODELS, SINGLE_INPUT_MODELS, build_model, get_preset, save_checkpoint
from fusionkern.models.layers import BACKENDS
from fusionkern.models.networks import check_backend_available, takes_all_branches


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``fusionkern train --amp``: the dtype ``torch.autocast`` runs the forward and the loss in (None: float32)."""


def autocast(device: torch.device, amp: str = "off"):
    """``torch.autocast`` on ``device`` in :data:`AMP_DTYPES` ``[amp]``, or a context that does nothing for off."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class TrainConfig:
    """Everything ``fusionkern train`` takes; also settable from a YAML file with the same keys."""

    data: str | list[str] = ""  # dataset folder(s) (site layout or the authors' layout), merged when several
    out: str = "runs/train"
    model: str = "fusionnet"  # fusionnet, physicsnet (a verifier), or a single-input model: cnn5, ..., dgcnn
    backbone: str = "dgcnn"  # FusionNet branches: dgcnn or cnn5
    preset: str = "native"  # native (35 px chips, the scanner's) or paper (256 px input, as published)
    width: float = 1.0
    branch: str = "b76"  # the input of a single-input model
    alphas: str | list[float] = "paper"  # MixPool initial alphas: paper, authors, or four numbers
    epochs: int = 150
    batch_size: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    splits: int = 5
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    class_weights: list[float] = field(default_factory=lambda: [3.0, 1.0])
    augment: bool = True
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    backend: str = "torch"  # torch (reference) or triton (fused kernels, CUDA)
    workers: int = 0
    progress: bool = True
    scaling: str = "minmax"  # minmax (the paper's, what the scanner cuts) or physical (a verifier's inputs)
    amp: str = "off"  # mixed precision: off, bf16 or fp16 (torch.autocast; weights stay float32)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def data_folders(self) -> list[str]:
        """The dataset folders, as a list."""
        return [self.data] if isinstance(self.data, str) else [str(d) for d in self.data]

    def validate(self) -> None:
        if self.model.lower() not in FIVE_INPUT_MODELS and self.model.lower() not in SINGLE_INPUT_MODELS:
            raise ConfigError(f"model: unknown {self.model!r}; choose fusionnet, physicsnet or one of "
                              f"{sorted(SINGLE_INPUT_MODELS)}")  # fmt: skip
        get_preset(self.preset)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: unknown {self.backend!r}; choose one of {list(BACKENDS)}")
        scaling_name(self.scaling)
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"amp: unknown {self.amp!r}; choose one of {list(AMP_DTYPES)}")
        if self.branch not in BRANCHES:
            raise ConfigError(f"branch: unknown {self.branch!r}; choose one of {list(BRANCHES)}")
        for name in ("epochs", "batch_size", "splits"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if len(self.class_weights) != len(CLASSES):
            raise ConfigError(f"class_weights needs {len(CLASSES)} values ({', '.join(CLASSES)}), got {self.class_weights}")

    @classmethod
    def from_sources(cls, config_file: str | os.PathLike | None = None, **overrides: Any) -> "TrainConfig":
        """Defaults, then the YAML file's keys, then ``overrides`` that are not None (the CLI's flags)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(load_yaml_config(config_file, cls))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_yaml_config(path: str | os.PathLike, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a YAML mapping whose keys must all be fields of ``cls``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return data


def build_from_config(cfg: TrainConfig) -> nn.Module:
    if cfg.model.lower() == "physicsnet":
        return build_model(cfg.model, preset=cfg.preset, width=cfg.width)
    kwargs: dict[str, Any] = dict(preset=cfg.preset, width=cfg.width, alphas=cfg.alphas)
    if cfg.model.lower() == "fusionnet":
        kwargs["backbone"] = cfg.backbone
    return build_model(cfg.model, **kwargs)


def model_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dataset batch (B, N, 3, S, S) -> what ``model`` takes, resized to its input size on the batch's device.

    FusionNet and PhysicsNet take all five branches; a single-input model's dataset holds its one branch (N = 1).
    """
    if not takes_all_branches(model):
        x = x[:, 0]
    return model.prepare(x)


def dataset_branches(cfg: "TrainConfig") -> tuple[str, ...]:
    """The branches a dataset must read for ``cfg``'s model: all five, or the single-input model's one."""
    return BRANCHES if cfg.model.lower() in FIVE_INPUT_MODELS else (cfg.branch,)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "off"):
    """Labels and class probabilities (N, num_classes) over a loader (the forward under ``amp``, see :func:`fit`)."""
    model.eval()
    labels, probs = [], []
    for x, y in loader:
        with autocast(device, amp):
            logits = model(model_inputs(model, x.to(device, non_blocking=True)))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "off") -> dict:
    y, p = predict(model, loader, device, amp)
    return classification_metrics(y, p.argmax(1))


def _loader(ds, indices, batch_size, shuffle, workers, seed) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    # A training batch of one site cannot be batch-normalised: where the shuffled split leaves one site over, it
    # waits for the next epoch's order (a different site each epoch) instead of failing the run.
    lone = shuffle and len(indices) > batch_size and len(indices) % batch_size == 1
    return DataLoader(
        Subset(ds, indices), batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen,
        drop_last=lone, persistent_workers=workers > 0,
    )  # fmt: skip


def _progress(total: int, desc: str, enabled: bool):
    """A live bar within each epoch on a terminal; elsewhere (logs, CI) none: the epoch's own line is the step."""
    import sys

    from tqdm.auto import tqdm

    live = enabled and getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, desc=desc, unit="site", leave=False, disable=not live, dynamic_ncols=True)


def split_loaders(train_ds, eval_ds, split, batch_size: int, workers: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled, augmented dataset), validation and test loaders of one split, seeded by the split."""
    return (
        _loader(train_ds, split.train, batch_size, True, workers, split.seed),
        _loader(eval_ds, split.val, batch_size, False, workers, split.seed),
        _loader(eval_ds, split.test, batch_size, False, workers, split.seed),
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    class_weights: Sequence[float],
    device: torch.device,
    on_best: Callable[[int, dict], None],
    index: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = False,
    amp: str = "off",
) -> tuple[list[dict], int]:
    """The paper's loop: Adam over the trainable parameters, weighted cross-entropy, validation every epoch.

    ``on_best(epoch, val_metrics)`` is called whenever validation accuracy improves (to save the model).
    Returns the per-epoch history and the best epoch. A non-finite loss stops training with a clear error.
    ``amp`` (``bf16``, ``fp16``) runs the forward and the loss under ``torch.autocast`` in that dtype, the weights
    and the optimiser staying float32; fp16 scales the loss against gradient underflow (``torch.amp.GradScaler``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(list(class_weights), dtype=torch.float32, device=device))
    best_acc, best_epoch, history = -1.0, 0, []
    n_train = len(train_loader.dataset)
    for epoch in range(1, epochs + 1):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        with _progress(n_train, f"split {index} epoch {epoch}/{epochs}", progress) as bar:
            for x, y in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, amp):
                    loss = criterion(model(model_inputs(model, x)), y)
                if not torch.isfinite(loss):
                    raise FusionkernError(
                        f"training loss became {loss.item()} at split {index} epoch {epoch}; "
                        f"lower the learning rate (lr={lr}) or check the data for non-finite values"
                    )
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # without fp16: loss.backward(), then optimiser.step()
                scaler.step(optimiser)
                scaler.update()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                bar.update(len(y))
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", sites_s=f"{seen / (time.perf_counter() - t0):.1f}")
        val = evaluate(model, val_loader, device, amp)
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_accuracy": val["accuracy"],
                  "sites_per_s": seen / (time.perf_counter() - t0)}  # fmt: skip
        history.append(record)
        if val["accuracy"] > best_acc:
            best_acc, best_epoch = val["accuracy"], epoch
            on_best(epoch, val)
        log(f"split {index} epoch {epoch:3d}: loss {record['train_loss']:.4f}  "
            f"val acc {val['accuracy']:.3f}  {record['sites_per_s']:.1f} sites/s")  # fmt: skip
    return history, best_epoch


def train_split(
    cfg: TrainConfig,
    train_ds,
    eval_ds,
    split,
    index: int,
    split_dir: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
    checkpoint_data: Mapping[str, Any] | None = None,
    origin: Sequence[int] | None = None,
) -> dict:
    """Train one split; keep the best-on-validation checkpoint; return its validation and test metrics."""
    from fusionkern.scan.decide import effective_prior

    torch.manual_seed(split.seed)
    model = build_from_config(cfg).to(device).to_backend(cfg.backend)
    train_loader, val_loader, test_loader = split_loaders(train_ds, eval_ds, split, cfg.batch_size, cfg.workers)
    best_path = split_dir / "best.pt"
    labels = np.asarray(train_ds.labels)[split.train]
    n_cement, n_landcover = int((labels == 0).sum()), int((labels == 1).sum())
    prior = {"cement": effective_prior(n_cement, n_landcover, cfg.class_weights), "train_sites": [n_cement, n_landcover],
             "class_weights": list(cfg.class_weights),
             "note": "cement share of the training sites, weighted by the loss's class weights"}  # fmt: skip
    data = dict(checkpoint_data or {}, branch=None if takes_all_branches(model) else cfg.branch, prior=prior)

    def save_best(epoch: int, val: dict) -> None:
        save_checkpoint(model, best_path, data=data, epoch=epoch, split=index, split_seed=split.seed, val=val,
                        train_config=dataclasses.asdict(cfg))  # fmt: skip

    history, best_epoch = fit(
        model, train_loader, val_loader, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
        class_weights=cfg.class_weights, device=device, on_best=save_best, index=index, log=log,
        progress=cfg.progress, amp=cfg.amp,
    )  # fmt: skip
    from fusionkern.models import load_checkpoint

    best_model = load_checkpoint(best_path, map_location=device).to_backend(cfg.backend)
    test = evaluate(best_model, test_loader, device, cfg.amp)
    val = evaluate(best_model, val_loader, device, cfg.amp)
    result = {"split": index, "seed": split.seed, "best_epoch": best_epoch, "val": val, "test": test,
              "checkpoint": str(best_path), "history": history}  # fmt: skip
    if origin is not None and len(set(origin)) > 1:  # held-out figures of each merged folder on its own
        folders = cfg.data_folders
        by_folder = {}
        for k, folder in enumerate(folders):
            part = [i for i in split.test if origin[i] == k]
            if part:
                loader = _loader(eval_ds, part, cfg.batch_size, False, cfg.workers, split.seed)
                y, p = predict(best_model, loader, device, cfg.amp)
                by_folder[folder] = classification_metrics(y, p.argmax(1))
        result["test_by_data"] = by_folder
    return result


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_report(cfg: TrainConfig, runs: list[dict], summary: dict) -> str:
    what = {"fusionnet": f"FusionNet ({cfg.backbone} branches)", "physicsnet": "PhysicsNet (verifier)"}.get(
        cfg.model.lower(), f"{cfg.model.upper()} on {cfg.branch}")
    names = {"accuracy": "accuracy", "cement_accuracy": "cement acc.", "landcover_accuracy": "landcover acc.",
             "cement_recall": "cement recall", "cement_precision": "cement precision", "f1": "F1"}  # fmt: skip
    lines = [
        f"# Training report: {what}, preset {cfg.preset}, width {cfg.width}, {scaling_name(cfg.scaling)} scaling",
        "",
        f"Data `{cfg.data}`; {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, "
        f"class weights {cfg.class_weights}, {len(runs)} split(s), seed {cfg.seed}. Test-set figures in %.",
        "",
        "| split | best epoch | " + " | ".join(names[k] for k in SUMMARY_KEYS) + " | confusion [[cc, cl], [lc, ll]] |",
        "|---|---|" + "---|" * len(SUMMARY_KEYS) + "---|",
    ]
    for r in runs:
        t = r["test"]
        lines.append(f"| {r['split']} | {r['best_epoch']} | " + " | ".join(_fmt(t[k]) for k in SUMMARY_KEYS)
                     + f" | {t['confusion_matrix']} |")  # fmt: skip
    lines.append("| **mean +- std** | | " + " | ".join(
        f"{_fmt(summary[k]['mean'])} +- {_fmt(summary[k]['std'])}" for k in SUMMARY_KEYS) + " | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """The whole protocol: read the data, split, train each split, write metrics.json and report.md."""
    from fusionkern.data import SiteAugment, SiteDataset, load_many, stratified_splits

    device = resolve_device(cfg.device)
    check_backend_available(cfg.backend, device)
    if not cfg.data or not all(cfg.data_folders):
        raise ConfigError("data: no dataset folder given (--data DIR [DIR ...] or 'data:' in the config file)")
    from fusionkern.files import check_writable

    check_writable(cfg.out, "--out", inside=True)  # before reading or training anything
    sites, reports, origin = load_many(cfg.data_folders)
    for report in reports:
        log(report.summary())
    preset = get_preset(cfg.preset)
    branches = dataset_branches(cfg)
    augment = SiteAugment(seed=cfg.seed) if cfg.augment else None
    train_ds = SiteDataset(sites, chip_size=preset.chip_px, augment=augment, branches=branches, scaling=cfg.scaling)
    eval_ds = train_ds.with_augment(None)  # shares the decoded-chip cache
    labels = np.asarray(train_ds.labels)
    splits = stratified_splits(labels, cfg.splits, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    log(f"{len(sites)} sites ({', '.join(f'{n} {c}' for c, n in counts.items())}) from {cfg.data}; "
        f"{len(splits)} split(s); training on {device}")  # fmt: skip
    summary_by_data = None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for index, split in enumerate(splits):
        split_dir = out / f"split_{index}"
        split_dir.mkdir(exist_ok=True)
        run = train_split(cfg, train_ds, eval_ds, split, index, split_dir, device, log,
                          checkpoint_data={"dataset": cfg.data_folders, "scaling": SCALINGS[scaling_name(cfg.scaling)]},
                          origin=origin)  # fmt: skip
        t = run["test"]
        log(f"split {index}: test accuracy {_fmt(t['accuracy'])} %, cement recall {_fmt(t['cement_recall'])} %"
            f" (best epoch {run['best_epoch']}, {run['checkpoint']})")  # fmt: skip
        runs.append(run)
    summary = summarise(r["test"] for r in runs)
    if all("test_by_data" in r for r in runs):
        summary_by_data = {
            folder: summarise(r["test_by_data"][folder] for r in runs)
            for folder in cfg.data_folders if all(folder in r["test_by_data"] for r in runs)
        }  # fmt: skip
    result = {"config": dataclasses.asdict(cfg), "classes": list(CLASSES), "sites": counts, "splits": runs,
              "summary": summary, "summary_by_data": summary_by_data}  # fmt: skip
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=2, default=float))
    write_text_atomic(out / "report.md", markdown_report(cfg, runs, summary))
    return result


__all__ = ["TrainConfig", "evaluate", "load_yaml_config", "predict", "run_training", "resolve_device"]
