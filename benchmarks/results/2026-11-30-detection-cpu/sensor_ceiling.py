"""How much of the generator's cement / other-heavy-industry overlap the sensor lets any chip model resolve.

Draws fresh sites with the generator's own functions: cement sites as ``make_synthetic_sites`` draws them, and
landcover sites whose look-alike is always the generator's "other heavy industry" (``_add_confusers`` replaced, for
this script only, by its industry branch). Then, on held-out sites of both kinds, the share of industry sites that
pass a threshold keeping 90 % of the cement sites ("industry pass rate"):

- FusionNet as the scanner runs it (per-chip min-max scaled inputs): the checkpoints given, their probabilities
  averaged as the verifier's ensemble does (without its quarter turns);
- a small CNN trained here on the same bands without the min-max scaling: thermal bands as kelvin above the chip's
  median, SWIR reflectance and B7/B6 as they are, with shifts, quarter turns and flips;
- the oracle, which knows each works' kiln heat and dust (``fusionkern.scan_demo.expected_ceiling``).

Usage: python sensor_ceiling.py WORKDIR CHECKPOINT [CHECKPOINT ...] [--train N] [--test N] [--epochs E]
       [--train-data FOLDER ...]   (train the CNN on these site folders instead, e.g. the demo's data and mined chips)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fusionkern.data import synthetic
from fusionkern.data.dataset import SiteDataset, read_image
from fusionkern.data.layouts import load_sites
from fusionkern.models import load_checkpoint
from fusionkern.scan_demo import expected_ceiling
from fusionkern.train import model_inputs


def industry_only(rng, size, centre, surface):
    site = centre + rng.uniform(-6.0, 6.0, 2)
    synthetic._add_works(rng, size, site, surface, kiln_k=rng.uniform(3.0, 9.0), dust=rng.uniform(0.2, 0.7))


def draw(root: Path, n: int, industry: bool, seed: int) -> Path:
    if not (root / "sites.csv").exists():
        original = synthetic._add_confusers
        if industry:
            synthetic._add_confusers = industry_only
        try:  # one site of the other class: the writer wants both
            synthetic.make_synthetic_sites(root, n_cement=1 if industry else n, n_landcover=n if industry else 1,
                                           seed=seed, context_px=9)
        finally:
            synthetic._add_confusers = original
    return root


def sites_of(root: Path, label: int):
    return [s for s in load_sites(root)[0] if s.label == label]


def raw(sites) -> np.ndarray:
    return np.stack([np.stack([read_image(s.paths[b]) for b in ("b10", "b11", "b7", "b6")]) for s in sites])


def physics(x: np.ndarray) -> torch.Tensor:
    """(N, >=4, 3, S, S) raw b10, b11 (K), b7, b6 (reflectance) -> (N, 15, S, S): kelvin above each channel's
    median, reflectance and B7/B6, each brought near unit range by a fixed affine map."""
    thermal = x[:, :2] - np.median(x[:, :2], axis=(3, 4), keepdims=True)
    ratio = (x[:, 2] / np.maximum(x[:, 3], 1e-3))[:, None]
    f = np.concatenate([thermal / 5.0, x[:, 2:4] * 10.0 - 2.5, (ratio - 0.7) * 4.0], 1)
    return torch.tensor(f.reshape(len(x), 15, x.shape[-2], x.shape[-1]), dtype=torch.float32)


def network() -> nn.Module:
    """The small CNN on :func:`physics` inputs (about 60 k parameters)."""
    return nn.Sequential(
        nn.Conv2d(15, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def pass_rate(score: np.ndarray, label: np.ndarray, recall: float = 0.9) -> float:
    threshold = np.quantile(score[label == 1], 1.0 - recall)
    return float((score[label == 0] >= threshold).mean())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-data", nargs="+", help="site folders to train the CNN on (first: both classes)")
    a = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    work = Path(a.work)
    cem_tr = sites_of(draw(work / "cement-train", a.train, False, 921), 0)
    ind_tr = sites_of(draw(work / "industry-train", a.train, True, 922), 1)
    cem_te = sites_of(draw(work / "cement-test", a.test, False, 923), 0)
    ind_te = sites_of(draw(work / "industry-test", a.test, True, 924), 1)
    label = np.array([1] * len(cem_te) + [0] * len(ind_te))
    out = {"train_sites_per_kind": a.train, "test_sites_per_kind": a.test}

    ds = SiteDataset(cem_te + ind_te, chip_size=35)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    fusion = []
    for checkpoint in a.checkpoints:
        model = load_checkpoint(checkpoint)
        model.eval()
        with torch.no_grad():
            fusion.append(torch.cat([torch.softmax(model(model_inputs(model, xs[i:i + 64])), 1)[:, 0]
                                     for i in range(0, len(xs), 64)]).numpy())
        print(f"FusionNet (min-max scaled chips), {checkpoint}: industry pass rate {pass_rate(fusion[-1], label):.3f}",
              flush=True)
    out["fusionnet_checkpoints"] = a.checkpoints
    out["fusionnet_pass_rate_each"] = [pass_rate(f, label) for f in fusion]
    out["fusionnet_pass_rate"] = pass_rate(np.mean(fusion, axis=0), label)
    print(f"FusionNet ensemble: industry pass rate {out['fusionnet_pass_rate']:.3f}", flush=True)

    if a.train_data:
        given = [s for k, f in enumerate(a.train_data) for s in load_sites(f, both_classes=k == 0)[0]]
        cem_tr, ind_tr = [s for s in given if s.label == 0], [s for s in given if s.label == 1]
        out["train_data"] = {"folders": a.train_data, "cement": len(cem_tr), "landcover": len(ind_tr)}
    X = physics(raw(cem_tr + ind_tr))
    Y = torch.tensor([1] * len(cem_tr) + [0] * len(ind_tr))
    Xt = physics(raw(cem_te + ind_te))[:, :, 9:44, 9:44]
    net = network()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    rates = []
    for epoch in range(a.epochs):
        net.train()
        order = torch.randperm(len(X))
        for b in range(0, len(X) - 1, 32):
            idx = order[b:b + 32]
            batch = []
            for i in idx:
                r, c = rng.integers(0, 19, 2)
                x = torch.rot90(X[i, :, r:r + 35, c:c + 35], int(rng.integers(4)), (1, 2))
                batch.append(x.flip(2) if rng.random() < 0.5 else x)
            loss = nn.functional.cross_entropy(net(torch.stack(batch)), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            rates.append(pass_rate(torch.softmax(net(Xt), 1)[:, 1].numpy(), label))
        print(f"physics CNN epoch {epoch}: industry pass rate {rates[-1]:.3f}", flush=True)
    last = rates[-5:]
    out["physics_cnn_pass_rate_by_epoch"] = rates
    out["physics_cnn_pass_rate_last5"] = {"mean": float(np.mean(last)), "min": float(np.min(last)),
                                          "max": float(np.max(last))}
    out["oracle_pass_rate"] = expected_ceiling(12, 32)["industry_pass_rate"]
    for windows in (16, 32, 64, 96):
        n_i = 0.08 * windows
        out[f"expected_precision_12_plants_{windows}_windows"] = {
            k: 10.8 / (10.8 + r * n_i) for k, r in (("fusionnet", out["fusionnet_pass_rate"]),
                                                     ("physics_cnn", out["physics_cnn_pass_rate_last5"]["mean"]),
                                                     ("oracle", out["oracle_pass_rate"]))}
    (work / "sensor_ceiling.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "physics_cnn_pass_rate_by_epoch"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
