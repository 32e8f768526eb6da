"""Where training data enters: the two folder layouts a labelled dataset can come in.

The **site layout** is this project's own, one folder per site holding its five co-registered inputs::

    <root>/
      sites.csv                       # optional: columns site,label,lon,lat (label = cement|landcover)
      cement/<site>/b10.tif  b11.tif  b7.tif  b6.tif  [b76.tif]
      landcover/<site>/...

The **authors' layout** is how the paper's chips are distributed, one folder per band::

    <root>/<branch>/<class>/<name>.<tif|tiff|png|jpg|jpeg>

Its five band folders hold different numbers of chips (paper Table I), so sites are joined by file name within a
class and a :class:`JoinReport` says what could not be joined. In both layouts ``b76`` (Band 7 / Band 6) may be
absent: the dataset then derives it from ``b7`` and ``b6``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fusionkern import BRANCHES, CLASSES
from fusionkern.errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""File suffixes (compared case-insensitively) that hold one branch input of one site."""

DERIVED_BRANCH = "b76"
"""The branch that can be computed from others (Band 7 / Band 6) when its file is absent."""

REQUIRED_BRANCHES = tuple(b for b in BRANCHES if b != DERIVED_BRANCH)
"""Branches whose file every site must have."""

SITES_CSV = "sites.csv"

_SEPARATORS = re.compile(r"[\s_\-:./]+")
_NUMBERED_BRANCH = re.compile(r"^(?:b|band)?0*(10|11|7|6|76)$")
_RATIO_ALIASES = frozenset(
    {"ratio", "ratio76", "b76ratio", "band76ratio", "b7b6", "band7band6", "b7b6ratio", "b7overb6", "swirratio"}
)
_CLASS_ALIASES = {
    "cement": 0,
    "cementplant": 0,
    "cementplants": 0,
    "landcover": 1,
    "landcovers": 1,
}


@dataclass
class Site:
    """One labelled location and the files of its branch inputs.

    Attributes:
        name: The site's name, unique within its class (a file stem or folder name).
        label: Index into :data:`fusionkern.CLASSES` (0 cement, 1 landcover).
        paths: File of each branch input, keyed by branch name. ``b76`` may be absent (derived from b7 and b6).
        lon: Longitude in degrees, where known.
        lat: Latitude in degrees, where known.
    """

    name: str
    label: int
    paths: dict[str, Path]
    lon: float | None = None
    lat: float | None = None

    @property
    def class_name(self) -> str:
        """The class as a word, ``cement`` or ``landcover``."""
        return CLASSES[self.label]

    @property
    def key(self) -> str:
        """``<class>/<name>``: how messages and reports refer to the site."""
        return f"{self.class_name}/{self.name}"


@dataclass(frozen=True)
class JoinReport:
    """What joining the authors' per-band folders into sites kept and left out.

    Attributes:
        joined: Number of sites with every required branch (b10, b11, b7, b6).
        joined_per_class: Joined sites per class name.
        unjoined: Per branch, the names present in that branch's folder that could not be joined because some
            required branch lacks them. Every branch of :data:`fusionkern.BRANCHES` is a key.
        derived_b76: Joined sites without a b76 file, whose ratio is derived from b7 and b6.
    """

    joined: int
    joined_per_class: dict[str, int]
    unjoined: dict[str, tuple[str, ...]] = field(default_factory=dict)
    derived_b76: int = 0

    @property
    def n_unjoined(self) -> int:
        """Number of distinct names that could not be joined."""
        return len({name for names in self.unjoined.values() for name in names})

    def summary(self) -> str:
        """One paragraph for the user: joined sites per class, derived ratios and what was left out."""
        per_class = ", ".join(f"{n} {cls}" for cls, n in self.joined_per_class.items())
        text = f"Joined {self.joined} sites ({per_class}) present in all of {', '.join(REQUIRED_BRANCHES)}."
        if self.derived_b76:
            text += f" b76 is derived from b7 / b6 for {self.derived_b76} of them."
        if not self.n_unjoined:
            return text + " Every chip was joined."
        left = ", ".join(f"{b} {len(n)}" for b, n in self.unjoined.items() if n)
        examples = sorted({name for names in self.unjoined.values() for name in names})[:3]
        return (
            f"{text} {self.n_unjoined} names could not be joined because a required band lacks them"
            f" (chips left out per band: {left}; for example {', '.join(examples)})."
        )


def branch_of(folder_name: str) -> str | None:
    """The branch a folder or file name stands for (``B10``, ``band10``, ``b7_6``, ``ratio``...), or None."""
    key = _SEPARATORS.sub("", folder_name.lower())
    if key in _RATIO_ALIASES:
        return DERIVED_BRANCH
    match = _NUMBERED_BRANCH.match(key)
    return f"b{match.group(1)}" if match else None


def class_of(folder_name: str) -> int | None:
    """The class index a folder name stands for (``cement``, ``Landcover``, ``land_cover``...), or None."""
    return _CLASS_ALIASES.get(_SEPARATORS.sub("", folder_name.lower()))


def read_site_layout(root: str | Path) -> list[Site]:
    """Read the site layout: ``<root>/<class>/<site>/<branch>.tif``.

    Class folders are matched case-insensitively; band files may be ``.tif``/``.tiff`` (or PNG/JPG). ``sites.csv``,
    where present, supplies longitude and latitude.

    Args:
        root: The dataset folder.

    Returns:
        Sites sorted by class, then name.

    Raises:
        InputError: A site lacks a required band file, has two files for one band, or ``sites.csv`` is malformed.
    """
    root = Path(root)
    coords = _read_sites_csv(root / SITES_CSV)
    sites = []
    for class_dir, label in _class_dirs(root):
        for site_dir in sorted(_subdirs(class_dir)):
            site = Site(site_dir.name, label, _site_band_files(site_dir, f"{CLASSES[label]}/{site_dir.name}"))
            site.lon, site.lat = coords.get((label, site.name), (None, None))
            sites.append(site)
    return sorted(sites, key=lambda s: (s.label, s.name))


def read_authors_layout(root: str | Path) -> tuple[list[Site], JoinReport]:
    """Read the authors' layout ``<root>/<branch>/<class>/<name>.<ext>`` and join the bands into sites.

    A site is a file stem present, within one class, in every required branch (b10, b11, b7, b6); b76 is optional.

    Args:
        root: The dataset folder.

    Returns:
        The joined sites (sorted by class, then name) and the report of what was joined and left out.

    Raises:
        InputError: A required branch folder is missing, two folders name the same branch or class, a name is
            found under both classes, or a folder holds two files with the same stem.
    """
    root = Path(root)
    found = _branch_dirs(root)
    missing = [b for b in REQUIRED_BRANCHES if b not in found]
    if missing:
        raise InputError(f"{root} (authors' layout) has no folder for {', '.join(missing)}: expected {_AUTHORS_HINT}")
    files = {branch: _class_files(folder, branch) for branch, folder in found.items()}
    labels = _labels_by_name(files, root)
    return _join(files, labels)


def load_sites(root: str | Path, both_classes: bool = True) -> tuple[list[Site], JoinReport | None]:
    """Read a labelled dataset in either layout, telling them apart by their top-level folders.

    Args:
        root: The dataset folder.
        both_classes: Require sites of both classes (False for a folder that is merged with others, such as
            the landcover sites ``fusionkern mine`` writes).

    Returns:
        The sites and, for the authors' layout, the join report (None for the site layout).

    Raises:
        InputError: The folder is neither layout, is ambiguous, or one of the classes has no site.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist or is not a folder")
    has_classes = bool(_class_dirs(root))
    has_branches = bool(_branch_dirs(root))
    if has_classes and has_branches:
        raise InputError(
            f"{root} has both class folders and band folders: expected either {_SITE_HINT} or {_AUTHORS_HINT}"
        )
    if has_classes:
        sites, report = read_site_layout(root), None
    elif has_branches:
        sites, report = read_authors_layout(root)
    else:
        raise InputError(f"{root} is not a dataset folder: expected {_SITE_HINT} or {_AUTHORS_HINT}")
    if both_classes:
        _check_classes(sites, root)
    elif not sites:
        raise InputError(f"{root} holds no site")
    return sites, report


def load_many(roots: Sequence[str | Path]) -> tuple[list[Site], list[JoinReport], list[int]]:
    """Several datasets merged into one, e.g. a training set and the hard negatives mined for it.

    Site names are prefixed with their folder's position (``d1:``, ``d2:``...) when more than one folder is
    given, so that names stay unique; the classes are checked on the union.

    Args:
        roots: The dataset folders.

    Returns:
        The sites, the join reports of folders in the authors' layout, and each site's folder index.

    Raises:
        InputError: A folder that cannot be read, or a class without a site in the union.
    """
    if not roots:
        raise InputError("no dataset folder given")
    sites, reports, origin = [], [], []
    for index, root in enumerate(roots):
        found, report = load_sites(root, both_classes=len(roots) == 1)
        if report is not None:
            reports.append(report)
        for site in found:
            if len(roots) > 1:
                site.name = f"d{index + 1}:{site.name}"
            sites.append(site)
            origin.append(index)
    _check_classes(sites, Path(" + ".join(str(r) for r in roots)))
    return sites, reports, origin


_SITE_HINT = "the site layout <root>/cement|landcover/<site>/b10.tif, b11.tif, b7.tif, b6.tif [, b76.tif]"
_AUTHORS_HINT = "the authors' layout <root>/<band: b10, b11, b7, b6 [, b76]>/<cement|landcover>/<name>.tif|png|jpg"


def _is_visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "_"))


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if _is_visible_dir(p)]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _unique_map(pairs: list[tuple[object, Path]], root: Path, what: str) -> dict:
    """Map keys to paths, refusing two paths for one key."""
    out: dict = {}
    for key, path in pairs:
        if key in out:
            raise InputError(f"{root}: both {out[key].name} and {path.name} are {what} {key}; keep one")
        out[key] = path
    return out


def _class_dirs(root: Path) -> list[tuple[Path, int]]:
    pairs = [(class_of(d.name), d) for d in sorted(_subdirs(root))]
    by_class = _unique_map([(CLASSES[label], d) for label, d in pairs if label is not None], root, "folders for class")
    return [(by_class[cls], label) for label, cls in enumerate(CLASSES) if cls in by_class]


def _branch_dirs(root: Path) -> dict[str, Path]:
    pairs = [(branch_of(d.name), d) for d in sorted(_subdirs(root))]
    return _unique_map([(b, d) for b, d in pairs if b is not None], root, "folders for branch")


def _site_band_files(site_dir: Path, key: str) -> dict[str, Path]:
    """The band files of one site folder, keyed by branch; every required branch must be present."""
    named = [(p.stem.lower(), p) for p in _image_files(site_dir)]
    paths = _unique_map([(stem, p) for stem, p in named if stem in BRANCHES], site_dir, "files for band")
    for branch in REQUIRED_BRANCHES:
        if branch not in paths:
            raise InputError(f"site {key} has no {branch} file (expected {site_dir / (branch + '.tif')})")
    return {b: paths[b] for b in BRANCHES if b in paths}


def _read_sites_csv(path: Path) -> dict[tuple[int, str], tuple[float | None, float | None]]:
    """Longitude and latitude per (label, site) from ``sites.csv``; empty where the file is absent."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"site", "label"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: expected site,label,lon,lat")
        coords = {}
        for line, row in enumerate(reader, start=2):
            label = class_of(row["label"] or "")
            if label is None:
                raise InputError(f"{path} line {line}: label {row['label']!r} is not cement or landcover")
            coords[(label, row["site"])] = (_float_or_none(row.get("lon")), _float_or_none(row.get("lat")))
    return coords


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _class_files(branch_dir: Path, branch: str) -> dict[int, dict[str, Path]]:
    """Per class index, the image files of one branch folder keyed by stem."""
    out = {}
    for sub in sorted(_subdirs(branch_dir)):
        label = class_of(sub.name)
        if label is None:
            raise InputError(f"{sub}: folder {sub.name!r} in the {branch} folder is not a class (cement or landcover)")
        if label in out:
            raise InputError(f"{branch_dir} has two folders for class {CLASSES[label]}; keep one")
        out[label] = _unique_map([(p.stem, p) for p in _image_files(sub)], sub, "images named")
    return out


def _labels_by_name(files: dict[str, dict[int, dict[str, Path]]], root: Path) -> dict[str, int]:
    """The class of every name found anywhere; a name under both classes is an error."""
    labels: dict[str, int] = {}
    for branch, by_class in files.items():
        for label, named in by_class.items():
            for name in named:
                if labels.setdefault(name, label) != label:
                    raise InputError(
                        f"{root}: chip {name!r} is under both cement and landcover (seen in the {branch} folder);"
                        " a site must have one class"
                    )
    return labels


def _join(files: dict[str, dict[int, dict[str, Path]]], labels: dict[str, int]) -> tuple[list[Site], JoinReport]:
    """Join per-branch files into sites by name; report the names that miss a required branch."""
    sites, unjoined = [], {b: [] for b in BRANCHES}
    for name, label in sorted(labels.items(), key=lambda item: (item[1], item[0])):
        paths = {b: files[b][label][name] for b in BRANCHES if name in files.get(b, {}).get(label, {})}
        if all(b in paths for b in REQUIRED_BRANCHES):
            sites.append(Site(name, label, paths))
        else:
            for branch in paths:
                unjoined[branch].append(name)
    report = JoinReport(
        joined=len(sites),
        joined_per_class={cls: sum(s.label == i for s in sites) for i, cls in enumerate(CLASSES)},
        unjoined={b: tuple(names) for b, names in unjoined.items()},
        derived_b76=sum(DERIVED_BRANCH not in s.paths for s in sites),
    )
    return sites, report


def _check_classes(sites: list[Site], root: Path) -> None:
    for label, cls in enumerate(CLASSES):
        if not any(s.label == label for s in sites):
            raise InputError(f"{root} has no {cls} sites: both classes need at least one")
