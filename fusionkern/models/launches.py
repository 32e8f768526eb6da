"""Every Triton launch a FusionNet makes, compiled for sm_90 (H100/H200) without a GPU.

1. :func:`record_model_launches` runs a FusionNet on the ``meta`` device (shapes only, no memory, no arithmetic)
   through the fused kernels while :func:`fusionkern.kernels.sm90.recording` stands in for every kernel object: the
   launchers run unchanged, so the recorded arguments, strides, constexprs, grids and kept autotune configs are
   exactly those of a real call at the real shapes.
2. :func:`analyse` records in a fresh interpreter (``TRITON_INTERPRET`` unset) and compiles each distinct launch
   with :func:`fusionkern.kernels.sm90.compile_launches`; ``tests/test_kernels_static.py`` gates on the figures.
3. :func:`write_report` writes the table: ``python -m fusionkern.models.launches --report PATH``.

Occupancy and waves are computed from the H100's limits: what the hardware would allow, not a measurement.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Sequence

import torch

from fusionkern.kernels import sm90
from fusionkern.kernels._common import run_isolated
from fusionkern.kernels.sm90 import PRECISIONS, Launch, LaunchFigures
from fusionkern.models import fused
from fusionkern.models.layers import ChannelAttention, DilatedAvgBlock
from fusionkern.models.networks import ConvStage, FusionNet

__all__ = ["LAYOUTS", "MODES", "PRECISIONS", "PRESET_BATCH", "analyse", "record_model_launches", "write_report"]

MODES = ("eval", "train")

# Activation layouts: torch's default (NCHW), or channels-last from the branches' first layer on (NHWC,
# ``model.to_backend("triton", channels_last=True)``); a run names the second as a fourth field.
LAYOUTS = ("nchw", "nhwc")

# preset -> the batch its launches are analysed at (the real shapes: paper 64 sites, native 256).
PRESET_BATCH = {"paper": 64, "native": 256}


def record_model_launches(preset: str, batch: int, mode: str, precision: str, layout: str = "nchw") -> list[Launch]:
    """Every kernel launch of one FusionNet forward (``eval``) or forward + backward (``train``) at ``batch``.

    The model and its inputs live on the ``meta`` device; only the launchers' bookkeeping runs. ``precision`` is one
    of :data:`~fusionkern.kernels.sm90.PRECISIONS`, ``layout`` one of :data:`LAYOUTS` (an ``nhwc`` run labels its
    layers ``<layer> [nhwc]``).
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = FusionNet(preset).to(dtype)
    model.train(mode == "train")
    layer: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []
    for m in model.modules():
        if isinstance(m, (ConvStage, DilatedAvgBlock, ChannelAttention)):
            m.backend = "triton"  # what model.to_backend("triton") sets, without its CUDA-device check
            hooks.append(m.register_forward_pre_hook(lambda mod, _args: layer.append(names[id(mod)])))
    model.backend = "triton"  # the branches' stages as grouped launches, as to_backend("triton") sets
    model.channels_last = layout == "nhwc"
    sink: list[Launch] = []
    side = model.preset.input_size
    x = torch.empty((batch, len(model.branches), 3, side, side), device="meta", dtype=dtype)
    try:
        with sm90.recording(sink, layer), sm90.conv_precision(precision), fused.layer_notes(layer):
            if mode == "train":
                out = model(x)
                layer.append("backward")
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for h in hooks:
            h.remove()
    for launch in sink:
        launch.where = [[preset, mode, precision] + ([layout] if layout != "nchw" else [])]
        if layout != "nchw":
            launch.layer = f"{launch.layer} [{layout}]"
    return sink


def _child(request: dict) -> dict:
    """Entry of the recording process: ``{"record": [[preset, batch, mode, precision], ...]}`` returns the launches,
    each with the compile key of every config."""
    out = []
    for preset, batch, mode, precision, *layout in request["record"]:
        for launch in record_model_launches(preset, batch, mode, precision, *layout):
            launch.compile_keys = [sm90.compile_key(launch, c) for c in launch.configs]
            out.append(asdict(launch))
    return {"launches": out}


def analyse(
    runs: Sequence[tuple[str, ...]],
    *,
    select=None,
    jobs: int | None = None,
    timeout: float = 1800.0,
    env: dict | None = None,
) -> tuple[list[Launch], list[LaunchFigures | dict]]:
    """Record the launches of ``runs`` (``(preset, mode, precision[, layout])``, batch from :data:`PRESET_BATCH`),
    keep those ``select(launch)`` accepts, and compile each unique one at each of its configs for sm_90.

    Returns the unique launches and one :class:`~fusionkern.kernels.sm90.LaunchFigures` per (launch, config), or a
    dict with ``error`` for one that failed to compile. ``jobs`` processes compile side by side (default: cores, at
    most 4); ``env`` adds environment variables to every process (e.g. a ``PYTHONPATH`` with another triton).
    """
    runs = [[p, PRESET_BATCH[p], m, q, *layout] for p, m, q, *layout in runs]
    (recorded,) = run_isolated(["-m", "fusionkern.models.launches"], [{"record": runs}], "LAUNCHES",
                               "launch recording", timeout, env)  # fmt: skip
    launches = sm90.unique_launches([Launch(**d) for d in recorded["launches"]])
    if select is not None:
        launches = [x for x in launches if select(x)]
    return launches, sm90.compile_launches(launches, jobs=jobs, timeout=timeout, env=env)


def write_report(path: str, runs: Sequence[tuple[str, ...]], env: dict | None = None, jobs: int | None = None):
    """Analyse ``runs`` and write the table (markdown) and every figure (JSON) to ``path``.md / ``path``.json."""
    launches, results = analyse(runs, jobs=jobs, env=env)
    version = sm90.triton_version(env)
    ok = [r for r in results if isinstance(r, LaunchFigures)]
    failed = [r for r in results if not isinstance(r, LaunchFigures)]
    lines = [
        f"Triton {version}, sm_90 (H100 limits for occupancy and waves), runs: "
        + ", ".join(f"{' '.join([p, m, q, *layout])} (batch {PRESET_BATCH[p]})" for p, m, q, *layout in runs) + ".",
        f"{len(launches)} unique launches, {len(ok)} compiled configs, {len(failed)} failures; "
        f"{sum(1 for r in ok if r.spill_stores or r.spill_loads)} configs spill; "
        f"{sum(1 for r in ok if r.has_dot and not r.tensor_cores)} dot configs without tensor cores.",
        "",
        sm90.markdown_table(ok),
        "",
    ]
    lines += [f"* compile failure: {f['kernel']} {f['config']}: {f['error']}" for f in failed]
    with open(path + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with open(path + ".json", "w", encoding="utf-8") as fh:
        json.dump({"triton": version, "runs": runs, "figures": [asdict(r) if isinstance(r, LaunchFigures) else r
                                                                for r in results]}, fh, indent=1)  # fmt: skip
    return results


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fusionkern.models.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--report", metavar="PATH", help="write PATH.md and PATH.json (default: the full sweep)")
    parser.add_argument("--pythonpath", help="prepend to PYTHONPATH of the compiling processes (another triton)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--runs", nargs="+", metavar="PRESET:MODE:PRECISION[:LAYOUT]",
                        help="only these runs, e.g. native:train:tf32 native:eval:bf16 native:eval:bf16:nhwc (the "
                             "static gate's subset)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("give --report PATH")
    runs = [(p, m, q) for p in PRESET_BATCH for m in MODES for q in PRECISIONS]
    if args.runs:
        runs = [tuple(r.split(":")) for r in args.runs]
        bad = [":".join(r) for r in runs if len(r) not in (3, 4) or r[0] not in PRESET_BATCH or r[1] not in MODES
               or r[2] not in PRECISIONS or r[3:] and r[3] not in LAYOUTS]  # fmt: skip
        if bad:
            parser.error(f"--runs: {', '.join(bad)} is not PRESET:MODE:PRECISION[:LAYOUT] with preset one of "
                         f"{', '.join(PRESET_BATCH)}, mode one of {', '.join(MODES)}, precision one of "
                         f"{', '.join(PRECISIONS)}, layout one of {', '.join(LAYOUTS)}")  # fmt: skip
    env = None
    if args.pythonpath:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.pythonpath, os.environ.get("PYTHONPATH")]))}
    write_report(args.report, runs, env, args.jobs)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    if sys.argv[1:]:
        sys.exit(_main(sys.argv[1:]))
    print("LAUNCHES" + json.dumps(_child(json.load(sys.stdin))))
