"""Build the sparse-op library (toolchain/kernels/build/libtoolchain_ops.so).

onnxruntime's C API headers are not in its Python wheel. They are taken from $ORT_INCLUDE_DIR when
set (a folder holding onnxruntime_c_api.h from onnxruntime >= 1.29), else from a cache filled once
from the npm package com.github.asus4.onnxruntime@0.4.9 (MIT, ships the ORT 1.29 headers):
$TOOLCHAIN_CACHE/ort-headers-1.29 (default ~/.cache/toolchain/ort-headers-1.29).

    python -m toolchain.kernels.build [--force] [-v]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


class BuildError(RuntimeError):
    """The library cannot be built here (no compiler, no headers, a compile error); says why."""


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside `path`, renamed over it only if the block succeeds.

    (This script runs standalone at install time, before the package is importable, so it keeps its
    own copy of converters.fileio.atomic_path's idea in four lines.)"""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

KERNELS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = KERNELS_DIR / "csrc"
BUILD_DIR = KERNELS_DIR / "build"
LIBRARY_NAME = "libtoolchain_ops.so"

NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
NPM_HEADERS = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
HEADERS_CACHE_NAME = "ort-headers-1.29"
HEADER_FILE = "onnxruntime_c_api.h"

COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
# Sources and their extra flags. Only the ISA files get wider code; each runs after a CPU/OS check (ops.cc).
SOURCES = {
    "ops.cc": [],
    "kernels_portable.cc": [],
    "kernels_avx2.cc": ["-mavx2", "-mfma"],
    "kernels_avx512.cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
}


def cache_root() -> Path:
    return Path(os.environ.get("TOOLCHAIN_CACHE") or Path.home() / ".cache" / "toolchain")


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr)


def find_headers(verbose: bool = False) -> Path:
    """Folder with onnxruntime_c_api.h: $ORT_INCLUDE_DIR, else the cache (fetched with npm if empty)."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        inc = Path(env).expanduser()
        if not (inc / HEADER_FILE).is_file():
            raise BuildError(
                f"ORT_INCLUDE_DIR={env} has no {HEADER_FILE}; point it at onnxruntime's include folder"
            )
        return inc
    cached = cache_root() / HEADERS_CACHE_NAME
    if (cached / HEADER_FILE).is_file():
        return cached
    _fetch_headers(cached, verbose)
    return cached


def _fetch_headers(dest: Path, verbose: bool) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "npm not found (needed once to fetch onnxruntime's C API headers): install Node.js/npm, "
            f"or set ORT_INCLUDE_DIR to a folder with {HEADER_FILE} from onnxruntime >= 1.29"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ort-headers-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        _log(verbose, f"fetching {NPM_PACKAGE} with npm pack (headers only are kept)")
        proc = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", str(tmp)],
            cwd=tmp, capture_output=True, text=True,
        )
        tarballs = list(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError(
                f"npm pack {NPM_PACKAGE} failed ({detail[-1] if detail else 'no output'}); "
                f"check network access to the npm registry or set ORT_INCLUDE_DIR"
            )
        out = tmp / "headers"
        out.mkdir()
        n = 0
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for member in tar:
                if not (member.isfile() and member.name.startswith(NPM_HEADERS)):
                    continue
                name = member.name[len(NPM_HEADERS):]
                if "/" in name or not name.endswith(".h"):
                    continue
                src = tar.extractfile(member)
                (out / name).write_bytes(src.read())
                n += 1
        if not (out / HEADER_FILE).is_file():
            raise BuildError(f"{NPM_PACKAGE} did not contain {NPM_HEADERS}{HEADER_FILE}; set ORT_INCLUDE_DIR")
        _log(verbose, f"extracted {n} headers to {dest}")
        try:
            out.rename(dest)
        except OSError:
            if not (dest / HEADER_FILE).is_file():  # another process may have filled the cache meanwhile
                raise


def library_file(out_dir: Path | None = None) -> Path:
    return (out_dir or BUILD_DIR) / LIBRARY_NAME


def sources() -> list[Path]:
    """Files the library depends on (this script included: it holds the compiler flags)."""
    return [SOURCE_DIR / name for name in SOURCES] + [SOURCE_DIR / "kernels.h", Path(__file__).resolve()]


def is_stale(lib: Path | None = None) -> bool:
    lib = lib or library_file()
    if not lib.is_file():
        return True
    built = lib.stat().st_mtime
    return any(src.stat().st_mtime > built for src in sources())


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(
            f"C++ compiler '{cxx}' not found: install g++ (e.g. apt-get install g++) or set CXX to a C++17 compiler"
        )
    return path


def _run(cmd: list[str], verbose: bool) -> None:
    _log(verbose, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if verbose and (proc.stdout or proc.stderr):
        print(proc.stdout + proc.stderr, file=sys.stderr)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.strip().splitlines()
        first = errors[0] if errors else f"exit status {proc.returncode}"
        raise BuildError(f"building {LIBRARY_NAME} failed: {first} (run python -m toolchain.kernels.build -v)")


def build(force: bool = False, verbose: bool = False, out_dir: Path | None = None) -> Path:
    """Compile the library into `out_dir` (default: toolchain/kernels/build) if it is missing or older
    than its sources (or `force`); return its path."""
    lib = library_file(out_dir)
    if not force and not is_stale(lib):
        return lib
    cxx = _compiler()
    include = find_headers(verbose)
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="objs-", dir=lib.parent) as tmp:
        objects = []
        for name, extra in SOURCES.items():
            obj = Path(tmp) / (Path(name).stem + ".o")
            src = str(SOURCE_DIR / name)
            _run([cxx, *COMMON_FLAGS, *extra, "-I", str(include), "-c", src, "-o", str(obj)], verbose)
            objects.append(str(obj))
        with atomic_path(lib) as out:
            _run([cxx, "-shared", "-o", str(out), *objects, "-Wl,-z,defs", "-Wl,--as-needed"], verbose)
    _log(verbose, f"built {lib}")
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolchain.kernels.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the library is up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="show compiler commands and output")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to put the library (default: %(default)s, "
                        "i.e. toolchain/kernels/build)")
    args = parser.parse_args(argv)
    try:
        print(build(force=args.force, verbose=args.verbose, out_dir=args.out_dir))
    except BuildError as e:
        print(f"toolchain.kernels.build: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
