"""toolchain: a Caffe-style model compression toolchain (import -> passes -> export -> measure).

Compress a model you already have in about ten lines::

    import torch.nn as nn
    import toolchain

    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "prune", "rounds": 2,
                                         "layers": {"default": {"quality": 1.0}}, "retrain": {"epochs": 1}}]})
    result = toolchain.compress(model, recipe)          # built-in MNIST, or data=(inputs, labels)
    print(result.table())
    toolchain.export(result.model, "mlp.onnx", result=result)
    net = toolchain.load("mlp.onnx")

See README.md ("Python API") and the docstrings of `compress`, `export` and `load`.
"""
from ._version import __version__  # noqa: E402

# -- the workflow: compress a module, write it as ONNX, read any file back
from .api import (CompressionResult, ModelInfo, compress, evaluate, export, file_metadata, fit, import_caffe,  # noqa: E402
                  info, load, read_onnx, session, set_metadata, train_config)
from .train import TrainConfig  # noqa: E402
from .accuracy import normalization, normalize  # noqa: E402  (--mean / --std)
# -- recipes and the methods they name
from .methods import CompressionPass, available_passes, register_pass  # noqa: E402
from .recipe import Recipe  # noqa: E402
# -- errors (one line each from the CLI)
from .errors import DataError, ModelFormatError, RecipeError, ToolchainError, TrainingDiverged  # noqa: E402
# -- the intermediate representation (what `load` returns)
from converters import Network  # noqa: E402

__all__ = [
    # workflow
    "compress", "export", "load", "CompressionResult", "file_metadata", "set_metadata",
    # measuring, training and importing
    "evaluate", "info", "ModelInfo", "read_onnx", "train_config", "session", "fit", "TrainConfig", "import_caffe",
    "normalization", "normalize",
    # recipes and methods
    "Recipe", "CompressionPass", "register_pass", "available_passes",
    # errors
    "ToolchainError", "ModelFormatError", "RecipeError", "DataError", "TrainingDiverged",
    # IR
    "Network",
    "__version__",
]
