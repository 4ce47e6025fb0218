"""Registers the `quantize` pass (toolchain/methods/quantize) with this registry, which loads the
modules of this folder; after the restructure (issue 11) the method registers itself."""
from toolchain.methods.quantize import register

register()
