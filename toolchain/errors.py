"""User-facing errors: raised for bad input, printed by the CLI as one line (no traceback)."""


class ToolchainError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class DataError(ToolchainError):
    """A data set file is missing, corrupt or does not fit the model."""


class ModelFormatError(ToolchainError):
    """A model file (ONNX, Caffe) is malformed or uses something unsupported."""


class RecipeError(ToolchainError):
    """A compression recipe is invalid."""


class TrainingDiverged(ToolchainError):
    """The loss or gradient became infinite or NaN while training (learning rate too high)."""
