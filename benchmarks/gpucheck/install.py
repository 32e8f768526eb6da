"""Making the checkout importable on a machine without a package index, without writing into its Python.

Two folders under the check's work folder, put first on ``PYTHONPATH`` for every phase:

* ``site/``: a folder of links that lays the checkout out as an installed package: ``site/fusionkern/<entry>``
  links to each entry of the checkout's ``fusionkern/``, and ``site/fusionkern/kernels`` and
  ``site/fusionkern/export`` link to the top-level ``kernels/`` and ``export/`` (the ``package_dir`` mapping of
  ``setup.py``). Imports then resolve into the checkout, as after ``pip install -e .``, with no pip, setuptools or
  write access to site-packages, and the dry run builds and imports the very same folder.
* ``deps/``: the wheels of ``.whl/`` (``make gpu-wheels``) whose projects this Python lacks, installed with
  ``pip install --no-index --no-deps --target``; projects the Python already has are left alone.

Standard library only: this runs before anything of the checkout can be imported.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# setup.py's package_dir: packages that live at the top of the checkout but install under fusionkern.
PACKAGE_DIRS = {"kernels": "kernels", "export": "export"}

_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def normalize(name: str) -> str:
    """A project name in its canonical form (PEP 503): ``Click_Plugins`` -> ``click-plugins``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(path: Path) -> dict[str, str] | None:
    """Name, version and tags of a wheel file name, or None for a name that is not a wheel's."""
    match = _WHEEL.match(path.name)
    return match.groupdict() if match else None


def wheel_fits(path: Path) -> str | None:
    """Why the wheel cannot install into this Python on this machine, or None when it can."""
    tags = parse_wheel(path)
    if tags is None:
        return "not a wheel file name"
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pys = tags["py"].split(".")
    if not any(p in ("py3", "py2.py3") or p.startswith("py3") for p in pys):
        abi3 = tags["abi"] == "abi3"
        if not any(p == here or (abi3 and p.startswith("cp3") and int(p[3:]) <= sys.version_info.minor)
                   for p in pys):  # fmt: skip
            return f"built for {tags['py']}, this Python is {here}"
    plat = tags["plat"]
    if plat != "any":
        machine = platform.machine().lower()
        if not sys.platform.startswith("linux") or machine not in plat:
            return f"built for {plat}, this machine is {sys.platform} {machine}"
    return None


def installed_version(project: str) -> str | None:
    """The version of ``project`` installed in this Python, or None."""
    try:
        return importlib.metadata.version(project)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class InstallReport:
    """What the install step did (or, in a dry run, would do)."""

    site: Path
    deps: Path
    present: dict[str, str] = field(default_factory=dict)  # project -> version this Python already has
    installed: list[str] = field(default_factory=list)  # wheel files installed into deps/
    unusable: dict[str, str] = field(default_factory=dict)  # wheel file -> why it cannot install here
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.lines.append(line)

    def pythonpath(self) -> list[str]:
        """The folders to put first on ``PYTHONPATH``, in order."""
        return [str(self.site), str(self.deps)]


def link_checkout(repo: Path, site: Path) -> Path:
    """Build ``site/fusionkern`` as a folder of links into ``repo`` (rebuilt from scratch); returns ``site``."""
    package = site / "fusionkern"
    if site.is_symlink() or site.is_file():
        site.unlink()
    elif site.exists():
        shutil.rmtree(site)
    package.mkdir(parents=True)
    for entry in sorted((repo / "fusionkern").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve())
    for name, folder in PACKAGE_DIRS.items():
        if (package / name).exists():
            raise FileExistsError(f"{repo / 'fusionkern' / name} shadows the {folder}/ package of the checkout")
        (package / name).symlink_to((repo / folder).resolve())
    return site


def install(repo: Path, work: Path, python: str, wheels: Path | None, *, dry_run: bool = False) -> InstallReport:
    """Lay out ``work/site`` and ``work/deps``; install the wheels of ``wheels`` this Python lacks (not in a dry run).

    Args:
        repo: The checkout.
        work: The check's work folder.
        python: The interpreter the phases run (pip runs as ``python -m pip``).
        wheels: The wheel folder (``.whl/``), or None.
        dry_run: Decide and report, install nothing (the link folder is still built: it is the checkout's own).
    """
    report = InstallReport(site=work / "site", deps=work / "deps")
    link_checkout(repo, report.site)
    report.note(f"checkout linked as an installed package at {report.site} (first on PYTHONPATH)")
    if report.deps.exists():
        shutil.rmtree(report.deps)
    report.deps.mkdir(parents=True)
    if wheels is None or not wheels.is_dir():
        report.note(f"no wheel folder ({wheels}): what this Python lacks stays missing (make gpu-wheels fetches it)")
        return report
    todo: list[Path] = []
    for whl in sorted(wheels.glob("*.whl")):
        tags = parse_wheel(whl)
        if tags is None:
            report.unusable[whl.name] = "not a wheel file name"
            continue
        project = normalize(tags["name"])
        have = installed_version(project)
        if have is not None:
            report.present[project] = have
            continue
        why = wheel_fits(whl)
        if why:
            report.unusable[whl.name] = why
        else:
            todo.append(whl)
    if report.present:
        report.note("already in this Python (its version kept): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(report.present.items())))  # fmt: skip
    for name, why in sorted(report.unusable.items()):
        report.note(f"wheel {name} left out: {why}")
    if not todo:
        report.note(f"nothing to install from {wheels}")
        return report
    names = ", ".join(w.name for w in todo)
    if dry_run:
        report.note(f"would install into {report.deps}: {names}")
        return report
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check", "--quiet",
           "--target", str(report.deps), *map(str, todo)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        report.errors.append(f"pip install --no-index of {names} failed (exit {proc.returncode}): {' | '.join(tail)}")
    else:
        report.installed = [w.name for w in todo]
        report.note(f"installed into {report.deps}: {names}")
    return report
