"""``fusionkern export``: a checkpoint to an ONNX file or a TensorRT engine, kept only if it passes parity.

The artefact is built in a temporary folder beside ``--out``, checked against the reference model
(:func:`fusionkern.export.check_parity`) and only then moved to ``--out`` together with its sidecar ``<out>.json``
(model, preset, input shape, opset, tool versions, sha256 of the artefact, the parity figures). A failing parity
check leaves nothing at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fusionkern.errors import ConfigError
from fusionkern.files import check_writable, sha256_file

NAME = "export"
HELP = "Export a checkpoint to ONNX or a TensorRT engine, verified against the reference model (parity)."

SIDECAR_FORMAT = "fusionkern-export"
DEFAULT_TRT_MAX_BATCH = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a fusionkern checkpoint (.pt)")
    p.add_argument("--out", required=True, help="artefact path: .onnx, or .engine / .plan / .trt for TensorRT")
    p.add_argument("--format", choices=("onnx", "trt"), default="onnx", help="onnx (default) or trt (TensorRT)")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        help="fp32 (default for onnx) or fp16 (default for trt); fp16 ONNX keeps float32 input/output",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--max-batch",
        type=int,
        dest="max_batch",
        help=f"largest batch (default 4096 for onnx, {DEFAULT_TRT_MAX_BATCH} for trt)",
    )
    p.add_argument("--opt-batch", type=int, dest="opt_batch", help="trt: batch the engine is tuned for (default max)")
    p.add_argument(
        "--parity-sites",
        type=int,
        default=1000,
        dest="parity_sites",
        help="random sites for the parity check (default 1000; each costs two forward passes)",
    )
    p.add_argument("--parity-batch", type=int, default=64, dest="parity_batch", help="parity batch size (default 64)")
    p.add_argument(
        "--real-chips",
        dest="real_chips",
        metavar="DIR",
        help="folder of Landsat-8 clips for parity (default ../shared/data/landsat8 where present)",
    )
    p.add_argument("--no-real-chips", dest="no_real_chips", action="store_true", help="random sites only")
    p.add_argument("--seed", type=int, help="seed of the random parity sites")


def tool_versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("fusionkern", "torch", "onnx", "onnxscript", "onnxruntime", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _check_out(out: Path, fmt: str) -> None:
    from fusionkern.export.parity import ENGINE_SUFFIXES

    want = (".onnx",) if fmt == "onnx" else ENGINE_SUFFIXES
    if out.suffix.lower() not in want:
        raise ConfigError(f"--out {out} must end in {' or '.join(want)} for --format {fmt}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the artefact's file name")
    check_writable(out, "--out")


def _stage(text: str) -> None:
    """One line per stage, at once: an export of the paper preset takes minutes, and should not look stuck."""
    print(f"export: {text}", flush=True)


def _sidecar(args, fmt: str, precision: str, ckpt: Path, model, artefact: Path, report, extra: dict) -> dict[str, Any]:
    from fusionkern import BRANCHES, CLASSES
    from fusionkern.export.onnx import input_name
    from fusionkern.models.networks import FusionNet

    data = dict(model.checkpoint.get("data", {}))
    size = model.input_size
    fusion = isinstance(model, FusionNet)
    shape = ["batch", len(BRANCHES), 3, size, size] if fusion else ["batch", 3, size, size]
    record: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "artefact": {
            "path": artefact.name,
            "format": fmt,
            "sha256": sha256_file(artefact),
            "bytes": artefact.stat().st_size,
        },
        "model": {
            "class": type(model).__name__,
            "config": model.config,
            "preset": model.config.get("preset"),
            "checkpoint": str(ckpt),
            "checkpoint_sha256": sha256_file(ckpt),
        },
        "input": {
            "name": input_name(model),
            "shape": shape,
            "dtype": "float32",
            "chip_px": data.get("chip_px"),
            "resolution_m": data.get("resolution_m"),
            "input_size": size,
            "scaling": data.get("scaling"),
            "branches": list(BRANCHES) if fusion else [data.get("branch") or "b76"],
        },
        "output": {"name": "logits", "shape": ["batch", model.config.get("num_classes", 2)], "classes": list(CLASSES)},
        "precision": precision,
        "opset": args.opset,
        "tools": tool_versions(*(("tensorrt",) if fmt == "trt" else ())),
        "parity": report.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record["parity"]["artefact"] = artefact.name
    record.update(extra)
    return record


def run(args: argparse.Namespace) -> int:
    from fusionkern.export.parity import ParityError

    fmt = args.format
    out = Path(args.out)
    if fmt == "trt":  # before anything else: fail at once where engines cannot be built
        from fusionkern.export.tensorrt import require_tensorrt

        require_tensorrt(f"Exporting {args.checkpoint} to a TensorRT engine ({out})")
    _check_out(out, fmt)
    precision = args.precision or ("fp32" if fmt == "onnx" else "fp16")
    max_batch = args.max_batch or (4096 if fmt == "onnx" else DEFAULT_TRT_MAX_BATCH)
    if max_batch < 1 or args.parity_sites < 0 or args.parity_batch < 1:
        raise ConfigError("--max-batch and --parity-batch must be at least 1, --parity-sites at least 0")
    parity_batch = min(args.parity_batch, max_batch)
    real: bool | str = False if args.no_real_chips else (args.real_chips or True)

    from fusionkern.export.onnx import to_onnx
    from fusionkern.export.parity import check_parity
    from fusionkern.models.checkpoint import load_checkpoint

    ckpt = Path(args.checkpoint)
    _stage(f"loading {ckpt}")
    model = load_checkpoint(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fusionkern-export-", dir=out.parent))
    try:
        extra: dict[str, Any] = {}
        _stage(f"exporting to ONNX (opset {args.opset}, {precision}, checked with onnx.checker)")
        if fmt == "onnx":
            artefact = to_onnx(model, work / out.name, opset=args.opset, precision=precision, max_batch=max_batch)
        else:
            from fusionkern.export.tensorrt import build_engine, engine_sidecar_path

            # Engines are built strongly typed on TensorRT 10 and 11 alike: the ONNX carries the precision.
            onnx_path = to_onnx(model, work / (out.stem + ".onnx"), opset=args.opset, precision=precision,
                                max_batch=max_batch)  # fmt: skip
            _stage(f"building the TensorRT engine (batch up to {max_batch})")
            artefact = build_engine(onnx_path, work / out.name, precision=precision, max_batch=max_batch,
                                    opt_batch=args.opt_batch or max_batch)  # fmt: skip
            extra = {"engine": json.loads(engine_sidecar_path(artefact).read_text(encoding="utf-8"))["engine"]}
        _stage(f"parity with the reference model on {args.parity_sites} random sites"
               + ("" if real is False else " and the real Landsat-8 chips found"))
        report = check_parity(model, artefact, n_random=args.parity_sites, batch=parity_batch, real_chips=real,
                              seed=args.seed)  # fmt: skip
        print(report.table())
        if not report.passed:
            raise ParityError(
                f"{out} not written: the {fmt} export of {ckpt} fails the parity check ({'; '.join(report.failures())})"
            )
        record = _sidecar(args, fmt, precision, ckpt, model, artefact, report, extra)
        sidecar_tmp = work / (out.name + ".json")
        sidecar_tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(artefact, out)
        os.replace(sidecar_tmp, out.with_name(out.name + ".json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report.summary())
    print(f"wrote {out} ({fmt}, {precision}, {out.stat().st_size / 1e6:.1f} MB) and {out.name}.json")
    return 0
