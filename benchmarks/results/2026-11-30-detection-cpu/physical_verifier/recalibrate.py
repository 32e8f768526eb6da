"""Re-calibrate a copy of a make-demo checkpoint on the demo's two calibration regions at another budget and/or
with another verifier. Usage: recal.py DEMO OUT BUDGET VERIFY"""
import json, shutil, sys
from pathlib import Path
from fusionkern.data.chips import read_plants
from fusionkern.scan.calibrate import CalibrateOptions, calibrate

demo, out, budget, verify = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
src = json.loads((demo / "train" / "metrics.json").read_text())
best = max(src["splits"], key=lambda r: r["val"]["accuracy"])["checkpoint"]
out.mkdir(parents=True, exist_ok=True)
ck = out / "best.pt"
shutil.copy(best, ck)
regions = sorted((demo / "regions").glob("calibrate-*"))
plants = [p for r in regions for p in read_plants(r / "truth.geojson")]
rec = calibrate(CalibrateOptions(checkpoint=str(ck), out=str(out / "calibration"), plants=plants, budget=budget,
                                 manifest=[str(next(r.glob("*.yaml"))) for r in regions], verify=verify,
                                 overwrite=True, progress=False), log=print)
print(json.dumps({k: rec.get(k) for k in ("region", "plain", "verified")}, default=str)[:2000])
