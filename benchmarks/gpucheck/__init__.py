"""The GPU check behind ``benchmarks/gpu_check.sh``: every GPU figure of the project in one call, within a budget.

Phases, each a subprocess that writes its results before the next one starts (a run cut short still leaves
figures and a report):

* ``setup`` (:mod:`.install`, :mod:`.environment`): the checkout made importable without a package index (a link
  folder on ``PYTHONPATH``, wheels from ``.whl/`` for what the Python lacks), versions and ``nvidia-smi``.
* ``correctness`` (:mod:`.correctness`): every kernel and every config its launcher can pick, at the real layer
  shapes of both presets, against the PyTorch reference, forward and backward; a failing autotune config is
  excluded from autotuning in the later phases.
* ``timings`` and ``scan`` (:mod:`.timings`): the speed goals and the model figures, timed with CUDA events in
  priority order until the phase's time is spent.
* ``report`` (:mod:`.report`): ``report.md``, ``bench.json``, ``bench.md``, ``bench.png``, ``correctness.md``,
  ``env.txt`` and ``check.log`` in one folder.

:mod:`.plan` holds the budget and the phase plan; ``python -m gpucheck --help`` lists the options.
Only :mod:`.install`, :mod:`.plan` and :mod:`.main` are imported before the checkout is importable: they use the
standard library alone.
"""
