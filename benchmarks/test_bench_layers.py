"""Layers: the reference eager sequence against torch.compile of it and the Triton kernels (GPU), forward,
backward and both, fp32 and bf16, paper and native shapes; and the vectorised Gabor bank against a per-filter loop.

Groups: ``layers/<layer>/<pass>/<dtype>/<preset>`` (baseline ``eager``) and ``gabor_bank/<pass>`` (baseline
``loop``).
"""

from __future__ import annotations

import pytest

from fusionkern.bench.cases import (
    LAYER_DTYPES,
    LAYER_VARIANTS,
    LAYERS,
    PASSES,
    gabor_bank_call,
    group_name,
    layer_call,
    quick_skip,
    record,
    variant_unavailable,
)
from fusionkern.bench.timing import measure, peak_memory


# The preset (layer_preset) is parametrised from the plan in conftest.py; its id comes first.
@pytest.mark.parametrize("variant", LAYER_VARIANTS)
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("layer", LAYERS)
def test_layer(benchmark, layer, pass_, dtype, layer_preset, variant, plan, device, timing):
    preset = layer_preset
    record(benchmark, "layers", group_name("layers", layer, pass_, dtype, preset), variant, layer=layer, dtype=dtype,
           preset=preset, device=plan.device, **{"pass": pass_})  # fmt: skip
    reason = variant_unavailable(variant, plan.device, plan) or quick_skip("layers", variant, dtype, plan)
    if reason:
        pytest.skip(reason)
    if variant == "compile":
        benchmark.extra_info["compile_backend"] = plan.compile_backend
    call = layer_call(layer, pass_, dtype, preset, variant, plan, device)
    benchmark.extra_info.update(items=call.items, **call.info)
    measure(benchmark, call.fn, timing, setup=call.setup, repeatable=call.repeatable)
    if pass_ == "full":
        benchmark.extra_info.update(peak_memory(device, call.fn))


@pytest.mark.parametrize("variant", ("loop", "vectorised"))
@pytest.mark.parametrize("pass_", ("fwd", "full"))
def test_gabor_bank(benchmark, pass_, variant, plan, device, timing):
    record(benchmark, "gabor_bank", group_name("gabor_bank", pass_), variant, dtype="fp32", device=plan.device,
           **{"pass": pass_})  # fmt: skip
    call = gabor_bank_call(pass_, variant, plan, device)
    benchmark.extra_info.update(items=call.items, **call.info)
    measure(benchmark, call.fn, timing, setup=call.setup, repeatable=call.repeatable)
