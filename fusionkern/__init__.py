"""fusionkern: the FusionNet cement-plant detector on Landsat-8, made fast and practical."""

from fusionkern.errors import CheckpointError, ConfigError, FusionkernError, InputError

__version__ = "0.1.0"

BRANCHES = ("b10", "b11", "b7", "b6", "b76")
"""The five FusionNet inputs, in the order used everywhere: tensors, files, configs."""

CLASSES = ("cement", "landcover")
"""Class index 0 is cement, 1 is landcover (the paper's class weights [3, 1] follow this order)."""

__all__ = [
    "BRANCHES",
    "CLASSES",
    "CheckpointError",
    "ConfigError",
    "FusionkernError",
    "InputError",
    "__version__",
]


def __getattr__(name: str):
    # save_checkpoint / load_checkpoint live with the models; imported lazily so `import fusionkern` stays light.
    if name in ("save_checkpoint", "load_checkpoint", "read_checkpoint"):
        from fusionkern.models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'fusionkern' has no attribute {name!r}")
