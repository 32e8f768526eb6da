"""Checkpoints that rebuild their model and load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled classes)::

    {
        "format": "fusionkern-checkpoint", "version": 1,
        "model": {"class": "FusionNet", "config": {...constructor arguments...}},
        "state_dict": {...},
        "data": {"chip_px": 35, "input_size": 256, "scaling": "minmax-per-chip-channel",
                 "branches": [...], "resolution_m": 30.0},
        "metadata": {...whatever the caller adds: metrics, epoch, dates...},
    }
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkern import BRANCHES
from fusionkern.data.transforms import SCALINGS
from fusionkern.errors import CheckpointError
from fusionkern.files import atomic_output
from fusionkern.models.networks import MODEL_CLASSES, takes_all_branches

FORMAT = "fusionkern-checkpoint"
VERSION = 1
SCALING = SCALINGS["minmax"]
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """Check that metadata holds only what ``weights_only=True`` can load (and JSON can show)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # numpy scalars
        return value.item()
    raise CheckpointError(f"checkpoint metadata {where} has a value of type {type(value).__name__}; "
                          "use numbers, strings, lists or dicts")  # fmt: skip


def data_spec(model: nn.Module) -> dict[str, Any]:
    """How chips must be prepared for ``model``: the chip size at 30 m, the model's input size, the scaling."""
    preset = model.preset
    return {
        "chip_px": preset.chip_px,
        "input_size": preset.input_size,
        "resolution_m": 30.0,
        "scaling": SCALING,
        "branches": list(BRANCHES) if takes_all_branches(model) else None,
    }


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file, then rename); returns the path.

    ``metadata`` (numbers, strings, lists, dicts, tensors) is stored under ``"metadata"``; a ``data=`` keyword
    updates the chip description (e.g. ``data={"branch": "b76", "dates": [...]}``).
    """
    cls = type(model).__name__
    if cls not in MODEL_CLASSES or not hasattr(model, "config"):
        raise CheckpointError(f"cannot checkpoint a {cls}: expected one of {sorted(MODEL_CLASSES)}")
    data = data_spec(model)
    data.update(_plain(metadata.pop("data", {}), "data"))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"class": cls, "config": _plain(model.config, "config")},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": data,
        "metadata": _plain(metadata, "metadata"),
    }
    return atomic_save(payload, path)


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees a partial file."""
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load and validate a checkpoint dict (``weights_only=True``: nothing but tensors and plain values).

    ``mmap=True`` maps the tensors' storage instead of reading it: their values are read only when used, so that
    the model's description (``model``, ``data``, ``metadata``) costs no more than the metadata itself.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable fusionkern checkpoint ({_load_failure(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fusionkern checkpoint (no '{FORMAT}' marker)")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer fusionkern (format version {payload['version']})")
    cls = payload.get("model", {}).get("class")
    if cls not in MODEL_CLASSES:
        raise CheckpointError(f"{path} holds an unknown model class {cls!r}")
    return payload


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry with
    ``weights_only=False``: that would run whatever code the file carries, and is never the fix here."""
    text = str(exc).strip()
    if "weights only load failed" not in text.lower():
        return (text.splitlines()[0] if text else type(exc).__name__)[:200]
    blocked = re.search(r"unsupported GLOBAL (\S+)", text)
    if blocked:
        return f"it holds a pickled {blocked.group(1)}, which is never loaded: only tensors and plain values are"
    if "unsupported operand" in text.lower():
        return "not a torch checkpoint, or one holding pickled objects other than tensors and plain values"
    return "it holds pickled objects other than tensors and plain values, which are never loaded"


def load_checkpoint(
    path: str | os.PathLike, *, expect: str | type | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild the model stored at ``path`` (in eval mode), loading weights with ``weights_only=True``.

    ``expect`` (a class or class name) makes a checkpoint of another model a :class:`CheckpointError`. The
    checkpoint's ``data`` and ``metadata`` are attached as ``model.checkpoint``.
    """
    payload = read_checkpoint(path)
    cls_name = payload["model"]["class"]
    if expect is not None:
        want = expect if isinstance(expect, str) else expect.__name__
        if want.lower() != cls_name.lower():
            raise CheckpointError(f"{path} holds a {cls_name}, expected a {want}")
    try:
        model = MODEL_CLASSES[cls_name](**payload["model"]["config"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit a {cls_name} ({first[:200]})") from None
    bad = [k for k, v in payload["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {bad[:3]}")
    model.checkpoint = {"path": str(path), "data": payload["data"], "metadata": payload["metadata"]}
    return model.to(map_location).eval()
