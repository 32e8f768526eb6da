"""A second stage on measured physics at scan candidates: does it separate cement from other hot industry?

For each scan folder (a region written by ``fusionkern.scan_demo.make_demo_region`` and its scan, as
``benchmarks/detection_quality.py`` and ``make demo`` leave them: ``region/`` and ``scan/``), the candidate sites are
the local maxima of ``scores.tif`` above 0.002, at least 6 stride cells apart; a site is cement when it lies within
600 m of a planted plant. At each site the raw rasters give a sustained thermal anomaly (b10 minus its median on a
ring 13-17 px out, per date; the minimum over dates smoothed 3 x 3 and its peak within 12 px, and the mean over
dates at that peak) and SWIR dust anomalies (B7/B6, B7 - B6 and B7 against the ring, within 3-5 px of the peak).
The chip score alone is compared with logistic regression and gradient boosting on the chip log-odds plus these
features, each region scored by a model fitted on the other regions (leave one region out); the threshold is the
pooled one that keeps 90 % of the plants.

Usage: python physics_second_stage.py SCAN_FOLDER [SCAN_FOLDER ...]
"""

import json
import os
import sys

import numpy as np
import rasterio
import yaml
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def load(folder):
    manifest = yaml.safe_load(open(f"{folder}/manifest.yaml"))
    return {b: np.stack([rasterio.open(f"{folder}/{f}").read(1) for f in manifest[b]]).astype(np.float64)
            for b in ("b10", "b11", "b7", "b6")}


def features(bands, row, col, R=17, inner=12):
    r0, c0 = int(round(row)), int(round(col))
    window = (slice(None), slice(r0 - R, r0 + R + 1), slice(c0 - R, c0 + R + 1))
    b10, b7, b6 = bands["b10"][window], bands["b7"][window], bands["b6"][window]
    y, x = np.mgrid[-R:R + 1, -R:R + 1]
    ring, inn = (y * y + x * x) >= 13 ** 2, (y * y + x * x) <= inner ** 2
    a10 = b10 - np.median(b10[:, ring], axis=1)[:, None, None]
    smooth = sliding_window_view(np.pad(a10.min(0), 1, mode="edge"), (3, 3)).mean((-1, -2))
    pr, pc = np.unravel_index(np.where(inn, smooth, -1e9).argmax(), smooth.shape)
    near = lambda r: ((y - (pr - R)) ** 2 + (x - (pc - R)) ** 2) <= r * r  # noqa: E731
    ratio = b7 / b6
    ratio_anomaly = (ratio - np.median(ratio[:, ring], axis=1)[:, None, None]).mean(0)
    diff = (b7 - b6).mean(0)
    b7m = b7.mean(0)
    return {"heat": smooth[inn].max(), "heatmean": a10.mean(0)[pr, pc], "dust5": ratio_anomaly[near(5)].mean(),
            "ddiff": (diff - np.median(diff[ring]))[near(4)].mean(), "b7a": (b7m - np.median(b7m[ring]))[near(4)].mean()}


def peaks(scores, threshold, radius=6):
    s, out = np.where(np.isfinite(scores), scores, 0).copy(), []
    while True:
        k = np.argmax(s)
        if s.flat[k] < threshold:
            return out
        i, j = np.unravel_index(k, s.shape)
        out.append((i, j, float(s.flat[k])))
        s[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1] = 0


def collect(folders):
    rows = []
    for folder in folders:
        name, region = os.path.basename(folder.rstrip("/")), f"{folder}/region"
        bands = load(region)
        plants = np.array([(f["properties"]["row"], f["properties"]["col"], f["properties"]["kind"] == "cement",
                            bool(f["properties"].get("industry")))
                           for f in json.load(open(f"{region}/truth.geojson"))["features"]], dtype=float)
        with rasterio.open(f"{folder}/scan/scores.tif") as ds:
            scores, to_xy = ds.read(1), ds.transform
        with rasterio.open(f"{region}/" + yaml.safe_load(open(f"{region}/manifest.yaml"))["b10"][0]) as ds:
            to_px, height, width = ~ds.transform, ds.height, ds.width
        for i, j, score in peaks(scores, 0.002):
            col, row = to_px * (to_xy * (j + 0.5, i + 0.5))
            if not (20 <= row < height - 20 and 20 <= col < width - 20):
                continue
            near = np.hypot(plants[:, 0] - row, plants[:, 1] - col) * 30 <= 600
            rows.append({**features(bands, row, col), "region": name, "score": score,
                         "cement": bool((near & (plants[:, 2] == 1)).any()),
                         "industry": bool((near & (plants[:, 3] == 1)).any())})
    return rows


def main(folders):
    rows = collect(folders)
    R = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    y, region = R["cement"].astype(int), R["region"]
    p = np.clip(R["score"], 1e-6, 1 - 1e-6)
    logodds = np.log(p / (1 - p))
    print(f"{len(y)} candidate sites, {y.sum()} of them plants, {R['industry'].sum()} other heavy industry")

    def leave_one_region_out(X, make):
        s = np.zeros(len(y))
        for g in np.unique(region):
            fit = region != g
            model = make().fit(X[fit], y[fit])
            s[~fit] = model.predict_proba(X[~fit])[:, 1]
        return s

    def report(name, s):
        order = np.argsort(-s)
        need = int(np.ceil(0.9 * y.sum()))
        k = np.searchsorted(np.cumsum(y[order]), need)
        threshold = s[order][k]
        per = []
        for g in np.unique(region):
            m = region == g
            tp, fp = int(((s >= threshold) & m & (y == 1)).sum()), int(((s >= threshold) & m & (y == 0)).sum())
            per.append(f"{g}: {tp}/{int((m & (y == 1)).sum())} found, precision {tp / max(1, tp + fp):.2f}")
        print(f"{name}: AUC {roc_auc_score(y, s):.3f}, pooled precision at 90 % recall {need / (k + 1):.3f}")
        print("    " + "; ".join(per))

    report("chip score alone", logodds)
    for feats in (["heatmean"], ["heatmean", "ddiff"], ["heatmean", "ddiff", "dust5"], ["heat", "heatmean", "ddiff", "b7a"]):
        X = np.stack([logodds] + [R[f] for f in feats], 1)
        report("logistic, chip log-odds + " + " + ".join(feats),
               leave_one_region_out(X, lambda: LogisticRegression(C=1.0, max_iter=5000)))
        report("boosting, chip log-odds + " + " + ".join(feats),
               leave_one_region_out(X, lambda: GradientBoostingClassifier(max_depth=2, n_estimators=80, random_state=0)))


if __name__ == "__main__":
    main(sys.argv[1:])
