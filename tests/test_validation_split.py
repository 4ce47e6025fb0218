"""The validation split: held out of training, used for every choice; the test set is measured once."""
import numpy as np
import pytest

import toolchain
from toolchain.data import parse_val_split
from toolchain.data.mnist import validation_count


def test_default_split_is_the_package_validation_set(mnist):
    fx, fy, vx, vy = mnist.holdout()
    assert len(fx) == 50_000 and len(vx) == 10_000
    assert np.array_equal(vx, mnist.train_x[50_000:]) and np.array_equal(mnist.val_y, vy)
    assert not np.shares_memory(vx, mnist.test_x)


def test_val_split_counts_and_fractions():
    assert validation_count(60_000) == 10_000 and validation_count(600) == 100
    assert validation_count(1000, 0.1) == 100 and validation_count(1000, 250) == 250
    assert parse_val_split("0.2") == 0.2 and parse_val_split("5000") == 5000 and parse_val_split(None) is None
    for bad in (0, 1000, 0.0, 1.5, -3):
        with pytest.raises(toolchain.DataError):
            validation_count(1000, bad)
    with pytest.raises(toolchain.DataError):
        parse_val_split("ten")


def test_compress_on_builtin_data_selects_on_validation_and_tests_once(monkeypatch, lenet300_path, mnist):
    from toolchain import driver

    seen = {}
    real = driver.load_training_data

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["sizes"] = (len(out[0]), len(out[2]))
        seen["val_is_train_tail"] = np.array_equal(out[2], mnist.train_x[50_000:])
        return out

    monkeypatch.setattr(driver, "load_training_data", spy)
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "prune", "layers": {"default": {"quality": 0.5}}}]})
    result = toolchain.compress(toolchain.load(lenet300_path), recipe, retrain=False, progress=False)
    assert seen == {"sizes": (50_000, 10_000), "val_is_train_tail": True}
    assert result.test_error is not None and result.error_after is not None
    assert "validation error" in result.table() and "test error" in result.table()
    assert float(result.metadata()["ai.toolchain.test_error"]) == pytest.approx(result.test_error)
