"""Classification metrics of the paper: accuracy, per-class accuracy, cement recall/precision/F1, confusion matrix.

Class 0 is cement and class 1 landcover (``fusionkern.CLASSES``). The confusion matrix is indexed
``[true, predicted]``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from fusionkern import CLASSES

SUMMARY_KEYS = ("accuracy", "cement_accuracy", "landcover_accuracy", "cement_recall", "cement_precision", "f1")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = len(CLASSES)) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Metrics of one evaluation. Undefined ratios (e.g. precision with no cement predicted) are NaN."""
    cm = confusion_matrix(y_true, y_pred)
    per_class = [_ratio(cm[c, c], cm[c].sum()) for c in range(len(CLASSES))]
    recall = per_class[0]
    precision = _ratio(cm[0, 0], cm[:, 0].sum())
    f1 = _ratio(2 * precision * recall, precision + recall) if not (math.isnan(precision) or math.isnan(recall)) \
        else float("nan")  # fmt: skip
    return {
        "n": int(cm.sum()),
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "cement_accuracy": per_class[0],
        "landcover_accuracy": per_class[1],
        "cement_recall": recall,
        "cement_precision": precision,
        "f1": f1,
        "confusion_matrix": cm.tolist(),
    }


def summarise(runs: Iterable[dict], keys: Sequence[str] = SUMMARY_KEYS) -> dict:
    """Mean and (population) standard deviation over splits of each metric; NaNs are left out of both."""
    runs = list(runs)
    out = {}
    for key in keys:
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[key] = {
            "mean": float(vals.mean()) if vals.size else float("nan"),
            "std": float(vals.std()) if vals.size else float("nan"),
            "n": int(vals.size),
        }
    return out
