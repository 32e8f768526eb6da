"""The roofline: FLOPs and bytes per site per preset, and this machine's matmul peak and copy bandwidth measured
in the same run (the report divides each backend's achieved FLOP/s by them).

Groups: ``roofline/matmul`` (baseline ``fp32``), ``roofline/copy``, ``roofline/costs/<preset>`` (not a timing: the
costs are counted, see :mod:`fusionkern.bench.roofline`).
"""

from __future__ import annotations

import pytest

from fusionkern.bench.cases import record
from fusionkern.bench.roofline import copy_call, matmul_call, site_costs
from fusionkern.bench.timing import measure


@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_matmul_peak(benchmark, dtype, plan, device, timing):
    record(benchmark, "matmul", "roofline/matmul", dtype, dtype=dtype, device=plan.device)
    call = matmul_call(dtype, plan, device)
    benchmark.extra_info.update(items=call.items, **call.info)
    measure(benchmark, call.fn, timing)


def test_copy_bandwidth(benchmark, plan, device, timing):
    record(benchmark, "copy", "roofline/copy", "copy", device=plan.device)
    call = copy_call(plan, device)
    benchmark.extra_info.update(items=call.items, **call.info)
    measure(benchmark, call.fn, timing)


def test_site_costs(benchmark, cost_preset, plan):
    preset = cost_preset
    record(benchmark, "costs", f"roofline/costs/{preset}", "costs", preset=preset, timed=False)
    costs = benchmark.pedantic(site_costs, args=(preset, plan), rounds=1, iterations=1)
    benchmark.extra_info.update(costs)
