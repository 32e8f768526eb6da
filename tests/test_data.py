"""Labelled data: both layouts, the dataset's reading and scaling, augmentation, splits and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkern import BRANCHES
from fusionkern.data import (
    CLASS_WEIGHTS,
    AugmentParams,
    Site,
    SiteAugment,
    SiteDataset,
    load_sites,
    make_synthetic_sites,
    minmax_scale,
    physical_scale,
    read_authors_layout,
    read_image,
    read_site_layout,
    stratified_splits,
)
from fusionkern.data.layouts import branch_of, class_of
from fusionkern.errors import ConfigError, InputError

rasterio = pytest.importorskip("rasterio")
Image = pytest.importorskip("PIL.Image")

S = 35  # the authors' chip size


# ------------------------------------------------------------------------------------------------------------------
# Builders


def write_tif(path: Path, data: np.ndarray) -> Path:
    """A float32 GeoTIFF (one band per date) with NaN nodata on a 30 m UTM grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=np.float32)
    profile = dict(driver="GTiff", dtype="float32", count=data.shape[0], height=data.shape[1], width=data.shape[2])
    grid = dict(crs="EPSG:32650", transform=rasterio.transform.from_origin(500_000, 4_400_000, 30, 30))
    with rasterio.open(path, "w", nodata=float("nan"), **grid, **profile) as dst:
        dst.write(data)
    return path


def write_png(path: Path, data: np.ndarray, suffix: str = ".png") -> Path:
    """An 8-bit image from a (C, H, W) array (C = 3 for RGB, 1 for grayscale)."""
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(data, dtype=np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    image.save(path)
    return path


def random_chip(rng: np.random.Generator, size: tuple[int, int] = (S, S), low: float = 0.1, high: float = 1.0):
    return rng.uniform(low, high, (3, *size)).astype(np.float32)


def make_site_dir(
    root: Path, cls: str, name: str, rng: np.random.Generator, size=(S, S), with_b76=False
) -> dict[str, np.ndarray]:
    """One site folder of the site layout with random positive content; returns the arrays written."""
    branches = BRANCHES if with_b76 else BRANCHES[:4]
    arrays = {b: random_chip(rng, size) for b in branches}
    for branch, data in arrays.items():
        write_tif(root / cls / name / f"{branch}.tif", data)
    return arrays


@pytest.fixture
def site_root(tmp_path) -> Path:
    """Site layout: two cement sites (c1 with a b76 file), three landcover sites, and a sites.csv."""
    root, rng = tmp_path / "sites", np.random.default_rng(0)
    make_site_dir(root, "cement", "c1", rng, with_b76=True)
    make_site_dir(root, "cement", "c2", rng)
    for name in ("l1", "l2", "l3"):
        make_site_dir(root, "landcover", name, rng)
    (root / "sites.csv").write_text("site,label,lon,lat\nc1,cement,116.5,39.9\nl2,landcover,117.0,\n")
    return root


def one_site(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "s") -> Site:
    """A Site over GeoTIFFs written from ``arrays`` (keyed by branch)."""
    paths = {b: write_tif(tmp_path / name / f"{b}.tif", a) for b, a in arrays.items()}
    return Site(name, 0, paths)


# ------------------------------------------------------------------------------------------------------------------
# Layouts


def test_site_layout_reads_sites_paths_and_coordinates(site_root):
    sites = read_site_layout(site_root)
    assert [s.key for s in sites] == ["cement/c1", "cement/c2", "landcover/l1", "landcover/l2", "landcover/l3"]
    assert [s.label for s in sites] == [0, 0, 1, 1, 1]
    assert list(sites[0].paths) == list(BRANCHES)  # b76 file present
    assert list(sites[1].paths) == list(BRANCHES[:4])  # b76 absent: derived later
    assert (sites[0].lon, sites[0].lat) == (116.5, 39.9)
    assert (sites[3].lon, sites[3].lat) == (117.0, None)
    assert sites[1].lon is None


def test_site_layout_missing_band_names_site_and_band(site_root):
    (site_root / "landcover" / "l2" / "b11.tif").unlink()
    with pytest.raises(InputError, match=r"landcover/l2.*b11"):
        read_site_layout(site_root)


@pytest.mark.parametrize(
    "folder, branch",
    [("B10", "b10"), ("band11", "b11"), ("Band_7", "b7"), ("b06", "b6"), ("b7_6", "b76"), ("B76", "b76"),
     ("ratio", "b76"), ("Band 7:6", "b76"), ("b8", None), ("models", None)],
)  # fmt: skip
def test_branch_folder_aliases(folder, branch):
    assert branch_of(folder) == branch


@pytest.mark.parametrize("folder, label", [("Cement", 0), ("cement_plants", 0), ("Landcover", 1), ("land_cover", 1)])
def test_class_folder_aliases(folder, label):
    assert class_of(folder) == label


@pytest.fixture
def authors_root(tmp_path) -> Path:
    """Authors' layout with mixed folder spellings and formats, and chips that cannot all be joined.

    cement: a, b, c in every required band (c without b76); d only in b10 and b11.
    landcover: x, y in every band; z everywhere but b6.
    """
    root, rng = tmp_path / "authors", np.random.default_rng(1)
    folders = {"b10": "B10", "b11": "band11", "b7": "b7", "b6": "Band6", "b76": "b7_6"}
    classes = {"b10": ("Cement", "Landcover"), "b11": ("cement", "land_cover"), "b7": ("CEMENT", "landcover"),
               "b6": ("cement", "Landcover"), "b76": ("Cement", "Land_Cover")}  # fmt: skip
    members = {
        "b10": (["a", "b", "c", "d"], ["x", "y", "z"]),
        "b11": (["a", "b", "c", "d"], ["x", "y", "z"]),
        "b7": (["a", "b", "c"], ["x", "y", "z"]),
        "b6": (["a", "b", "c"], ["x", "y"]),
        "b76": (["a", "b"], ["x", "y", "z"]),
    }
    for branch, (cement, landcover) in members.items():
        for cls_folder, names in zip(classes[branch], (cement, landcover)):
            for i, name in enumerate(names):
                suffix = (".png", ".jpg", ".png")[i % 3]
                write_png(root / folders[branch] / cls_folder / name, rng.integers(0, 256, (3, S, S)), suffix)
    return root


def test_authors_layout_join_report_counts(authors_root):
    sites, report = read_authors_layout(authors_root)
    assert [s.key for s in sites] == ["cement/a", "cement/b", "cement/c", "landcover/x", "landcover/y"]
    assert report.joined == 5
    assert report.joined_per_class == {"cement": 3, "landcover": 2}
    assert report.unjoined == {"b10": ("d", "z"), "b11": ("d", "z"), "b7": ("z",), "b6": (), "b76": ("z",)}
    assert report.n_unjoined == 2
    assert report.derived_b76 == 1  # cement/c
    assert "b76" not in sites[2].paths and sites[0].paths["b76"].parent.name == "Cement"
    summary = report.summary()
    assert "Joined 5 sites (3 cement, 2 landcover)" in summary
    assert "2 names could not be joined" in summary and "b10 2" in summary


def test_authors_layout_name_under_both_classes(authors_root):
    write_png(authors_root / "b7" / "landcover" / "a", np.zeros((3, S, S)))
    with pytest.raises(InputError, match=r"'a'.*both cement and landcover"):
        read_authors_layout(authors_root)


def test_authors_layout_missing_band_folder(authors_root):
    (authors_root / "Band6").rename(authors_root / "unused")
    with pytest.raises(InputError, match=r"no folder for b6"):
        read_authors_layout(authors_root)


def test_load_sites_detects_each_layout(site_root, authors_root):
    sites, report = load_sites(site_root)
    assert len(sites) == 5 and report is None
    sites, report = load_sites(authors_root)
    assert len(sites) == 5 and report.joined == 5


def test_load_sites_rejects_other_folders(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match=r"expected the site layout .* or the authors' layout"):
        load_sites(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_sites(tmp_path / "absent")


def test_load_sites_empty_class_is_named(site_root):
    for name in ("l1", "l2", "l3"):
        for file in (site_root / "landcover" / name).iterdir():
            file.unlink()
        (site_root / "landcover" / name).rmdir()
    with pytest.raises(InputError, match="no landcover sites"):
        load_sites(site_root)


# ------------------------------------------------------------------------------------------------------------------
# Scaling


def test_minmax_scale_explicit_values():
    x = np.array(
        [
            [[0.0, 5.0], [10.0, 20.0]],  # plain range 0..20
            [[7.0, 7.0], [7.0, 7.0]],  # constant: all zero, no division by zero
            [[np.nan, 2.0], [4.0, 6.0]],  # NaN ignored for the range, then 0
            [[np.nan, np.nan], [np.nan, np.nan]],  # nothing valid: all zero
            [[np.inf, 1.0], [3.0, -np.inf]],  # infinities treated as nodata
        ]
    )
    expected = np.array(
        [
            [[0.0, 0.25], [0.5, 1.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.5, 1.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [1.0, 0.0]],
        ]
    )
    out = minmax_scale(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_minmax_scale_each_channel_spans_unit_interval():
    x = np.random.default_rng(0).normal(280.0, 5.0, (3, S, S))
    out = minmax_scale(x)
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0)


def test_physical_scale_explicit_values():
    thermal = np.array([
        [[300.0, 302.0, 310.0], [301.0, 299.0, 303.0]],  # median 301.5: kelvin above it, over 5 K
        [[np.nan, 290.0, 291.0], [292.0, np.inf, 295.0]],  # median of the finite pixels (291.5); others 0
        [[np.nan, np.nan, np.nan], [np.nan, np.nan, np.nan]],  # nothing valid: all zero
    ])  # fmt: skip
    out = physical_scale(thermal, "b10")
    np.testing.assert_allclose(out[0], (thermal[0] - 301.5) / 5.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], [[0.0, -0.3, -0.1], [0.1, 0.0, 0.7]], atol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(physical_scale(np.array([[0.25, 0.35], [0.15, np.nan]]), "b7"),
                               [[0.0, 1.0], [-1.0, 0.0]], atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(physical_scale(np.array([[0.7, 0.95]]), "b76"), [[0.0, 1.0]], atol=1e-6)
    with pytest.raises(ConfigError, match="b12"):
        physical_scale(thermal, "b12")


def test_physical_scaling_keeps_the_magnitude_minmax_drops():
    """A 3 K and a 9 K hot spot on the same background: min-max scaling makes them one chip, physical does not."""
    rng = np.random.default_rng(1)
    background = 290.0 + rng.normal(0.0, 0.3, (3, S, S))
    spot = np.zeros((S, S))
    spot[S // 2, S // 2] = 1.0
    weak, strong = background + 3.0 * spot, background + 9.0 * spot
    assert np.abs(minmax_scale(weak) - minmax_scale(strong)).max() < 0.5  # only the background's share moves
    weak_p, strong_p = physical_scale(weak, "b10"), physical_scale(strong, "b10")
    np.testing.assert_allclose(strong_p[:, S // 2, S // 2] - weak_p[:, S // 2, S // 2], 6.0 / 5.0, rtol=1e-4)


def test_dataset_scales_as_asked(site_root):
    sites = read_site_layout(site_root)
    x, _ = SiteDataset(sites, scaling="physical")[1]
    raw = {b: read_image(sites[1].paths[b]) for b in BRANCHES[:4]}
    for i, branch in enumerate(BRANCHES[:4]):
        np.testing.assert_allclose(x[i].numpy(), physical_scale(raw[branch], branch), atol=1e-5)
    np.testing.assert_allclose(x[4].numpy(), physical_scale(raw["b7"] / raw["b6"], "b76"), atol=1e-5)
    assert SiteDataset(sites, scaling="physical").single_branch("b7").scaling == "physical"
    with pytest.raises(ConfigError, match="scaling"):
        SiteDataset(sites, scaling="zscore")


# ------------------------------------------------------------------------------------------------------------------
# Dataset


def test_item_is_five_branches_in_order(site_root):
    sites = read_site_layout(site_root)
    ds = SiteDataset(sites)
    x, y = ds[1]  # cement/c2: no b76 file
    assert x.shape == (5, 3, S, S) and x.dtype == torch.float32  # (branches, dates, S, S)
    assert y == 0 and isinstance(y, int)
    raw = {b: read_image(sites[1].paths[b]) for b in BRANCHES[:4]}
    for i, branch in enumerate(BRANCHES[:4]):
        np.testing.assert_allclose(x[i].numpy(), minmax_scale(raw[branch]), atol=1e-6)
    np.testing.assert_allclose(x[4].numpy(), minmax_scale(raw["b7"] / raw["b6"]), atol=1e-6)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])


def test_b76_file_used_when_present(site_root):
    sites = read_site_layout(site_root)
    x, _ = SiteDataset(sites)[0]  # cement/c1 has b76.tif with content unrelated to b7 / b6
    np.testing.assert_allclose(x[4].numpy(), minmax_scale(read_image(sites[0].paths["b76"])), atol=1e-6)


def test_b76_derived_on_raw_values_with_guard(tmp_path):
    # minimal: 2 x 2 chips with explicit values
    b7 = np.array([[1.0, 2.0], [3.0, 4.0]])
    b6 = np.array([[1.0, 1.0], [0.0, 2.0]])  # b6 = 0 gives NaN, then 0 after scaling
    ones = np.ones((2, 2))
    arrays = {"b10": np.stack([ones * 280, ones, ones]), "b11": np.stack([ones] * 3),
              "b7": np.stack([b7, b7, -b7]), "b6": np.stack([b6, b6, np.where(b6 > 1, np.nan, b6)])}  # fmt: skip
    site = one_site(tmp_path, arrays)
    x, _ = SiteDataset([site], chip_size=2)[0]
    ratio = x[4].numpy()
    np.testing.assert_allclose(ratio[0], [[0.0, 1.0], [0.0, 1.0]])  # raw ratio [[1, 2], [nan, 2]]
    np.testing.assert_allclose(ratio[2], [[1.0, 0.0], [0.0, 0.0]])  # raw ratio [[-1, -2], [nan, nan]]
    np.testing.assert_allclose(x[0].numpy(), 0.0)  # constant channels
    assert not torch.isnan(x).any()


def test_centre_crop_of_larger_chip(tmp_path):
    # odd margins: 39 x 38 cut to the central 35 x 35
    rng = np.random.default_rng(2)
    arrays = {b: random_chip(rng, (39, 38)) for b in BRANCHES[:4]}
    x, _ = SiteDataset([one_site(tmp_path, arrays)])[0]
    np.testing.assert_allclose(x[0].numpy(), minmax_scale(arrays["b10"][:, 2:37, 1:36]), atol=1e-6)


def test_nan_pixels_become_zero(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {b: random_chip(rng) for b in BRANCHES[:4]}
    arrays["b11"][1, 10, 10] = np.nan
    x, _ = SiteDataset([one_site(tmp_path, arrays)])[0]
    assert x[1, 1, 10, 10] == 0.0 and not torch.isnan(x).any()
    assert x[1, 1].max() == 1.0


def test_all_nan_channel_names_site_and_file(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {b: random_chip(rng) for b in BRANCHES[:4]}
    arrays["b10"][1] = np.nan
    with pytest.raises(InputError, match=r"cement/s: b10 \(.*b10\.tif\) has no valid pixel in date channel 2"):
        SiteDataset([one_site(tmp_path, arrays)])[0]


def test_single_branch_items(site_root):
    sites = read_site_layout(site_root)
    full = SiteDataset(sites)
    ratio_only = SiteDataset(sites, branches=("b76",))
    assert ratio_only[1][0].shape == (1, 3, S, S)  # single-input models squeeze axis 0
    torch.testing.assert_close(ratio_only[1][0][0], full[1][0][4])
    view = full.single_branch("b10")
    assert view[2][0].shape == (1, 3, S, S) and view._cache is full._cache
    torch.testing.assert_close(view[2][0][0], full[2][0][0])


def test_cache_keeps_decoded_arrays(site_root):
    sites = read_site_layout(site_root)
    cached, uncached = SiteDataset(sites, cache=True), SiteDataset(sites, cache=False)
    first = cached[0][0]
    uncached[0]
    sites[0].paths["b10"].unlink()
    torch.testing.assert_close(cached[0][0], first)
    with pytest.raises(InputError, match="b10.tif"):
        uncached[0]


def test_augment_in_dataset_is_one_draw_for_all_branches(site_root):
    sites = read_site_layout(site_root)
    plain = SiteDataset(sites)
    augmented = SiteDataset(sites, augment=SiteAugment(seed=5))
    reference = SiteAugment(seed=5)
    for i in range(len(sites)):
        expected = reference.sample().apply(plain.load(i))
        np.testing.assert_array_equal(augmented[i][0].numpy(), expected)


def test_png_and_jpg_read_as_three_dates(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, (3, 12, 10))
    png = read_image(write_png(tmp_path / "chip", data))
    assert png.shape == (3, 12, 10) and png.dtype == np.float32
    np.testing.assert_array_equal(png, data)
    assert read_image(write_png(tmp_path / "chip", data, ".jpg")).shape == (3, 12, 10)


def test_grayscale_png_names_file(tmp_path):
    path = write_png(tmp_path / "gray", np.zeros((1, S, S)))
    with pytest.raises(InputError, match=r"gray\.png is a single-channel \(grayscale"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_truncated_image_names_file(tmp_path, suffix):
    if suffix == ".png":
        path = write_png(tmp_path / "chip", np.random.default_rng(7).integers(0, 256, (3, S, S)))
    else:
        path = write_tif(tmp_path / "chip.tif", random_chip(np.random.default_rng(7)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"cannot read .*chip\{suffix}"):
        read_image(path)


def test_sites_inputs_of_different_size_name_the_file(tmp_path):
    rng = np.random.default_rng(8)
    arrays = {b: random_chip(rng, (40, 40)) for b in BRANCHES[:4]}
    arrays["b7"] = random_chip(rng, (41, 40))
    with pytest.raises(InputError, match=r"b7\.tif is 41 x 40 px but .*b10\.tif is 40 x 40"):
        SiteDataset([one_site(tmp_path, arrays)])[0]


def test_chip_smaller_than_chip_size_names_file(tmp_path):
    arrays = {b: random_chip(np.random.default_rng(9), (30, 40)) for b in BRANCHES[:4]}
    with pytest.raises(InputError, match=r"b10\.tif is 30 x 40 px, smaller than the chip size 35 x 35"):
        SiteDataset([one_site(tmp_path, arrays)])[0]


def test_tiff_with_wrong_band_count_names_file(tmp_path):
    path = write_tif(tmp_path / "two.tif", np.ones((2, S, S)))
    with pytest.raises(InputError, match=r"two\.tif has 2 bands"):
        read_image(path)


@pytest.mark.parametrize("kwargs", [{"branches": ("b10", "b9")}, {"branches": ()}, {"chip_size": 0}])
def test_bad_dataset_options(kwargs):
    with pytest.raises(ConfigError):
        SiteDataset([], **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Augmentation

DIHEDRAL = [AugmentParams(k, h, v) for k in range(4) for h in (False, True) for v in (False, True)]


def matching_transforms(before: np.ndarray, after: np.ndarray) -> set[tuple]:
    """The distinct results among the 16 draws that map ``before`` to ``after`` (identified by their output)."""
    return {(p.k, p.hflip, p.vflip) for p in DIHEDRAL if np.array_equal(p.apply(before), after)}


@pytest.mark.parametrize("as_tensor", [False, True])
def test_augment_applies_one_transform_to_all_five_inputs(as_tensor):
    rng = np.random.default_rng(10)
    inputs = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)  # five distinct inputs
    augment = SiteAugment(seed=0)
    seen = set()
    for _ in range(40):
        out = augment(torch.from_numpy(inputs) if as_tensor else inputs)
        out = out.numpy() if as_tensor else out
        assert out.shape == inputs.shape
        first = matching_transforms(inputs[0], out[0])
        assert first, "output 0 is no rotation/flip of input 0"
        for i in range(1, 5):
            assert matching_transforms(inputs[i], out[i]) == first, f"input {i} got another transform than input 0"
        seen.add(frozenset(first))
    assert len(seen) > 4  # the draws do vary


def test_augment_reproducible_and_follows_probabilities():
    a, b, c = SiteAugment(seed=3), SiteAugment(seed=3), SiteAugment(seed=4)
    first = [a.sample() for _ in range(2000)]
    assert first == [b.sample() for _ in range(2000)]
    assert first != [c.sample() for _ in range(2000)]
    rotated = np.mean([p.k > 0 for p in first])
    assert abs(rotated - 0.9) < 0.03
    assert abs(np.mean([p.hflip for p in first]) - 0.5) < 0.04
    assert abs(np.mean([p.vflip for p in first]) - 0.1) < 0.03
    ks = np.bincount([p.k for p in first if p.k], minlength=4)[1:] / np.sum(rotated * 2000)
    np.testing.assert_allclose(ks, 1 / 3, atol=0.04)


class _DrawsDataset(torch.utils.data.Dataset):
    """Returns one augmentation draw per item, to see which generator each worker uses."""

    def __init__(self, augment: SiteAugment):
        self.augment = augment

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        p = self.augment.sample()
        return torch.tensor([p.k, p.hflip, p.vflip])


def test_augment_seeds_each_dataloader_worker():
    def run(seed: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(
            _DrawsDataset(SiteAugment(seed=1)), batch_size=8, num_workers=2,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return torch.cat(list(loader))

    first = run(0)
    assert torch.equal(first, run(0))  # reproducible given the seeds
    assert not torch.equal(first[:8], first[8:16])  # worker 0's and worker 1's first batches differ
    assert not torch.equal(first, run(1))  # a new base seed (as each epoch gets) gives new draws


@pytest.mark.parametrize("kwargs", [{"p_rotate": 1.5}, {"p_hflip": -0.1}])
def test_augment_bad_probability(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SiteAugment(**kwargs)


def test_augment_needs_square_chips():
    with pytest.raises(ValueError, match="square"):
        SiteAugment(seed=0)(np.zeros((5, 3, 8, 9)))


# ------------------------------------------------------------------------------------------------------------------
# Splits


def test_stratified_splits_protocol():
    labels = np.array([0] * 60 + [1] * 240)  # the paper's 1 : 4 imbalance
    splits = stratified_splits(labels, seed=10)
    assert len(splits) == 5 and [s.seed for s in splits] == [10, 11, 12, 13, 14]
    for split in splits:
        parts = (split.train, split.val, split.test)
        joined = np.concatenate(parts)
        assert len(joined) == len(set(joined.tolist())) == len(labels)  # disjoint and complete
        assert set(joined.tolist()) == set(range(len(labels)))
        for cls, count in ((0, 60), (1, 240)):  # within one sample per class of 64 % / 16 % / 20 %
            got = [int(np.sum(labels[p] == cls)) for p in parts]
            expected = [count * 0.8 * 0.8, count * 0.8 * 0.2, count * 0.2]
            assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), (cls, got, expected)
    tests = {tuple(s.test.tolist()) for s in splits}
    assert len(tests) == 5  # five different splits
    again = stratified_splits(labels, seed=10)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(splits, again))


def test_stratified_splits_minimal_classes():
    # minimal: three of each class put exactly one of each in train, validation and test
    split = stratified_splits([0, 0, 0, 1, 1, 1], n_splits=1)[0]
    labels = np.array([0, 0, 0, 1, 1, 1])
    for part in (split.train, split.val, split.test):
        assert sorted(labels[part].tolist()) == [0, 1]


def test_stratified_splits_too_few_samples():
    with pytest.raises(ConfigError, match=r"class cement has 2 site\(s\).*at least 3 per class"):
        stratified_splits([0, 0] + [1] * 20)


def test_class_weights():
    assert CLASS_WEIGHTS == (3.0, 1.0)


# ------------------------------------------------------------------------------------------------------------------
# Synthetic data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, list[Site]]:
    root = tmp_path_factory.mktemp("synthetic")
    sites = make_synthetic_sites(root)  # the default 60 cement + 120 landcover
    return root, sites


def test_synthetic_layout_is_readable_and_georeferenced(synthetic):
    root, sites = synthetic
    read, report = load_sites(root)
    assert report is None
    assert [(s.key, s.lon, s.lat) for s in read] == [(s.key, round(s.lon, 6), round(s.lat, 6)) for s in sites]
    assert sum(s.label == 0 for s in read) == 60 and sum(s.label == 1 for s in read) == 120
    with rasterio.open(read[0].paths["b10"]) as src:
        assert src.count == 3 and src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert 32601 <= src.crs.to_epsg() <= 32660 and src.res == (30.0, 30.0)
        assert src.descriptions == ("2018-01", "2017-01", "2017-04")
    x, _ = SiteDataset(read[:4] + read[-4:])[0]
    assert x.shape == (5, 3, S, S) and not torch.isnan(x).any()


def test_synthetic_values_are_physical(synthetic):
    _, sites = synthetic
    b10 = np.stack([read_image(s.paths["b10"]) for s in sites[::10]])
    b6 = np.stack([read_image(s.paths["b6"]) for s in sites[::10]])
    assert 250.0 < b10.min() and b10.max() < 320.0  # kelvin
    assert 0.0 < b6.min() and b6.max() < 0.6  # TOA reflectance


def test_synthetic_planted_signal(synthetic):
    _, sites = synthetic
    labels = np.array([s.label for s in sites])
    centre = slice(S // 2 - 4, S // 2 + 5)

    def centre_excess(branch: str) -> np.ndarray:
        """Per site and date: mean over the chip centre minus the chip median."""
        data = np.stack([read_image(s.paths[branch]) for s in sites])
        return data[:, :, centre, centre].mean(axis=(2, 3)) - np.median(data, axis=(2, 3))

    b10, b76 = centre_excess("b10"), centre_excess("b76")
    for date in range(3):  # the kiln is sustained: warmer centre for cement in every date
        assert b10[labels == 0, date].mean() > b10[labels == 1, date].mean() + 1.0
        assert b76[labels == 0, date].mean() > b76[labels == 1, date].mean()


def test_synthetic_is_reproducible_and_b76_optional(tmp_path):
    a = make_synthetic_sites(tmp_path / "a", n_cement=2, n_landcover=3, seed=7)
    b = make_synthetic_sites(tmp_path / "b", n_cement=2, n_landcover=3, seed=7, write_b76=False)
    assert "b76" in a[0].paths and "b76" not in b[0].paths
    np.testing.assert_array_equal(read_image(a[4].paths["b7"]), read_image(b[4].paths["b7"]))
    xa, _ = SiteDataset(a)[4]
    xb, _ = SiteDataset(b)[4]
    torch.testing.assert_close(xa, xb)  # derived b76 equals the written one


def test_synthetic_refuses_existing_dataset_and_bad_dates(tmp_path):
    make_synthetic_sites(tmp_path, n_cement=1, n_landcover=1)
    with pytest.raises(InputError, match="already holds sites"):
        make_synthetic_sites(tmp_path, n_cement=1, n_landcover=1)
    with pytest.raises(ConfigError, match="'2017-13'"):
        make_synthetic_sites(tmp_path / "new", dates=("2018-01", "2017-01", "2017-13"))
