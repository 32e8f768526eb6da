"""Export engines: FusionNet (and the single-input models) to ONNX and TensorRT, verified against the reference.

* :func:`exportable`: the export-safe form of a model (Gabor bank as a constant weight, BatchNorm folded, mixed
  pooling and attention as standard operators), same outputs.
* :func:`to_onnx`: an ONNX file with a dynamic ``batch`` axis, checked with ``onnx.checker`` (full check) and
  restricted to :data:`ALLOWED_OPS`; :func:`onnx_session` runs it with onnxruntime.
* :func:`check_parity`: the artefact against the reference on random sites and real Landsat-8 chips
  (:class:`ParityReport`).
* :func:`build_engine` and :class:`EngineRunner`: TensorRT 10 / 11 engines built from that ONNX and run with
  ``execute_async_v3`` (need the ``trt`` extra and a CUDA GPU).

The command line front end is ``fusionkern export``.
"""

from fusionkern.export.exportable import exportable
from fusionkern.export.onnx import ALLOWED_OPS, input_name, onnx_session, read_metadata, to_onnx
from fusionkern.export.parity import ParityError, ParityReport, ParityRow, Tolerance, check_parity, real_chips
from fusionkern.export.tensorrt import (
    EngineRunner,
    build_engine,
    check_engine_compatible,
    engine_sidecar_path,
    tensorrt_available,
)

__all__ = [
    "ALLOWED_OPS",
    "EngineRunner",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "Tolerance",
    "build_engine",
    "check_engine_compatible",
    "check_parity",
    "engine_sidecar_path",
    "exportable",
    "input_name",
    "onnx_session",
    "read_metadata",
    "real_chips",
    "tensorrt_available",
    "to_onnx",
]
