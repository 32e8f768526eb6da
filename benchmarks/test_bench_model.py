"""The model: FusionNet sites/s per backend and precision over batch sizes, and a training step per backend.

Groups: ``model/<preset>/b<batch>`` (baseline ``eager-fp32``; variants ``backend-precision``) and
``train/<preset>`` (baseline ``eager``; fp32; peak memory on CUDA).
"""

from __future__ import annotations

import pytest

from fusionkern.bench.cases import (
    MODEL_VARIANTS,
    TRAIN_VARIANTS,
    flops_fields,
    group_name,
    model_call,
    quick_skip,
    record,
    train_call,
    variant_unavailable,
)
from fusionkern.bench.timing import measure, peak_memory


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
# (preset, model_batch) are parametrised from the plan in conftest.py.
def test_model(benchmark, preset, model_batch, variant, plan, device, timing, artefacts):
    backend, _, precision = variant.partition("-")
    record(benchmark, "model", group_name("model", preset, f"b{model_batch}"), variant, preset=preset,
           batch=model_batch, backend=backend, precision=precision, device=plan.device,
           width=plan.model_width)  # fmt: skip
    reason = variant_unavailable(variant, plan.device, plan) or quick_skip("model", variant, precision, plan)
    if reason:
        pytest.skip(reason)
    call = model_call(preset, model_batch, variant, plan, device, artefacts)
    benchmark.extra_info.update(items=call.items, **flops_fields(preset, plan.model_width), **call.info)
    measure(benchmark, call.fn, timing, setup=call.setup, repeatable=call.repeatable)


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_train_step(benchmark, train_preset, variant, plan, device, timing):
    preset = train_preset
    record(benchmark, "train", group_name("train", preset), variant, preset=preset, precision="fp32",
           device=plan.device, width=plan.model_width)  # fmt: skip
    reason = variant_unavailable(variant, plan.device, plan) or quick_skip("train", variant, "fp32", plan)
    if reason:
        pytest.skip(reason)
    call, step = train_call(preset, variant, plan, device)
    # A training step costs about three forward passes (forward, and a backward twice its size).
    benchmark.extra_info.update(items=call.items, **flops_fields(preset, plan.model_width, passes=3), **call.info)
    measure(benchmark, call.fn, timing, repeatable=False)
    benchmark.extra_info.update(peak_memory(device, step))
