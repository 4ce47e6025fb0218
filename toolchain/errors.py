"""User-facing errors: raised for bad input, printed by the CLI as one line (no traceback)."""
from converters.errors import ModelFormatError, RegistryError, ToolchainError


class DataError(ToolchainError):
    """A data set file is missing, corrupt or does not fit the model."""


class RecipeError(ToolchainError):
    """A compression recipe is invalid."""


class TrainingDiverged(ToolchainError):
    """The loss or gradient became infinite or NaN while training (learning rate too high)."""


__all__ = ["ToolchainError", "ModelFormatError", "RegistryError", "DataError", "RecipeError", "TrainingDiverged"]
