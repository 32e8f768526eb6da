"""What the models look at and how they arrange the sites: class activation maps and t-SNE (paper Figs. 4 and 6).

**Class activation maps** (Zhou et al., the paper's ref. [23]). Every model here ends in global average pooling and
one linear layer, so the logit of class ``c`` is the spatial mean of ``M_c = sum_k w_ck F_k``, where ``F`` is the
last feature map (a single-input model's backbone output; FusionNet's head output) and ``w_c`` the linear layer's
row of class ``c``. ``M_c`` is upsampled (bilinear) to the chip, scaled to [0, 1] per chip and overlaid on the
chip's first date: the model's own band for a single-input model, ``overlay_branch`` (default Band 7:6) for
FusionNet. The class is each model's predicted class by default (``cam_class``).

**t-SNE** (the paper's ref. [22]) of the pooled feature vectors (``forward_features``: the input of the last linear
layer), one point per site coloured by class, with scikit-learn's :class:`sklearn.manifold.TSNE` (the
``experiments`` extra); without scikit-learn it is skipped with a one-line message.

Given the CNN5 and DGCNN checkpoints of the same band (e.g. from ``fusionkern experiment ablation``), the two
figures set CNN5 against DGCNN as the paper's figures do. By default the sites are the checkpoint's own test
sites, rebuilt from the split recorded in it (which assumes the same dataset); ``sites="all"`` takes every site.

Files written into ``out``: ``cam.png`` (rows: chips, cement first; columns: the chip's first date, then one CAM
overlay per checkpoint), ``cam.npz`` (the CAMs, chips and site keys), ``tsne.png`` (one panel per checkpoint) and
``explain.json`` (models, sites, predictions, t-SNE coordinates, what was skipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusionkern import BRANCHES, CLASSES
from fusionkern.errors import CheckpointError, ConfigError
from fusionkern.experiments.core import BAND_LABELS
from fusionkern.experiments.report import CEMENT_COLOUR, LANDCOVER_COLOUR
from fusionkern.experiments.resume import to_json
from fusionkern.files import write_text_atomic

CAM_CLASSES = ("predicted", "true", "cement", "landcover")
SITE_CHOICES = ("test", "all")


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map before global average pooling, for a prepared model input: (B, C, h, w)."""
    from fusionkern.models import FusionNet

    if isinstance(model, FusionNet):
        return model.head(model.fuse(x))
    features = getattr(model, "features", None)
    if features is None:
        raise ConfigError(f"{type(model).__name__} has no feature map to explain")
    return features(x)


def class_activation_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, size: int) -> torch.Tensor:
    """CAMs of a prepared batch ``x`` for one class per item: (B, size, size), each scaled to [0, 1].

    Args:
        model: A model ending in global average pooling and ``model.fc``.
        x: The model's prepared input (after ``model.prepare``).
        classes: Class index per item, shape (B,).
        size: Side of the chip the maps are upsampled to.
    """
    fmap = feature_map(model, x)
    weights = model.fc.weight[classes.to(fmap.device)]  # (B, C)
    cam = torch.einsum("bchw,bc->bhw", fmap, weights)[:, None]
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE of (N, D) features; perplexity default min(30, (N - 1) / 3). Needs scikit-learn and N >= 4."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 sites, got {n}")
    perplexity = float(perplexity if perplexity is not None else min(30.0, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(np.asarray(features, dtype=np.float64)).astype(np.float32)


def sklearn_status() -> str | None:
    """None when scikit-learn's TSNE can be used, else the one-line reason why not."""
    try:
        from sklearn.manifold import TSNE  # noqa: F401
    except ImportError:
        return "t-SNE skipped: it needs scikit-learn: pip install 'fusionkern[experiments]'"
    return None


@dataclass
class Explained:
    """One checkpoint's model and how it reads a site."""

    path: str
    model: nn.Module
    label: str
    branches: tuple[str, ...]  # what the dataset reads for it
    replicate: bool  # one band fed to all five FusionNet branches
    overlay: int  # index into ``branches`` of the chip the CAM is drawn over
    chip_px: int

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset batch (B, N, 3, S, S) -> model input."""
        from fusionkern.train import model_inputs

        if self.replicate:
            x = x.repeat(1, len(BRANCHES), 1, 1, 1)
        return model_inputs(self.model, x)


def describe(path: str | os.PathLike, device: torch.device, overlay_branch: str = "b76") -> Explained:
    """Load a checkpoint and work out its input: a single band, the five fused inputs, or one band replicated."""
    from fusionkern.models import FusionNet, load_checkpoint

    model = load_checkpoint(path, map_location=device)
    data = model.checkpoint.get("data", {})
    chip_px = int(data.get("chip_px", model.preset.chip_px))
    if isinstance(model, FusionNet):
        backbone = model.config.get("backbone", "dgcnn").upper()
        band = data.get("replicated_branch")
        if band:
            return Explained(str(path), model, f"FusionNet ({backbone}) on {BAND_LABELS.get(band, band)}", (band,),
                             True, 0, chip_px)  # fmt: skip
        if overlay_branch not in BRANCHES:
            raise ConfigError(f"--overlay-branch: unknown {overlay_branch!r}; choose one of {', '.join(BRANCHES)}")
        return Explained(str(path), model, f"FusionNet ({backbone})", tuple(BRANCHES), False,
                         BRANCHES.index(overlay_branch), chip_px)  # fmt: skip
    band = data.get("branch")
    if band not in BRANCHES:
        raise CheckpointError(f"{path} does not record which band its {type(model).__name__} was trained on")
    return Explained(str(path), model, f"{type(model).__name__} on {BAND_LABELS[band]}", (band,), False, 0, chip_px)


def _test_sites(explained: Explained, labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The test indices of the split recorded in the checkpoint, or None with the reason."""
    from fusionkern.data import stratified_splits

    meta = explained.model.checkpoint.get("metadata", {})
    cfg = meta.get("train_config") or {}
    if "split_seed" not in meta:
        return None, f"{explained.path} records no split; using every site"
    split = stratified_splits(labels, 1, cfg.get("test_fraction", 0.2), cfg.get("val_fraction", 0.2),
                              int(meta["split_seed"]))[0]  # fmt: skip
    return split.test, f"the test sites of split {meta.get('split')} recorded in {explained.path}"


@torch.no_grad()
def _run_model(ex: Explained, dataset, indices: np.ndarray, device: torch.device, batch_size: int = 64):
    """Features (N, D) and class probabilities (N, 2) of the sites ``indices``."""
    feats, probs = [], []
    ex.model.eval()
    for start in range(0, len(indices), batch_size):
        x = torch.stack([dataset[int(i)][0] for i in indices[start : start + batch_size]]).to(device)
        xin = ex.batch(x)
        f = ex.model.forward_features(xin)
        feats.append(f.float().cpu())
        probs.append(torch.softmax(ex.model.fc(f).float(), dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _pick_chips(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Positions (into ``labels``) of the first ``per_class`` sites of each class, cement first."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])


def run_explain(
    checkpoints: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sites: str = "test",
    chips: int = 4,
    cam_class: str = "predicted",
    overlay_branch: str = "b76",
    tsne: bool = True,
    perplexity: float | None = None,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """CAM grid and t-SNE of one or more checkpoints on a dataset; writes them to ``out``.

    Args:
        checkpoints: fusionkern checkpoints (single-input models or FusionNet), e.g. CNN5's and DGCNN's.
        data: The dataset folder (site layout or the authors').
        out: Output folder.
        sites: ``"test"`` (the test sites of the first checkpoint's recorded split) or ``"all"``.
        chips: Chips per class in the CAM grid.
        cam_class: Class whose map is drawn: ``predicted`` (each model's), ``true``, ``cement`` or ``landcover``.
        overlay_branch: FusionNet's band to draw CAMs over (single-input models use their own).
        tsne: Compute the t-SNE (skipped with a message where scikit-learn is absent).
        perplexity: t-SNE perplexity, default min(30, (N - 1) / 3).
        seed: t-SNE seed.
        device: ``auto``, ``cpu``, ``cuda``...
        log: Messages.

    Returns:
        What ``explain.json`` holds.
    """
    from fusionkern.data import SiteDataset, load_sites
    from fusionkern.devices import resolve_device

    if not checkpoints:
        raise ConfigError("explain needs at least one checkpoint")
    if sites not in SITE_CHOICES:
        raise ConfigError(f"--sites: unknown {sites!r}; choose one of {', '.join(SITE_CHOICES)}")
    if cam_class not in CAM_CLASSES:
        raise ConfigError(f"--cam-class: unknown {cam_class!r}; choose one of {', '.join(CAM_CLASSES)}")
    if chips < 1:
        raise ConfigError(f"--chips must be at least 1, got {chips}")
    dev = resolve_device(device)
    models = [describe(p, dev, overlay_branch) for p in checkpoints]
    all_sites, report = load_sites(data)
    if report is not None:
        log(report.summary())
    labels_all = np.array([s.label for s in all_sites], dtype=np.int64)
    indices, where = (np.arange(len(all_sites)), "every site")
    if sites == "test":
        test, where = _test_sites(models[0], labels_all)
        if test is not None:
            indices = test
        else:
            log(where)
    labels = labels_all[indices]
    log(f"explaining {len(models)} model(s) on {len(indices)} sites ({where})")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    picks = _pick_chips(labels, chips)
    result: dict[str, Any] = {
        "sites": {"selection": where, "keys": [all_sites[i].key for i in indices], "labels": labels.tolist()},
        "cam": {"class": cam_class, "sites": [all_sites[indices[p]].key for p in picks]},
        "models": [], "files": {}, "skipped": [],
    }  # fmt: skip
    cams: list[np.ndarray | None] = []
    overlays: list[np.ndarray] = []
    for ex in models:
        dataset = SiteDataset(all_sites, chip_size=ex.chip_px, augment=None, branches=ex.branches)
        feats, probs = _run_model(ex, dataset, indices, dev)
        pred = probs.argmax(1)
        x = torch.stack([dataset[int(indices[p])][0] for p in picks]).to(dev)
        target = {"predicted": torch.as_tensor(pred[picks]), "true": torch.as_tensor(labels[picks]),
                  "cement": torch.zeros(len(picks), dtype=torch.long),
                  "landcover": torch.ones(len(picks), dtype=torch.long)}[cam_class]  # fmt: skip
        entry = {"checkpoint": ex.path, "label": ex.label, "branches": list(ex.branches), "replicated": ex.replicate,
                 "overlay_branch": ex.branches[ex.overlay], "accuracy": float((pred == labels).mean()),
                 "probabilities": probs.round(6).tolist(), "predictions": pred.tolist(),
                 "cam_classes": target.tolist(), "features_dim": int(feats.shape[1])}  # fmt: skip
        with torch.no_grad():
            xin = ex.batch(x)
            side = tuple(feature_map(ex.model, xin[:1]).shape[-2:])
            if side == (1, 1):
                cam = None
                entry["cam"] = (
                    f"CAM skipped for {ex.label}: its last feature map is 1 x 1 (the FusionNet head pools "
                    "it down before global average pooling), so a class activation map has no extent"
                )
                result["skipped"].append(entry["cam"])
                log(entry["cam"])
            else:
                cam = class_activation_maps(ex.model, xin, target.long(), ex.chip_px).cpu().numpy()
                entry["cam"] = f"{side[0]} x {side[1]} map upsampled to {ex.chip_px} x {ex.chip_px}"
        cams.append(cam)
        overlays.append(x[:, ex.overlay, 0].cpu().numpy())  # first date of the overlay band
        if tsne:
            entry["tsne"] = _tsne_or_skip(feats, seed, perplexity, ex.label, result["skipped"], log)
        result["models"].append(entry)

    with_cam = [i for i, c in enumerate(cams) if c is not None]
    if with_cam:
        np.savez_compressed(out / "cam.npz", cams=np.stack([cams[i] for i in with_cam]),
                            chips=np.stack([overlays[i] for i in with_cam]), sites=np.array(result["cam"]["sites"]),
                            labels=labels[picks], models=np.array([models[i].label for i in with_cam]))  # fmt: skip
        result["files"]["cam_npz"] = str(out / "cam.npz")
    result["files"].update(_figures(result, cams, overlays, out, log))
    write_text_atomic(out / "explain.json", to_json(result))
    result["files"]["json"] = str(out / "explain.json")
    return result


def _tsne_or_skip(feats, seed, perplexity, label, skipped: list, log) -> list | None:
    reason = sklearn_status()
    if reason is None and len(feats) < 4:
        reason = f"t-SNE skipped for {label}: it needs at least 4 sites, got {len(feats)}"
    if reason is not None:
        if reason not in skipped:
            skipped.append(reason)
            log(reason)
        return None
    return tsne_embedding(feats, seed, perplexity).round(4).tolist()


def _figures(result, cams, overlays, out: Path, log) -> dict[str, str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        msg = "figures skipped: cam.png and tsne.png need matplotlib: pip install 'fusionkern[experiments]'"
        result["skipped"].append(msg)
        log(msg)
        return {}
    files = {}
    if any(c is not None for c in cams):
        files["cam"] = str(_save(_cam_figure(Figure, result, cams, overlays), out / "cam.png"))
    if any(m.get("tsne") for m in result["models"]):
        files["tsne"] = str(_save(_tsne_figure(Figure, result), out / "tsne.png"))
    return files


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def _cam_figure(Figure, result, cams, overlays):
    keep = [i for i, c in enumerate(cams) if c is not None]
    models = [result["models"][i] for i in keep]
    cams, overlays = [cams[i] for i in keep], [overlays[i] for i in keep]
    n_rows, n_cols = len(result["cam"]["sites"]), 1 + len(models)
    fig = Figure(figsize=(2.0 * n_cols, 2.1 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    keys = result["cam"]["sites"]
    for i in range(n_rows):
        ax = axes[i, 0]
        ax.imshow(overlays[0][i], cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(f"{keys[i]}", fontsize=6)
        if i == 0:
            band = models[0]["overlay_branch"]
            ax.set_title(f"{BAND_LABELS.get(band, band)}, first date", fontsize=8)
        for j, m in enumerate(models):
            ax = axes[i, j + 1]
            ax.imshow(overlays[j][i], cmap="gray", vmin=0, vmax=1)
            ax.imshow(cams[j][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            pos = result["sites"]["keys"].index(keys[i])
            p = m["probabilities"][pos]
            pred = int(np.argmax(p))
            cls = CLASSES[m["cam_classes"][i]]
            ax.set_xlabel(f"pred {CLASSES[pred]} {p[pred]:.2f}; CAM {cls}", fontsize=6)
            if i == 0:
                ax.set_title(m["label"], fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"Class activation maps ({result['cam']['class']} class), rows: site (true class/name)", fontsize=9)
    return fig


def _tsne_figure(Figure, result):
    models = [m for m in result["models"] if m.get("tsne")]
    labels = np.asarray(result["sites"]["labels"])
    fig = Figure(figsize=(4.2 * len(models), 4.4), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, m in zip(axes, models):
        xy = np.asarray(m["tsne"])
        for c, colour in ((1, LANDCOVER_COLOUR), (0, CEMENT_COLOUR)):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=12, c=colour, label=CLASSES[c], alpha=0.85, edgecolors="none")
        ax.set_title(f"{m['label']} t-SNE (acc. {100 * m['accuracy']:.1f} %)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, markerscale=1.5)
    return fig


__all__ = [
    "CAM_CLASSES", "class_activation_maps", "describe", "feature_map", "run_explain", "sklearn_status",
    "tsne_embedding",
]  # fmt: skip
