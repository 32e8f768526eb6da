"""Paper Table II: the ablation ladder of single-input models on each band.

Rows are CNN5, MPCNN5 (mixed pooling), GCNN5 (trainable Gabor first layer), DCNN5 (averaged dilated block) and DGCNN
(all three); columns are Band 11, Band 10, Band 7, Band 6 and Band 7:6, in the paper's order. Every cell is a
single-input model trained on that band's three-date chips with the paper's protocol (:func:`fusionkern.train.
train_split`: Adam, cross-entropy weighted [3, 1], augmentation, best-on-validation checkpoint), once per
stratified split; the table gives the mean and spread of test accuracy over the splits (the paper: five).

The paper's own sites differ per band (Table I: 899 cement chips and 2,124 to 3,069 landcover chips depending on the
band). Here every band is read from the same sites, so the columns differ only by the band.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

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

MODELS = ("cnn5", "mpcnn5", "gcnn5", "dcnn5", "dgcnn")
"""The ablation ladder, in the paper's row order."""

MODEL_LABELS = {"cnn5": "CNN5", "mpcnn5": "MPCNN5", "gcnn5": "GCNN5", "dcnn5": "DCNN5", "dgcnn": "DGCNN"}

PAPER_TABLE_II = {
    "cnn5": {"b11": 79.5, "b10": 76.9, "b7": 82.6, "b6": 82.3, "b76": 83.3},
    "mpcnn5": {"b11": 80.7, "b10": 77.6, "b7": 82.8, "b6": 83.2, "b76": 84.4},
    "gcnn5": {"b11": 82.5, "b10": 80.7, "b7": 85.8, "b6": 84.4, "b76": 85.4},
    "dcnn5": {"b11": 83.6, "b10": 81.9, "b7": 86.4, "b6": 85.6, "b76": 86.9},
    "dgcnn": {"b11": 84.2, "b10": 83.6, "b7": 87.7, "b6": 86.2, "b76": 88.7},
}
"""The paper's Table II: mean test accuracy (%) over five splits."""

TITLE = "Table II: ablation of the proposed layers, single-input models per band"


def run_ablation(
    settings: ExperimentSettings,
    models: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
    *,
    explain: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the ablation grid (or the ``models`` x ``bands`` part of it) and write its report to ``settings.out``.

    Args:
        settings: Training settings and folders (``settings.resume`` continues an interrupted run).
        models: Rows, default :data:`MODELS`.
        bands: Columns, default all five in the paper's order.
        explain: Afterwards, CAMs and t-SNE of CNN5 against DGCNN (split 0 of the Band 7:6 column, or of the last
            column run) in ``<out>/explain`` (needs both models in ``models``).
        log: Progress lines.

    Returns:
        The result (what ``results.json`` holds): settings, axes, every split's metrics of every cell, summaries,
        the paper's figures and the files written.
    """
    from fusionkern.experiments.report import write_report
    from fusionkern.train import resolve_device, train_split

    models = [m for m in MODELS if m in set(models or MODELS)]
    bands = [b for b in PAPER_BAND_ORDER if b in set(bands or PAPER_BAND_ORDER)]
    device = resolve_device(settings.device)
    data = load_data(settings, bands, log)
    store = CellStore(settings.out, "ablation", {**settings.fingerprint(), "dataset": data.identity},
                      resume=settings.resume, overwrite=settings.overwrite)  # fmt: skip
    rows = [Axis(m, MODEL_LABELS[m]) for m in models]
    columns = [Axis(b, BAND_LABELS[b]) for b in bands]

    def train(row: Axis, column: Axis, split, index: int, split_dir: Path) -> dict:
        cfg = settings.train_config(model=row.key, branch=column.key, out=str(split_dir.parent))
        train_ds = data.view([column.key], split.seed if settings.augment else None)
        eval_ds = data.view([column.key], None)
        return train_split(cfg, train_ds, eval_ds, split, index, split_dir, device, log,
                           checkpoint_data={"dataset": str(settings.data), "experiment": "ablation"})  # fmt: skip

    def result_of(records) -> dict[str, Any]:
        return assemble("ablation", TITLE, settings, data, rows, columns, records,
                        paper={"source": "Table II", "metric": "accuracy", "values": PAPER_TABLE_II})  # fmt: skip

    records = run_grid(store, rows, columns, data.splits, train, log=log,
                       on_cell=lambda recs: write_report(result_of(recs), settings.out, figures=False))  # fmt: skip
    result = result_of(records)
    if explain:
        result["explain"] = _explain_cnn5_vs_dgcnn(settings, models, bands, log)
    files = write_report(result, settings.out, log=log)
    files.update({f"explain_{k}": v for k, v in result.get("explain", {}).get("files", {}).items()})
    result["files"] = files
    return result


def _explain_cnn5_vs_dgcnn(settings: ExperimentSettings, models: Sequence[str], bands: Sequence[str], log) -> dict:
    from fusionkern.experiments.explain import run_explain
    from fusionkern.experiments.resume import CELLS_DIR

    if not {"cnn5", "dgcnn"} <= set(models):
        log("explain skipped: it compares CNN5 with DGCNN, and both must be among --models")
        return {"skipped": "CNN5 and DGCNN must both be trained"}
    band = "b76" if "b76" in bands else bands[-1]
    root = Path(settings.out) / CELLS_DIR
    checkpoints = [root / m / band / "split_0" / "best.pt" for m in ("cnn5", "dgcnn")]
    return run_explain(checkpoints, settings.data, Path(settings.out) / "explain", device=settings.device,
                   seed=settings.seed, log=log)  # fmt: skip


__all__ = ["MODELS", "MODEL_LABELS", "PAPER_TABLE_II", "run_ablation"]
