"""Chip-level industry pass rate of checkpoints, each fed chips scaled as it records (``data.scaling``): the
share of held-out works of other heavy industry scoring above the threshold that keeps 90 % of held-out cement
sites (lower is better). The test sites are those ``../sensor_ceiling.py`` drew (WORK/cement-test,
WORK/industry-test: 400 + 400 sites, seeds 923 and 924).

Usage: python industry_pass_rate.py WORK CHECKPOINT [CHECKPOINT ...]
"""

import sys
from pathlib import Path

import numpy as np
import torch

from fusionkern.data import SiteDataset
from fusionkern.data.layouts import load_sites
from fusionkern.data.transforms import scaling_name
from fusionkern.models import load_checkpoint
from fusionkern.train import model_inputs


def pass_rate(score: np.ndarray, label: np.ndarray, recall: float = 0.9) -> float:
    threshold = np.quantile(score[label == 1], 1.0 - recall)
    return float((score[label == 0] >= threshold).mean())


def main() -> int:
    work = Path(sys.argv[1])
    cement = [s for s in load_sites(work / "cement-test")[0] if s.label == 0]
    industry = [s for s in load_sites(work / "industry-test")[0] if s.label == 1]
    label = np.array([1] * len(cement) + [0] * len(industry))
    for path in sys.argv[2:]:
        model = load_checkpoint(path).eval()
        scaling = scaling_name(model.checkpoint["data"].get("scaling"))
        ds = SiteDataset(cement + industry, chip_size=35, scaling=scaling)
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            p = torch.cat([torch.softmax(model(model_inputs(model, xs[i:i + 64])), 1)[:, 0]
                           for i in range(0, len(xs), 64)]).numpy()
        print(f"{path} ({scaling}): industry pass rate {pass_rate(p, label):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
