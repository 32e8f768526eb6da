"""Torch device names as the user gives them (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked once.

A small module of its own so that the scanner, the trainer and the experiments resolve devices the same way
without importing each other.
"""

from __future__ import annotations

import torch

from fusionkern.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``--device`` value.

    Args:
        name: ``auto`` (CUDA where torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device.

    Raises:
        ConfigError: An unknown name, or a CUDA device on a machine (or torch build) without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch build sees no CUDA device")
    return device


__all__ = ["resolve_device"]
