"""The fault suite: every command a new user runs, against each fault they can hit.

Each case feeds one fault to one command (missing, truncated and foreign rasters; missing or malformed MTL;
scenes that do not overlap; read-only and full output folders; a malicious pickle; a foreign checkpoint; an
exported ONNX whose sidecar does not match; kill -9 at points of ``scan`` and ``train``, then the rerun) and
checks the three promises: exit status 2, one line ``error: ...`` naming the culprit, and nothing complete-looking
left behind (a killed run leaves no final output; a rerun completes).

The scenes are generated Level-1 products (uint16 DN, a minimal MTL, Landsat product names), so the suite needs
no shared data; kills happen at states (a number of finished tiles, a finished split) chosen by a seeded
generator, and every assertion holds whenever the kill lands, so the suite cannot flake on a slow machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkern import landsat, readers
from fusionkern.cli import main
from fusionkern.models import DGCNN, FusionNet, save_checkpoint
from fusionkern.scan import outputs as scan_outputs

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402

EPSG, X0, Y0, PX = 32650, 400_020.0, 3_500_010.0, 30.0
SIZE = 120  # 3.6 km square scenes
DATES = ("2017-03-08", "2017-04-09", "2017-05-11")
BAND_FILES = {10: "B10", 11: "B11", 7: "B7", 6: "B6"}
PLANTS_PX = [(30, 30), (30, 90), (90, 60)]  # (row, col) of the plants
CHIPS_ARGS = ["--chip-m", "300", "--landcover-km", "0.75", "--landcover-per-plant", "3"]
SCAN_FINALS = tuple(scan_outputs.FINAL_OUTPUTS)


# --------------------------------------------------------------------------------------------------------------
# Generated Level-1 scenes
# --------------------------------------------------------------------------------------------------------------


def product_id(date: int) -> str:
    day = DATES[date].replace("-", "")
    return f"LC08_L1TP_121040_{day}_{day}_01_T1"


def mtl_text(date: int) -> str:
    """A minimal Collection 1 MTL: the constants that DN calibration reads, with Landsat-8's typical values."""
    lines = ["GROUP = L1_METADATA_FILE", "  GROUP = PRODUCT_METADATA", f"    DATE_ACQUIRED = {DATES[date]}",
             "  END_GROUP = PRODUCT_METADATA", "  GROUP = IMAGE_ATTRIBUTES", "    SUN_ELEVATION = 55.0",
             "  END_GROUP = IMAGE_ATTRIBUTES", "  GROUP = RADIOMETRIC_RESCALING"]  # fmt: skip
    for band in (10, 11):
        lines += [f"    RADIANCE_MULT_BAND_{band} = 3.3420E-04", f"    RADIANCE_ADD_BAND_{band} = 0.10000"]
    for band in (6, 7):
        lines += [f"    REFLECTANCE_MULT_BAND_{band} = 2.0000E-05", f"    REFLECTANCE_ADD_BAND_{band} = -0.100000"]
    lines += ["  END_GROUP = RADIOMETRIC_RESCALING", "  GROUP = TIRS_THERMAL_CONSTANTS",
              "    K1_CONSTANT_BAND_10 = 774.8853", "    K2_CONSTANT_BAND_10 = 1321.0789",
              "    K1_CONSTANT_BAND_11 = 480.8883", "    K2_CONSTANT_BAND_11 = 1201.1442",
              "  END_GROUP = TIRS_THERMAL_CONSTANTS", "END_GROUP = L1_METADATA_FILE", "END"]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_scene(folder: Path, date: int, origin: tuple[float, float] = (X0, Y0)) -> Path:
    """One Level-1 scene folder: four uint16 DN bands (nodata 0) and the MTL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(date)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    profile = dict(driver="GTiff", dtype="uint16", count=1, width=SIZE, height=SIZE, crs=f"EPSG:{EPSG}",
                   transform=from_origin(*origin, PX, PX), nodata=0)  # fmt: skip
    for band, suffix in BAND_FILES.items():
        base = 28_000 if band in (10, 11) else 15_000
        dn = base + 20 * rows + 10 * cols + rng.integers(0, 50, (SIZE, SIZE)) + 100 * date
        with rasterio.open(folder / f"{product_id(date)}_{suffix}.TIF", "w", **profile) as dst:
            dst.write(dn.astype(np.uint16), 1)
    (folder / f"{product_id(date)}_MTL.txt").write_text(mtl_text(date))
    return folder


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    """Three good scene folders; cases copy them before breaking one."""
    root = tmp_path_factory.mktemp("scenes")
    return [write_scene(root / f"date{d + 1}", d) for d in range(3)]


@pytest.fixture
def broken(tmp_path, scenes):
    """Copies of the scenes, to break; returns (folders, the band file of each folder by band number)."""
    folders = [Path(shutil.copytree(s, tmp_path / "in" / s.name)) for s in scenes]

    def band_file(date: int, band: int) -> Path:
        return readers.find_band_file(folders[date], band)

    return folders, band_file


@pytest.fixture(scope="module")
def plants(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plants") / "plants.csv"
    transform = from_origin(X0, Y0, PX, PX)
    lines = ["name,lon,lat"]
    for index, (row, col) in enumerate(PLANTS_PX):
        x, y = transform * (col + 0.5, row + 0.5)
        (lon,), (lat,) = warp_transform(f"EPSG:{EPSG}", "EPSG:4326", [x], [y])
        lines.append(f"plant {index},{lon:.9f},{lat:.9f}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(FusionNet(preset="native", width=0.25), tmp_path_factory.mktemp("ckpt") / "native.pt")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint exported by ``fusionkern export`` (ONNX and sidecar)."""
    out = tmp_path_factory.mktemp("export") / "native.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--parity-sites", "16", "--no-real-chips"]) == 0
    return out


# --------------------------------------------------------------------------------------------------------------
# The three promises
# --------------------------------------------------------------------------------------------------------------


def one_line_error(code: int, err: str, *culprits: str) -> str:
    """Exit status 2 and exactly one line, ``error: ...``, naming every culprit given."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}, stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {lines[:20]}"
    for culprit in culprits:
        assert str(culprit) in lines[0], f"{culprit!r} not named in {lines[0]!r}"
    return lines[0]


def leftovers(folder: Path, before: set[str]) -> list[str]:
    """Paths under ``folder`` that were not there before (what a failed run left behind)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if str(p.relative_to(folder)) not in before)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def chips_argv(folders, plants: Path, out: Path, *extra: str) -> list[str]:
    return ["chips", "--scenes", *map(str, folders), "--plants", str(plants), "--out", str(out), *CHIPS_ARGS, *extra]


def scan_argv(model: Path, folders, out: Path, *extra: str) -> list[str]:
    return ["scan", str(model), "--scenes", *map(str, folders), "--out", str(out), "--no-progress", "--no-quicklook",
            "--no-checksums", *extra]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_limited(argv: list[str], file_limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a child whose files may not grow past ``file_limit`` bytes: writes fail as on a full disk
    (EFBIG; SIGXFSZ ignored so that the write returns the error instead of killing the process)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "fusionkern.cli", *argv], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, preexec_fn=limit, timeout=600)  # fmt: skip


@pytest.fixture
def read_only(tmp_path):
    """A folder marked read-only (no write bit: refused even where the tests run as root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


# --------------------------------------------------------------------------------------------------------------
# The good path the faults are measured against
# --------------------------------------------------------------------------------------------------------------


def test_generated_scenes_calibrate_to_physical_values(scenes):
    mtl = landsat.read_mtl(readers.find_mtl(scenes[0]))
    bt, _ = readers.read_scene_band(scenes[0], 10)
    rho, _ = readers.read_scene_band(scenes[0], 6)
    assert mtl["DATE_ACQUIRED"] == DATES[0]
    assert 280 < np.nanmin(bt) and np.nanmax(bt) < 320  # kelvin, not DN
    assert 0.05 < np.nanmin(rho) and np.nanmax(rho) < 0.6  # TOA reflectance


def test_chips_on_the_scenes_has_enough_sites_for_train(tmp_path, scenes, plants, capsys):
    code, out, err = cli(chips_argv(scenes, plants, tmp_path / "ds"), capsys)
    assert code == 0, err
    cement, landcover = map(int, re.search(r"wrote (\d+) cement and (\d+) landcover sites", out).groups())
    assert cement == 3 and landcover >= 3 and "warning" not in out
    assert f"calibration: {DATES[0]}: DN converted with {product_id(0)}_MTL.txt" in out
    assert oct((tmp_path / "ds").stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_scan_records_per_date_calibration(tmp_path, scenes, checkpoint, capsys):
    out = tmp_path / "scan"
    code, stdout, err = cli(scan_argv(checkpoint, scenes, out, "--stride", "610"), capsys)
    assert code == 0, err
    report = json.loads((out / "scan.json").read_text())
    calibration = report["inputs"]["calibration"]
    assert [d["date"] for d in calibration] == list(DATES)
    assert all(set(d["bands"].values()) == {"mtl"} for d in calibration)
    assert calibration[1]["mtl"].endswith(f"{product_id(1)}_MTL.txt")
    # --stride 610 m is not a whole number of 30 m pixels: said, and both values recorded.
    assert "--stride 610 m snapped to 600 m (20 px of 30 m)" in stdout
    assert report["chips"]["stride_m"] == 600 and report["chips"]["stride_m_requested"] == 610
    # The last row and column of chips overhang the rasters' edge (5 x 20 + 35 > 120 px): "outside", not
    # "nodata" (the scenes hold no nodata).
    skipped = report["counts"]["skipped"]
    assert skipped["outside"] > 0 and skipped["nodata"] == 0
    assert "chips/s over the whole run" in stdout


def test_no_calibrate_reads_level1_without_mtl(tmp_path, broken, plants, capsys):
    folders, _ = broken
    for folder in folders:
        readers.find_mtl(folder).unlink()
    code, out, err = cli(chips_argv(folders, plants, tmp_path / "ds", "--no-calibrate"), capsys)
    assert code == 0, err
    assert "values as stored" in out


def test_scan_takes_the_exported_onnx_with_its_sidecar(tmp_path, scenes, checkpoint, exported, capsys):
    reference = tmp_path / "torch"
    code, _, err = cli(scan_argv(checkpoint, scenes, reference), capsys)
    assert code == 0, err
    out = tmp_path / "onnx"
    code, _, err = cli(scan_argv(exported, scenes, out, "--backend", "onnxruntime"), capsys)
    assert code == 0, err
    report = json.loads((out / "scan.json").read_text())
    assert report["backend"]["onnx"] == str(exported) and report["checkpoint"]["class"] == "FusionNet"
    with rasterio.open(reference / "scores.tif") as a, rasterio.open(out / "scores.tif") as b:
        np.testing.assert_allclose(a.read(1), b.read(1), atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Faults of the inputs: chips and scan alike
# --------------------------------------------------------------------------------------------------------------


def _remove_b11(folders, band_file):
    band_file(1, 11).unlink()
    return str(folders[1]), "band 11"


def _truncate_b7(folders, band_file):
    path = band_file(2, 7)
    path.write_bytes(path.read_bytes()[:600])  # the header survives, the pixels do not
    return (str(path),)


def _foreign_b6(folders, band_file):
    path = band_file(0, 6)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return (str(path),)


def _drop_mtl(folders, band_file):
    readers.find_mtl(folders[2]).unlink()
    return str(folders[2]), "--no-calibrate"


def _garble_mtl(folders, band_file):
    mtl = readers.find_mtl(folders[1])
    mtl.write_text("this is not\x00an MTL file\n")
    return (str(mtl),)


def _move_far_away(folders, band_file):
    shutil.rmtree(folders[1])
    write_scene(folders[1], 1, origin=(X0 + 50_010.0, Y0))
    return (str(folders[1]), "does not overlap")


INPUT_FAULTS = {
    "missing raster": _remove_b11,
    "truncated raster": _truncate_b7,
    "foreign raster": _foreign_b6,
    "missing MTL": _drop_mtl,
    "malformed MTL": _garble_mtl,
    "non-overlapping scenes": _move_far_away,
}


@pytest.mark.parametrize("fault", INPUT_FAULTS)
def test_chips_input_fault(fault, tmp_path, broken, plants, capsys):
    folders, band_file = broken
    culprits = INPUT_FAULTS[fault](folders, band_file)
    before = listing(tmp_path)
    code, _, err = cli(chips_argv(folders, plants, tmp_path / "ds"), capsys)
    one_line_error(code, err, *culprits)
    assert leftovers(tmp_path, before) == []


@pytest.mark.parametrize("fault", INPUT_FAULTS)
def test_scan_input_fault(fault, tmp_path, broken, checkpoint, capsys):
    folders, band_file = broken
    culprits = INPUT_FAULTS[fault](folders, band_file)
    before = listing(tmp_path)
    code, _, err = cli(scan_argv(checkpoint, folders, tmp_path / "scan"), capsys)
    one_line_error(code, err, *culprits)
    assert leftovers(tmp_path, before) == []  # a scan that fails before its first tile leaves nothing


def test_scan_failing_at_its_first_tile_leaves_nothing_and_reruns(tmp_path, broken, checkpoint, capsys, monkeypatch):
    """The fault shows only when the pixels are read: the rerun after fixing it is not refused."""
    folders, band_file = broken
    good = band_file(0, 10).read_bytes()
    from fusionkern.scan import grid as scan_grid

    read = scan_grid.GridSource.read

    def failing_read(self, *args, **kwargs):
        if str(self.path).endswith("_B10.TIF") and "date1" in str(self.path):
            from fusionkern.errors import InputError

            raise InputError(f"cannot read raster {self.path}: TIFFReadEncodedTile() failed")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(scan_grid.GridSource, "read", failing_read)  # seen by reader threads, not processes
    out = tmp_path / "scan"
    code, _, err = cli(scan_argv(checkpoint, folders, out, "--readers", "threads"), capsys)
    one_line_error(code, err, str(band_file(0, 10)))
    assert not out.exists()
    monkeypatch.setattr(scan_grid.GridSource, "read", read)
    assert band_file(0, 10).read_bytes() == good
    code, _, err = cli(scan_argv(checkpoint, folders, out), capsys)
    assert code == 0, err


# --------------------------------------------------------------------------------------------------------------
# Faults of the output folder
# --------------------------------------------------------------------------------------------------------------


def test_chips_read_only_out(read_only, scenes, plants, capsys):
    code, _, err = cli(chips_argv(scenes, plants, read_only / "ds"), capsys)
    one_line_error(code, err, str(read_only))
    assert listing(read_only) == set()


def test_chips_overwrite_refuses_a_read_only_dataset(tmp_path, scenes, plants, capsys):
    out = tmp_path / "ds"
    assert cli(chips_argv(scenes, plants, out), capsys)[0] == 0
    before = listing(tmp_path)
    out.chmod(0o555)
    try:
        code, _, err = cli(chips_argv(scenes, plants, out, "--overwrite"), capsys)
    finally:
        out.chmod(0o755)
    one_line_error(code, err, str(out), "read-only")
    assert listing(tmp_path) == before


def test_scan_read_only_out(read_only, scenes, checkpoint, capsys):
    code, _, err = cli(scan_argv(checkpoint, scenes, read_only / "scan"), capsys)
    one_line_error(code, err, str(read_only))
    assert listing(read_only) == set()


def test_export_read_only_out(read_only, checkpoint, capsys):
    code, _, err = cli(["export", str(checkpoint), "--out", str(read_only / "m.onnx"), "--no-real-chips"], capsys)
    one_line_error(code, err, str(read_only))
    assert listing(read_only) == set()


@pytest.mark.parametrize("command", ["chips", "scan", "export"])
def test_full_output_folder(command, tmp_path, scenes, plants, checkpoint):
    """Writes fail (a file size limit stands in for a full disk): one line naming --out, nothing left behind."""
    out = tmp_path / "out"
    argv = {
        "chips": chips_argv(scenes, plants, out),  # the first chip GeoTIFF does not fit
        "scan": scan_argv(checkpoint, scenes, out),  # the scan's record of its parameters does not fit
        "export": ["export", str(checkpoint), "--out", str(out / "m.onnx"), "--parity-sites", "8", "--no-real-chips"],
    }[command]
    before = listing(tmp_path)
    result = run_limited(argv, 2_000, tmp_path)
    one_line_error(result.returncode, result.stderr, str(out))
    assert leftovers(tmp_path, before) == [] if command != "export" else [p for p in leftovers(tmp_path, before)
                                                                         if p != "out"] == []  # fmt: skip


def test_scan_disk_full_at_its_last_output(tmp_path, scenes, checkpoint, capsys, monkeypatch):
    """The disk fills while the outputs are written: no partial set of outputs; --resume finishes the scan."""
    import errno

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    out = tmp_path / "scan"
    monkeypatch.setattr(scan_outputs, "write_json", full)
    code, _, err = cli(scan_argv(checkpoint, scenes, out), capsys)
    one_line_error(code, err, str(out), "No space left on device")
    assert not [name for name in SCAN_FINALS if (out / name).exists()]
    assert list((out / ".tiles").glob("*.npz"))  # the finished tiles stay, for --resume
    monkeypatch.undo()
    code, _, err = cli([*scan_argv(checkpoint, scenes, out), "--resume"], capsys)
    assert code == 0, err
    assert all((out / name).exists() for name in ("scores.tif", "detections.geojson", "scan.json"))


# --------------------------------------------------------------------------------------------------------------
# Faults of the model file
# --------------------------------------------------------------------------------------------------------------


class _Payload:
    """Runs a command when unpickled: what a malicious checkpoint does to ``torch.load(weights_only=False)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "fusionkern-checkpoint", "version": 1, "model": _Payload(marker)}, path)
    return path, marker


@pytest.fixture
def foreign(tmp_path) -> Path:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, path)
    return path


@pytest.fixture
def other_model(tmp_path) -> Path:
    return save_checkpoint(DGCNN(preset="native", width=0.25), tmp_path / "dgcnn.pt")


@pytest.mark.parametrize("command", ["scan", "export"])
def test_malicious_pickle(command, tmp_path, malicious, scenes, capsys):
    path, marker = malicious
    argv = {"scan": scan_argv(path, scenes, tmp_path / "scan"),
            "export": ["export", str(path), "--out", str(tmp_path / "m.onnx"), "--no-real-chips"]}[command]  # fmt: skip
    before = listing(tmp_path)
    code, _, err = cli(argv, capsys)
    line = one_line_error(code, err, str(path))
    assert "weights_only" not in line  # never torch's advice to load it unsafely
    assert not marker.exists() and leftovers(tmp_path, before) == []


@pytest.mark.parametrize("which", ["foreign checkpoint", "another model's checkpoint", "ONNX given as checkpoint"])
def test_scan_foreign_model_file(which, tmp_path, foreign, other_model, exported, scenes, capsys):
    path = {"foreign checkpoint": foreign, "another model's checkpoint": other_model,
            "ONNX given as checkpoint": exported}[which]  # fmt: skip
    before = listing(tmp_path)
    line = one_line_error(*cli(scan_argv(path, scenes, tmp_path / "scan"), capsys)[::2], str(path))
    if which == "ONNX given as checkpoint":
        assert "--backend onnxruntime" in line
    assert leftovers(tmp_path, before) == []


def test_export_foreign_checkpoint(tmp_path, foreign, capsys):
    before = listing(tmp_path)
    code, _, err = cli(["export", str(foreign), "--out", str(tmp_path / "m.onnx"), "--no-real-chips"], capsys)
    one_line_error(code, err, str(foreign))
    assert leftovers(tmp_path, before) == []


@pytest.mark.parametrize("fault", ["changed model file", "no sidecar", "foreign sidecar"])
def test_scan_exported_onnx_not_matching_its_sidecar(fault, tmp_path, exported, scenes, capsys):
    model = Path(shutil.copy(exported, tmp_path / "model.onnx"))
    sidecar = tmp_path / "model.onnx.json"
    shutil.copy(exported.with_name(exported.name + ".json"), sidecar)
    if fault == "changed model file":
        data = bytearray(model.read_bytes())
        data[-100] ^= 0xFF  # one weight's byte
        model.write_bytes(bytes(data))
    elif fault == "no sidecar":
        sidecar.unlink()
    else:
        sidecar.write_text(json.dumps({"format": "something-else"}))
    before = listing(tmp_path)
    code, _, err = cli(scan_argv(model, scenes, tmp_path / "scan", "--backend", "onnxruntime"), capsys)
    one_line_error(code, err, str(model) if fault != "foreign sidecar" else str(sidecar))
    assert leftovers(tmp_path, before) == []


# --------------------------------------------------------------------------------------------------------------
# kill -9, then the rerun
# --------------------------------------------------------------------------------------------------------------


def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fusionkern.cli", *argv], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _kill_when(process: subprocess.Popen, ready, deadline_s: float = 300.0) -> bool:
    """SIGKILL once ``ready()`` holds (True), or let the process end first (False). Polls the file system: the
    kill point is a state of the run, not a moment, so a slow machine changes nothing."""
    give_up = time.monotonic() + deadline_s
    while process.poll() is None and time.monotonic() < give_up:
        if ready():
            process.kill()
            process.wait()
            return True
        time.sleep(0.02)
    process.wait()
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, scenes, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("scan-ref") / "scan"
    assert main(scan_argv(checkpoint, scenes, out, "--tile-px", "48")) == 0
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_scan_kill_9_then_resume(seed, tmp_path, scenes, checkpoint, uninterrupted):
    tiles = json.loads((uninterrupted / "scan.json").read_text())["engine"]["tiles"]
    after = int(np.random.default_rng(seed).integers(0, tiles))  # finished tiles at the kill
    out = tmp_path / "scan"
    argv = scan_argv(checkpoint, scenes, out, "--tile-px", "48")
    records = out / ".tiles"
    killed = _kill_when(_spawn(argv, tmp_path), lambda: records.is_dir() and len(list(records.glob("*.npz"))) >= after)
    if killed:  # nothing complete-looking: no final output, whatever the kill interrupted
        assert not [name for name in SCAN_FINALS if (out / name).exists()]
    resumed = subprocess.run([sys.executable, "-m", "fusionkern.cli", *argv, "--resume"], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("scores.tif", "detections.geojson", "detections.parquet"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_train_kill_9_then_rerun(tmp_path):
    from fusionkern.data import make_synthetic_sites

    data = tmp_path / "sites"
    make_synthetic_sites(data, n_cement=8, n_landcover=16, seed=3)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--preset", "native", "--width", "0.125", "--epochs", "2",
            "--batch-size", "8", "--splits", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    split = int(np.random.default_rng(0).integers(0, 2))  # finished splits at the kill
    killed = _kill_when(_spawn(argv, tmp_path), lambda: len(list(out.glob("split_*/best.pt"))) > split)
    if killed:  # a killed run leaves no report that looks like a finished one, and no half-written checkpoint
        assert not (out / "metrics.json").exists() and not (out / "report.md").exists()
        for best in out.glob("split_*/best.pt"):
            torch.load(best, weights_only=True)
    rerun = subprocess.run([sys.executable, "-m", "fusionkern.cli", *argv], cwd=tmp_path, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(json.loads((out / "metrics.json").read_text())["splits"]) == 2
