"""The re-calibration recorded in README.md ("Calibrating on two regions together"), as it ran: the second demo
run's training folder copied to /tmp/d11/train, two calibration regions (seed 202 in place, seed 203 moved 300 km
east by rewriting its rasters' transform; `make_demo_region(east_km=...)` does the same since), one plants file
for both, and `fusionkern.scan.calibrate.calibrate` over the two manifests. Paths are those of that run."""

import json, sys
import rasterio
from rasterio.warp import transform as reproject_points
from fusionkern.scan_demo import make_demo_region, region_truth
from fusionkern.scan.calibrate import CalibrateOptions, calibrate
from fusionkern.data.chips import read_plants

def moved(region, metres):
    for path in sorted(region.manifest.parent.glob("*.tif")):
        with rasterio.open(path, "r+") as ds:
            ds.transform = ds.transform * ds.transform.__class__.translation(metres / ds.transform.a, 0)

if __name__ == "__main__":
    a = make_demo_region("/tmp/d11/regions/cal-202", 2048, 12, n_confusers=32, seed=202)
    b = make_demo_region("/tmp/d11/regions/cal-203", 2048, 12, n_confusers=32, seed=203)
    moved(b, 300_000.0)
    # plants of b at their new place
    feats = json.load(open(b.manifest.parent / "truth.geojson"))["features"]
    with rasterio.open(next(b.manifest.parent.glob("b10*.tif"))) as ds:
        t, crs = ds.transform, ds.crs
    lines = [f"{p.lon},{p.lat}" for p in read_plants(a.manifest.parent / "truth.geojson")]
    cem = [f["properties"] for f in feats if f["properties"]["kind"] == "cement"]
    xs, ys = zip(*(t * (p["col"], p["row"]) for p in cem))
    lons, lats = reproject_points(crs, "EPSG:4326", list(xs), list(ys))
    lines += [f"{x},{y}" for x, y in zip(lons, lats)]
    open("/tmp/d11/plants.csv", "w").write("lon,lat\n" + "\n".join(lines) + "\n")
    opts = CalibrateOptions(checkpoint="/tmp/d11/train/split_2/best.pt", out="/tmp/d11/calibration",
                            plants=read_plants("/tmp/d11/plants.csv"), budget=0.5,
                            manifest=[str(a.manifest), str(b.manifest)], verify="auto", overwrite=True, progress=False)
    rec = calibrate(opts, log=print)
    print(json.dumps({k: rec[k] for k in ("region", "plain", "verified")}, indent=1, default=str)[:3000])
