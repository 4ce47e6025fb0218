"""Build steps pyproject.toml cannot declare: the custom-op library and the model zoo go into the package.

`pip install .` compiles toolchain/kernels/csrc into toolchain/kernels/lib/libtoolchain_ops.so inside
the wheel, and copies models/ (definitions, recipes, cards, shipped ONNX) to toolchain/_models, so the
fast form and the zoo work from an installed package. Where the library cannot be built (no C++
compiler, no onnxruntime headers) the install still succeeds and lib/BUILD_FAILED.txt records why;
toolchain.kernels.library_path() then says so. `pip install -e .` builds into toolchain/kernels/build
of the checkout, as `make kernels` does.
"""
import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _kernel_build():
    """toolchain/kernels/build.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_toolchain_kernel_build", ROOT / "toolchain" / "kernels" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildWithKernels(build_py):
    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        pkg = ROOT / "toolchain" if editable else Path(self.build_lib) / "toolchain"
        out = pkg / "kernels" / ("build" if editable else "lib")
        kb = _kernel_build()
        try:
            lib = kb.build(out_dir=out)
            (out / "BUILD_FAILED.txt").unlink(missing_ok=True)
            print(f"toolchain: built {lib}", file=sys.stderr)
        except Exception as e:  # no compiler, no headers, no network for npm: the portable form still works
            out.mkdir(parents=True, exist_ok=True)
            (out / "BUILD_FAILED.txt").write_text(f"{type(e).__name__}: {e}\n")
            print(f"toolchain: WARNING: the custom-op library was not built ({e}); the fast form is unavailable, "
                  "the portable form works", file=sys.stderr)
        if not editable:  # an editable install reads models/ from the checkout
            dest = pkg / "_models"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ROOT / "models", dest, ignore=shutil.ignore_patterns("__pycache__", "*.ckpt"))


setup(cmdclass={"build_py": BuildWithKernels})
