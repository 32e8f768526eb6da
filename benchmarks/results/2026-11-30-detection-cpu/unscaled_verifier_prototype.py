"""Prototype, measured at region level: the verifier's ensemble log-odds plus those of a small CNN on un-scaled bands.

Not part of the package; the inputs and the CNN are those of ``sensor_ceiling.py`` beside it. Three steps:

    python unscaled_verifier_prototype.py train DRAWN DEMO EPOCHS OUT.pt
    python unscaled_verifier_prototype.py eval DRAWN PHYS.pt      (industry pass rate at 90 % cement recall)
    python unscaled_verifier_prototype.py scan DEMO PHYS.pt|none WORK [BUDGET] [alone]
        (none: the ensemble alone; alone: the CNN alone, without the ensemble's log-odds)

``DRAWN`` is the WORKDIR of ``sensor_ceiling.py`` (its cement-train and industry-train sites), ``DEMO`` a ``make demo``
output folder. ``train`` fits the CNN on cement (the drawn 1000 and the demo's 200) against everything else (the
drawn 1000 works of other heavy industry, the demo's 400 landcover sites and 600 mined chips), class-weighted, with
shifts, quarter turns and flips. ``scan`` copies the demo's checkpoints to WORK, replaces ``Verifier.score`` for
this process only (the ensemble's mean log-odds plus the CNN's cement log-odds averaged over four quarter turns,
read from the same re-centred chips without the min-max scaling), calibrates on the demo's two calibration regions
as ``make demo`` does and runs ``detection_quality.py`` on the demo region and the four held-out regions.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sensor_ceiling import network, physics  # the same inputs and CNN (this folder)

HERE = Path(__file__).resolve()


def train(drawn: Path, demo: Path, epochs: int, out: Path) -> None:
    from fusionkern.data.dataset import read_image
    from fusionkern.data.layouts import load_sites

    def sites(folder, label, both=True):
        return [s for s in load_sites(folder, both_classes=both)[0] if s.label == label]

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pos = sites(drawn / "cement-train", 0) + sites(demo / "data", 0)
    neg = sites(drawn / "industry-train", 1) + sites(demo / "data", 1) + sites(demo / "mined-r1", 1, False)
    raw = np.stack([np.stack([read_image(s.paths[b]) for b in ("b10", "b11", "b7", "b6")]) for s in pos + neg])
    X, Y = physics(raw), torch.tensor([0] * len(pos) + [1] * len(neg))  # class 0 = cement, as FusionNet's
    weight = torch.tensor([len(neg) / len(pos), 1.0])
    model = network()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(X)), 0.0
        for start in range(0, len(X) - 1, 32):
            idx = order[start:start + 32]
            batch = []
            for i in idx:
                r, c = rng.integers(0, X.shape[-1] - 35 + 1, 2)
                x = torch.rot90(X[i, :, r:r + 35, c:c + 35], int(rng.integers(4)), (1, 2))
                batch.append(x.flip(2) if rng.random() < 0.5 else x)
            loss = nn.functional.cross_entropy(model(torch.stack(batch)), Y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch}: loss {total / len(X):.4f}", flush=True)
    torch.save(model.state_dict(), out)


def evaluate(drawn: Path, weights: Path) -> None:
    """The industry pass rate at 90 % cement recall on sensor_ceiling.py's held-out sites (centred chips)."""
    from fusionkern.data.dataset import read_image
    from fusionkern.data.layouts import load_sites

    model = network()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    cement = [s for s in load_sites(drawn / "cement-test")[0] if s.label == 0]
    industry = [s for s in load_sites(drawn / "industry-test")[0] if s.label == 1]
    raw = np.stack([np.stack([read_image(s.paths[b]) for b in ("b10", "b11", "b7", "b6")])
                    for s in cement + industry])
    margin = (raw.shape[-1] - 35) // 2
    with torch.no_grad():
        logits = model(physics(raw[..., margin:margin + 35, margin:margin + 35]))
    score = (logits[:, 0] - logits[:, 1]).numpy()
    threshold = np.quantile(score[:len(cement)], 0.1)
    print(f"industry pass rate at 90 % cement recall: {(score[len(cement):] >= threshold).mean():.4f}")


def scan(demo: Path, weights: Path | None, work: Path, budget: float = 0.5, alone: bool = False) -> None:
    import fusionkern.scan.decide as decide
    import fusionkern.scan.tiles as tiles
    from fusionkern.scan.calibrate import CalibrateOptions, calibrate
    from fusionkern.scan_demo import make_demo_region, region_truth

    phys = network()
    if weights is not None:
        phys.load_state_dict(torch.load(weights, weights_only=True))
    phys.eval()

    def score(self, inputs, grid, layout, points, shift=0.0):
        chips, valid = decide.read_recentred(inputs, grid, layout, points)
        scaled = tiles.scale_chips
        tiles.scale_chips = lambda c: c  # the same chips, unscaled
        try:
            raw, _ = decide.read_recentred(inputs, grid, layout, points)
        finally:
            tiles.scale_chips = scaled
        out = np.full(len(points), np.nan)
        if valid.any():
            f = physics(raw[valid][:, :4])
            with torch.no_grad():
                turns = [phys(torch.rot90(f, k, (-2, -1))) for k in range(4)]
                unscaled = torch.stack([t[:, 0] - t[:, 1] for t in turns]).mean(0).double().numpy()
            ensemble = 0.0 if alone else self.log_odds(chips[valid])
            out[valid] = decide.sigmoid(ensemble + unscaled + shift)
        return out, valid

    if weights is not None:
        decide.Verifier.score = score
    if not (work / "train").exists():
        shutil.copytree(demo / "train", work / "train")
    checkpoint = str(work / "train" / "split_1" / "best.pt")
    regions = [make_demo_region(work / "regions" / f"calibrate-{s}", 2048, 12, n_confusers=32, seed=s,
                                east_km=300.0 * k) for k, s in enumerate((202, 203))]
    record = calibrate(CalibrateOptions(
        checkpoint=checkpoint, out=str(work / "calibration"), plants=[p for r in regions for p in region_truth(r)],
        budget=budget, manifest=[str(r.manifest) for r in regions], verify="auto", overwrite=True, progress=False))
    print("calibration:", {m: (record[m]["threshold"], record[m]["found"], record[m]["false"])
                           for m in ("plain", "verified") if record.get(m)}, flush=True)
    spec = importlib.util.spec_from_file_location("dq", HERE.parents[2] / "detection_quality.py")
    dq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dq)
    dq.main([checkpoint, "--out", str(work / "dq"), "--modes", "verified", "--regions", "0:2048:32", "7:2048:32",
             "11:3072:64", "13:1536:96", "17:2048:16"])


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    elif sys.argv[1] == "eval":
        evaluate(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        scan(Path(sys.argv[2]), None if sys.argv[3] == "none" else Path(sys.argv[3]), Path(sys.argv[4]),
             float(sys.argv[5]) if len(sys.argv) > 5 else 0.5, "alone" in sys.argv[6:])
