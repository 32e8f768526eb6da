"""Where sites become tensors: reading a site's inputs, cropping, deriving b76, scaling and augmenting.

One item is one site: its five co-registered inputs (b10, b11, b7, b6, b76), each a 3-channel image with one
channel per date, stacked in branch order. The steps, per site:

1. read each file (GeoTIFF via rasterio, PNG/JPG via Pillow) as (3, H, W) float32 with NaN for nodata;
2. crop to ``chip_size``: centred, or, with a :class:`~fusionkern.data.transforms.SiteAugment`, shifted inside
   the context the files carry (``fusionkern chips --context-px``), one shift for all inputs;
3. derive b76 = b7 / b6 on the raw values where its file is absent (:func:`fusionkern.landsat.band_ratio`:
   NaN where b6 <= 0 or either band is NaN);
4. scale each channel of each input to its own min..max (:func:`~fusionkern.data.transforms.minmax_scale`),
   NaN pixels becoming 0; or, with ``scaling="physical"``, to physical units by a fixed map per band
   (:func:`~fusionkern.data.transforms.physical_scale`);
5. apply the rotation and flips, one draw for all inputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionkern import BRANCHES
from fusionkern.data.layouts import DERIVED_BRANCH, Site
from fusionkern.data.transforms import AugmentParams, scale_chip, scaling_name
from fusionkern.errors import ConfigError, InputError, MissingDependencyError
from fusionkern.landsat import band_ratio

DATES_PER_INPUT = 3
"""Channels of every branch input: one per date."""

_TIFF_SUFFIXES = (".tif", ".tiff")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA")  # modes whose three colour channels can be taken as three dates


def read_image(path: str | Path) -> np.ndarray:
    """Read one branch input of one site.

    GeoTIFFs are read with rasterio (three bands, one per date; nodata and masked pixels become NaN). PNG and
    JPG images are read with Pillow (three channels, one per date; a transparent pixel of an RGBA image is NaN).
    JPEG's chroma subsampling blends neighbouring channels, i.e. dates: prefer GeoTIFF or PNG where there is a choice.

    Args:
        path: The image file.

    Returns:
        float32 array of shape (3, H, W).

    Raises:
        InputError: The file cannot be read, or does not hold exactly three channels.
        MissingDependencyError: The reader its format needs is not installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        image = _read_tiff(path)
    elif suffix in _PIL_SUFFIXES:
        image = _read_pil(path)
    else:
        raise InputError(f"{path}: unsupported image type {suffix!r}; expected .tif, .tiff, .png, .jpg or .jpeg")
    if image.shape[0] != DATES_PER_INPUT:
        raise InputError(f"{path} has {image.shape[0]} bands; each input needs {DATES_PER_INPUT}, one per date")
    return image


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError
    except ImportError as exc:
        raise MissingDependencyError("rasterio", "geo", "Reading GeoTIFF chips") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read(masked=True, out_dtype="float32")
    except (RasterioError, OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return np.ma.filled(data, np.nan).astype(np.float32, copy=False)


def _read_pil(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError("pillow", "geo", "Reading PNG/JPG chips") from exc
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _GRAYSCALE_MODES:
                raise InputError(
                    f"{path} is a single-channel (grayscale, mode {mode}) image;"
                    " each input needs 3 channels, one per date"
                )
            if mode not in _COLOUR_MODES:
                raise InputError(f"{path} is a {mode} image; expected RGB (3 channels, one per date)")
            rgba = np.asarray(img.convert("RGBA") if mode != "RGB" else img)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or unidentifiable files raise these
        raise InputError(f"cannot read {path}: {exc}") from exc
    image = rgba[..., :3].astype(np.float32).transpose(2, 0, 1)
    if rgba.shape[-1] == 4:
        image[:, rgba[..., 3] == 0] = np.nan
    return np.ascontiguousarray(image)


def centre_crop(image: np.ndarray, size: int, path: Path) -> np.ndarray:
    """Cut the central ``size`` x ``size`` window of a (C, H, W) image; ``path`` names it in errors."""
    height, width = image.shape[-2:]
    if height < size or width < size:
        raise InputError(f"{path} is {height} x {width} px, smaller than the chip size {size} x {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[..., top : top + size, left : left + size])


class SiteDataset(Dataset):
    """Sites as tensors: item ``i`` is ``(x, y)`` with ``x`` of shape (len(branches), 3, chip_size, chip_size).

    ``x`` is float32 in [0, 1] (``scaling="minmax"``) or in physical units (``"physical"``), branches in the order
    given (default b10, b11, b7, b6, b76), channels in date order; ``y`` is the class index (0 cement, 1
    landcover). With a single branch, e.g. ``branches=("b76",)``, ``x`` is (1, 3, S, S): single-input models squeeze
    the first axis.

    Args:
        sites: The sites, as read by :func:`~fusionkern.data.layouts.load_sites`.
        chip_size: Side of the centre crop, in pixels (the authors use 35, about 1 km at 30 m).
        augment: Called on each (N, 3, S, S) array after scaling, e.g.
            :class:`~fusionkern.data.transforms.SiteAugment`; None for evaluation.
        branches: The branches to return, a subset of :data:`fusionkern.BRANCHES` in any order.
        cache: Keep each decoded, cropped file in memory after its first read. The cache is per process: each
            DataLoader worker fills its own copy, so call :meth:`preload` first when workers are not persistent.
            Views made by :meth:`single_branch` share it.
        scaling: ``minmax`` (default: each chip channel to its own min..max, the paper's) or ``physical``
            (:func:`~fusionkern.data.transforms.physical_scale`).

    Raises:
        ConfigError: ``chip_size`` or ``branches`` is invalid.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        chip_size: int = 35,
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
        branches: Sequence[str] = BRANCHES,
        cache: bool = True,
        scaling: str = "minmax",
    ):
        self.sites = list(sites)
        self.scaling = scaling_name(scaling)
        self.chip_size = _check_chip_size(chip_size)
        self.branches = _check_branches(branches)
        self.augment = augment
        self.cache = cache
        self._cache: dict[Path, tuple[tuple[int, int], np.ndarray]] = {}

    @property
    def labels(self) -> np.ndarray:
        """Class index of every site, int64, shape (len(self),)."""
        return np.array([s.label for s in self.sites], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        site = self.sites[index]
        sample = getattr(self.augment, "sample", None)
        if sample is not None:  # a SiteAugment: shift the crop, then rotate and flip the scaled chips
            params = sample()
            x = params.apply(self.load(index, params))
        else:
            x = self.load(index)
            if self.augment is not None:
                x = self.augment(x)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), int(site.label)

    def single_branch(self, branch: str) -> SiteDataset:
        """The same sites with one branch only (items of shape (1, 3, S, S)); shares this dataset's cache."""
        return self._view(self.augment, (branch,))

    def with_augment(self, augment: Callable[[np.ndarray], np.ndarray] | None) -> SiteDataset:
        """The same sites with another augmentation (e.g. None for evaluation); shares this dataset's cache."""
        return self._view(augment, self.branches)

    def _view(self, augment: Callable[[np.ndarray], np.ndarray] | None, branches: Sequence[str]) -> SiteDataset:
        view = SiteDataset(self.sites, self.chip_size, augment, branches, self.cache, self.scaling)
        view._cache = self._cache
        return view

    def preload(self) -> SiteDataset:
        """Read and check every site now; with ``cache`` on, DataLoader workers then start from a full cache.

        Returns:
            This dataset.

        Raises:
            InputError: The first site that cannot be read.
        """
        for index in range(len(self)):
            self.load(index)
        return self

    def load(self, index: int, params: AugmentParams | None = None) -> np.ndarray:
        """The scaled inputs of site ``index``: float32 (len(branches), 3, S, S).

        Args:
            index: The site.
            params: Where to crop: ``params.dy`` / ``params.dx`` shift the chip from the centre of the files
                (clipped to their context); None crops centred. Rotations and flips are not applied here.
        """
        site = self.sites[index]
        raw = self._read_site(site, params or AugmentParams())
        return np.stack([self._scaled(site, raw, branch) for branch in self.branches])

    def _read_site(self, site: Site, params: AugmentParams) -> dict[str, np.ndarray]:
        """Cropped raw arrays of the files this dataset's branches need; all must share one size."""
        derive = DERIVED_BRANCH in self.branches and DERIVED_BRANCH not in site.paths
        needed = (set(self.branches) - {DERIVED_BRANCH} | {"b7", "b6"}) if derive else set(self.branches)
        raw, shapes = {}, {}
        for branch in (b for b in BRANCHES if b in needed):
            path = site.paths.get(branch)
            if path is None:
                raise InputError(f"site {site.key} has no {branch} file")
            shapes[branch], image = self._read_file(path)
            raw[branch] = params.crop(image, self.chip_size)
        _check_same_size(site, shapes)
        if derive:
            raw[DERIVED_BRANCH] = band_ratio(raw["b7"], raw["b6"])
        return raw

    def _read_file(self, path: Path) -> tuple[tuple[int, int], np.ndarray]:
        if path in self._cache:
            return self._cache[path]
        image = read_image(path)
        centre_crop(image, self.chip_size, path)  # refuses files smaller than the chip
        entry = (image.shape[-2:], image)
        if self.cache:
            self._cache[path] = entry
        return entry

    def _scaled(self, site: Site, raw: dict[str, np.ndarray], branch: str) -> np.ndarray:
        chip = raw[branch]
        empty = np.flatnonzero(~np.isfinite(chip).reshape(chip.shape[0], -1).any(axis=1))
        if empty.size:
            source = site.paths.get(branch) or f"b7 / b6 ({site.paths['b7']}, {site.paths['b6']})"
            raise InputError(
                f"site {site.key}: {branch} ({source}) has no valid pixel in date channel {int(empty[0]) + 1}"
                f" of its central {self.chip_size} x {self.chip_size} chip"
            )
        return scale_chip(chip, branch, self.scaling)


def _check_chip_size(chip_size: int) -> int:
    if isinstance(chip_size, bool) or not isinstance(chip_size, (int, np.integer)) or chip_size < 1:
        raise ConfigError(f"chip_size must be a positive whole number of pixels, got {chip_size!r}")
    return int(chip_size)


def _check_branches(branches: Sequence[str] | str) -> tuple[str, ...]:
    branches = (branches,) if isinstance(branches, str) else tuple(branches)
    unknown = [b for b in branches if b not in BRANCHES]
    if not branches or unknown or len(set(branches)) != len(branches):
        raise ConfigError(
            f"branches must be distinct names from {', '.join(BRANCHES)}, got {', '.join(branches) or 'none'}"
        )
    return branches


def _check_same_size(site: Site, shapes: dict[str, tuple[int, int]]) -> None:
    first = next(iter(shapes))
    for branch, shape in shapes.items():
        if shape != shapes[first]:
            raise InputError(
                f"site {site.key}: {site.paths[branch]} is {shape[0]} x {shape[1]} px but"
                f" {site.paths[first]} is {shapes[first][0]} x {shapes[first][1]};"
                " a site's inputs must be co-registered"
            )
