"""Paper Table III: FusionNet with CNN5 branches against FusionNet with DGCNN branches.

**What a per-band column of Table III means.** FusionNet fuses five inputs, so a model trained on the five
co-registered inputs of each site has one accuracy, not one per band; yet Table III reports FusionNet per band
(Band 11 ... Band 7:6). The paper's text does not say how, but the authors' public training code does: its fusion
loop feeds the same single-band image to all five branches. A Table III column "Band 7" is therefore FusionNet
trained and tested with the Band 7 chip of each site in every one of its five branches. This module reproduces
those columns as they were produced (``inputs="per-band"``; rows keep the paper's names), so that they can be set
beside the paper's figures. It also runs what the paper's method section describes and its tables do not report:
FusionNet on the five co-registered inputs of each site (the ``Fused`` column, ``inputs="fused"``), which is how
:func:`fusionkern.train.run_training` trains it. ``inputs="both"`` (the default) gives the paper's five columns and
the fused one; ``--quick`` runs the fused column only unless told otherwise.

Every cell is trained per stratified split with the paper's protocol (:func:`fusionkern.train.train_split`); the
table gives the mean and spread of test accuracy over the splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from fusionkern import BRANCHES
from fusionkern.errors import ConfigError
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

BACKBONES = ("cnn5", "dgcnn")
"""FusionNet branch networks, in the paper's row order."""

INPUTS = ("fused", "per-band", "both")

FUSED = Axis("fused", "Fused (all five)")
"""The column of FusionNet on the five co-registered inputs of each site."""

PAPER_TABLE_III = {
    "fusionnet-cnn5": {"b11": 83.1, "b10": 82.9, "b7": 87.4, "b6": 86.8, "b76": 87.8},
    "fusionnet-dgcnn": {"b11": 86.9, "b10": 85.7, "b7": 89.6, "b6": 88.4, "b76": 90.6},
}
"""The paper's Table III: mean test accuracy (%) over five splits, per band (one band in all five branches)."""

TITLE = "Table III: FusionNet with CNN5 branches against DGCNN branches"


class ReplicatedBranch(Dataset):
    """One band's chips in all five FusionNet branches: items (5, 3, S, S) from a one-branch dataset's (1, 3, S, S).

    This is how the authors' code trained FusionNet per band (Table III's columns).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def labels(self):
        """The class of every item, as the wrapped dataset gives them."""
        return self.dataset.labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[index]
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"ReplicatedBranch needs one-branch items (1, 3, S, S), got {tuple(x.shape)}")
        return x.repeat(len(BRANCHES), 1, 1, 1), y


def row_key(backbone: str) -> str:
    return f"fusionnet-{backbone}"


def run_fusion(
    settings: ExperimentSettings,
    backbones: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
    inputs: str | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the Table III grid and write its report to ``settings.out``.

    Args:
        settings: Training settings and folders (``settings.resume`` continues an interrupted run).
        backbones: Rows, default ``("cnn5", "dgcnn")``.
        bands: The per-band columns, default all five in the paper's order.
        inputs: ``"fused"``, ``"per-band"`` or ``"both"``; default ``"both"``, or ``"fused"`` with ``--quick``.
        log: Progress lines.

    Returns:
        The result (what ``results.json`` holds).
    """
    from fusionkern.experiments.report import write_report
    from fusionkern.train import resolve_device, train_split

    inputs = inputs or ("fused" if settings.quick else "both")
    if inputs not in INPUTS:
        raise ConfigError(f"--inputs: unknown {inputs!r}; choose one of {', '.join(INPUTS)}")
    backbones = [b for b in BACKBONES if b in set(backbones or BACKBONES)]
    bands = [b for b in PAPER_BAND_ORDER if b in set(bands or PAPER_BAND_ORDER)] if inputs != "fused" else []
    device = resolve_device(settings.device)
    data = load_data(settings, BRANCHES if inputs != "per-band" else bands, log)
    store = CellStore(settings.out, "fusion", {**settings.fingerprint(), "dataset": data.identity},
                      resume=settings.resume, overwrite=settings.overwrite)  # fmt: skip
    rows = [Axis(row_key(b), f"FusionNet ({b.upper()} branches)") for b in backbones]
    columns = [Axis(b, BAND_LABELS[b]) for b in bands] + ([FUSED] if inputs != "per-band" else [])

    def train(row: Axis, column: Axis, split, index: int, split_dir: Path) -> dict:
        backbone = row.key.split("-", 1)[1]
        cfg = settings.train_config(model="fusionnet", backbone=backbone, out=str(split_dir.parent))
        seed = split.seed if settings.augment else None
        extra: dict[str, Any] = {"dataset": str(settings.data), "experiment": "fusion"}
        if column.key == FUSED.key:
            train_ds, eval_ds = data.view(BRANCHES, seed), data.view(BRANCHES, None)
        else:
            train_ds = ReplicatedBranch(data.view([column.key], seed))
            eval_ds = ReplicatedBranch(data.view([column.key], None))
            extra["replicated_branch"] = column.key
        return train_split(cfg, train_ds, eval_ds, split, index, split_dir, device, log, checkpoint_data=extra)

    notes = []
    if bands:
        notes.append("Per-band columns: FusionNet with that band's chip in all five branches, as the authors' code "
                     "trained it for the paper's Table III.")  # fmt: skip
    if inputs != "per-band":
        notes.append("Fused column: FusionNet on the five co-registered inputs of each site (b10, b11, b7, b6, b76); "
                     "the paper's tables have no such column.")  # fmt: skip

    def result_of(records) -> dict[str, Any]:
        return assemble("fusion", TITLE, settings, data, rows, columns, records, notes=notes,
                        paper={"source": "Table III", "metric": "accuracy", "values": PAPER_TABLE_III},
                        extra={"inputs": inputs})  # fmt: skip

    records = run_grid(store, rows, columns, data.splits, train, log=log,
                       on_cell=lambda recs: write_report(result_of(recs), settings.out, figures=False))  # fmt: skip
    result = result_of(records)
    result["files"] = write_report(result, settings.out, log=log)
    return result


__all__ = ["BACKBONES", "FUSED", "INPUTS", "PAPER_TABLE_III", "ReplicatedBranch", "run_fusion"]
