"""The scan: end-to-end chips/s on a generated raster against the input side alone, raw reads and inference alone,
per backend, on the region as generated and on a DEFLATE-compressed copy.

Group ``scan/<preset>/<backend>/<compression>``, baseline ``inference`` (the predictor on chips already in memory).
The report sets end to end against the smaller of inference alone and raw reads: the scan's limit.
"""

from __future__ import annotations

import pytest

from fusionkern.bench.cases import (
    SCAN_COMPRESSIONS,
    SCAN_VARIANTS,
    group_name,
    record,
    scan_call,
    scan_predictor,
    scan_region,
    scan_unavailable,
    variant_unavailable,
)
from fusionkern.bench.timing import measure
from fusionkern.models import get_preset

SCAN_BACKENDS = {"torch": "eager-fp32", "onnxruntime": "onnxruntime-fp32", "triton": "triton-fp32",
                 "tensorrt": "tensorrt-fp16"}  # fmt: skip


@pytest.fixture(scope="session")
def scan_regions(tmp_path_factory, plan):
    """Generated regions (four bands, three dates, tiled GeoTIFFs) and their manifests, each written once per run
    when a case first needs it."""
    reason = scan_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("scan-regions")
    made = {}

    def get(compression: str):
        if compression not in made:
            made[compression] = scan_region(root / compression, compression, plan)
        return made[compression]

    return get


@pytest.fixture(scope="session")
def predictors(tmp_path_factory):
    """One predictor per (preset, backend), shared by that group's variants (exports happen once)."""
    return {"cache": tmp_path_factory.mktemp("scan-artefacts"), "built": {}}


@pytest.mark.parametrize("variant", SCAN_VARIANTS)
@pytest.mark.parametrize("compression", SCAN_COMPRESSIONS)
@pytest.mark.parametrize("backend", tuple(SCAN_BACKENDS))
def test_scan(benchmark, scan_preset, backend, compression, variant, plan, device, timing, scan_regions, predictors):
    record(benchmark, "scan", group_name("scan", scan_preset, backend, compression), variant, preset=scan_preset,
           backend=backend, compression=compression, device=plan.device, width=plan.model_width)  # fmt: skip
    reason = variant_unavailable(SCAN_BACKENDS[backend], plan.device, plan)
    if backend == "onnxruntime" and plan.device == "cuda":
        reason = "the scanner's onnxruntime backend runs on the CPU: its scan figures come from a CPU run"
    if reason:
        pytest.skip(reason)
    key = (scan_preset, backend)
    if key not in predictors["built"]:
        predictors["built"][key] = scan_predictor(backend, scan_preset, plan, device, predictors["cache"])
    chip_px = get_preset(scan_preset).chip_px
    call = scan_call(variant, scan_regions(compression), predictors["built"][key], chip_px, plan)
    benchmark.extra_info.update(items=call.items, **call.info)
    measure(benchmark, call.fn, timing, setup=call.setup, repeatable=call.repeatable)
