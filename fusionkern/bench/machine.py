"""A description of the machine a benchmark ran on: CPU, GPU, library versions and the code's commit.

Everything here only reads: ``git`` runs with ``--no-optional-locks`` so that asking for the commit never writes
the repository's index.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "fusionkern", "torch", "triton", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "tensorrt", "numpy",
    "rasterio", "pytest", "pytest-benchmark", "matplotlib",
)  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info(repo: str | Path | None = None) -> dict[str, Any]:
    """``{"id", "short", "branch", "dirty", "time"}`` of the checkout at ``repo`` (default: this package's), read
    without touching the index; ``id`` is ``unknown`` outside a git checkout."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    commit = _git(repo, "rev-parse", "HEAD")
    if not commit:
        return {"id": "unknown", "short": "unknown", "branch": None, "dirty": None, "time": None}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {
        "id": commit,
        "short": commit[:10],
        "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "time": _git(repo, "show", "-s", "--format=%cI", "HEAD"),
    }


def gpu_info() -> dict[str, Any] | None:
    """Name, memory, compute capability and driver of the visible CUDA GPUs, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": None,
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=20,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            info["driver"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|corporation)\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def machine_name(device: str) -> str:
    """A short name for result folders: the GPU's name on a CUDA run, else the CPU's name and usable cores."""
    if device == "cuda" and torch.cuda.is_available():
        return slug(torch.cuda.get_device_name(0))
    words = slug(cpu_model()).split("-")
    return "-".join(words[:3] + [f"{_usable_cpus()}c"])


def describe_machine(device: str = "cpu") -> dict[str, Any]:
    """Everything a reader needs to weigh the figures: host, CPU, load, GPU, versions, commit, settings."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "host": socket.gethostname().split(".")[0],
        "name": machine_name(device),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": _usable_cpus(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(),
            "load_average": load,
        },
        "gpu": gpu_info(),
        "versions": {name: _version(name) for name in PACKAGES if _version(name) is not None},
        "torch_build": torch.__version__,
        "commit": commit_info(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},  # fmt: skip
    }
