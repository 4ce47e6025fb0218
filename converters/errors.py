"""Base errors: raised for bad input, printed by the CLI as one line (no traceback).

They live at the bottom of the import graph so that the converters can raise them;
`toolchain.errors` re-exports them beside the errors of the compression driver.
"""


class ToolchainError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class ModelFormatError(ToolchainError):
    """A model file (ONNX, Caffe) is malformed or uses something unsupported."""


class RegistryError(ToolchainError):
    """A name registered twice, or looked up but never registered."""
