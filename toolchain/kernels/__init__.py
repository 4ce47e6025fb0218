"""Fast sparse inference in onnxruntime: a custom-op library with SparseLinear, SparseConv and the
packed SparseLinearCodebook / SparseLinearInt8. The Python side of each op lives with the method
that emits it: toolchain/methods/prune/csr.py (SparseLinear / SparseConv nodes) and
toolchain/methods/quantize/packed.py (the packed layouts' encoders, reference decoders and nodes).

    import onnxruntime as ort
    from toolchain import kernels
    so = ort.SessionOptions()
    kernels.register(so)            # builds the library on first use (g++, see build.py)
    sess = ort.InferenceSession("model.onnx", so)

The ops live in domain DOMAIN, version OPSET_VERSION (defined here, once). See docs/kernels.md.
Environment: TOOLCHAIN_KERNELS_ISA=auto|avx512|avx2|portable picks the kernels (read when a session is
created); TOOLCHAIN_KERNELS_CONV=auto|im2col|direct|batch forces a SparseConv algorithm;
TOOLCHAIN_KERNELS_LINEAR=auto|rowwise|tile forces the linear ops' small-batch path (auto: batches of 2 and 3
run one batch-1 product per row of X); TOOLCHAIN_KERNELS_HUGEPAGES=0 keeps the repacked weights off
transparent huge pages (default 1).
"""
from __future__ import annotations

from pathlib import Path

DOMAIN = "ai.toolchain"
OPSET_VERSION = 1


# `pip install .` compiles the library into the installed package (setup.py); a checkout builds it
# into toolchain/kernels/build/ (make kernels, or on first use). BUILD_FAILED.txt there says why an
# install could not build it.
INSTALLED_DIR = Path(__file__).resolve().parent / "lib"


def library_path(build: bool = True) -> Path:
    """Path of libtoolchain_ops.so.

    The copy the install built wins; otherwise (a source checkout, or an install that could not
    compile it) the library in toolchain/kernels/build, (re)compiled first if missing or older than
    its sources when `build` is true. Raises ToolchainError saying why when there is none and it
    cannot be built (no C++ compiler, no onnxruntime headers): only the fast form needs it, the
    portable form runs in stock onnxruntime. Without `build` the path is returned even if the file
    does not exist yet.
    """
    from toolchain.errors import ToolchainError
    from toolchain.kernels import build as _build  # imported here so `python -m toolchain.kernels.build` runs cleanly

    installed = _build.library_file(INSTALLED_DIR)
    if installed.is_file():
        return installed
    if not build:
        return _build.library_file()
    try:
        return _build.build()
    except (_build.BuildError, OSError) as e:
        why = INSTALLED_DIR / "BUILD_FAILED.txt"
        at_install = f" (at install time: {why.read_text().strip()})" if why.is_file() else ""
        raise ToolchainError(f"the fast form's custom-op library is unavailable: {e}{at_install}. The portable "
                             "form needs no library (toolchain export --form portable)") from None


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
