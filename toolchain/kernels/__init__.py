"""Fast sparse inference in onnxruntime: a custom-op library with SparseLinear, SparseConv and the
packed SparseLinearCodebook / SparseLinearInt8 (packed.py encodes those).

    import onnxruntime as ort
    from toolchain import kernels
    so = ort.SessionOptions()
    kernels.register(so)            # builds the library on first use (g++, see build.py)
    sess = ort.InferenceSession("model.onnx", so)

The ops live in domain DOMAIN, version OPSET_VERSION; csr.py builds their nodes. See docs/kernels.md.
Environment: TOOLCHAIN_KERNELS_ISA=auto|avx512|avx2|portable picks the kernels (read when a session is
created); TOOLCHAIN_KERNELS_CONV=auto|im2col|direct forces a SparseConv algorithm.
"""
from __future__ import annotations

from pathlib import Path

DOMAIN = "ai.toolchain"
OPSET_VERSION = 1


def library_path(build: bool = True) -> Path:
    """Path of libtoolchain_ops.so; with `build`, (re)compile it first if missing or older than its sources.

    Without `build` the path is returned even if the file does not exist yet.
    """
    from toolchain.kernels import build as _build  # imported here so `python -m toolchain.kernels.build` runs cleanly

    if build:
        return _build.build()
    return _build.library_file()


def register(sess_options) -> Path:
    """Register the sparse ops with an onnxruntime.SessionOptions (building the library if needed)."""
    path = library_path(build=True)
    sess_options.register_custom_ops_library(str(path))
    return path


def session_options(intra_op_num_threads: int | None = None):
    """onnxruntime.SessionOptions with the sparse ops registered (and optionally the intra-op thread count)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    register(so)
    return so


__all__ = ["DOMAIN", "OPSET_VERSION", "library_path", "register", "session_options"]
