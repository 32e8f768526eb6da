"""The paper's experiments on a user's dataset: tables, baselines, transfer learning, CAMs and t-SNE.

* :func:`run_ablation`: Table II, the single-input ablation ladder (CNN5 ... DGCNN) on each band.
* :func:`run_fusion`: Table III, FusionNet with CNN5 against DGCNN branches (see :mod:`.fusion` for what a
  per-band FusionNet column is).
* :func:`run_baselines`: VGG13, ResNet18, ResNet50, EfficientNet-B0 from scratch and ImageNet-pretrained with the
  paper's frozen-backbone protocol (torchvision, the ``baselines`` extra).
* :func:`run_explain`: class activation maps and t-SNE of checkpoints, e.g. CNN5 against DGCNN.

Each experiment trains a grid of (model, input, split) cells with the paper's protocol, records every finished
cell atomically (``--resume`` skips them) and writes ``table.md``, ``results.json`` and the PNG figures
(:mod:`.report`). ``ExperimentSettings(quick=True)`` is a smoke run in seconds per cell on a CPU.
"""

from fusionkern.experiments.core import QUICK, Axis, ExperimentSettings, load_data, run_grid
from fusionkern.experiments.resume import CellStore

__all__ = [
    "QUICK", "Axis", "CellStore", "ExperimentSettings", "load_data", "run_ablation", "run_baselines", "run_explain",
    "run_fusion", "run_grid",
]  # fmt: skip


def __getattr__(name: str):
    # The experiments import torch, the models and (for figures) matplotlib: loaded on first use.
    if name == "run_ablation":
        from fusionkern.experiments.ablation import run_ablation

        return run_ablation
    if name == "run_fusion":
        from fusionkern.experiments.fusion import run_fusion

        return run_fusion
    if name == "run_baselines":
        from fusionkern.experiments.baselines import run_baselines

        return run_baselines
    if name == "run_explain":
        from fusionkern.experiments.explain import run_explain

        return run_explain
    raise AttributeError(f"module 'fusionkern.experiments' has no attribute {name!r}")
