import numpy as np
import pytest
import torch

from toolchain.zoo import MODELS_DIR

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist():
    from toolchain.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """2,000 training and 1,000 test images: enough to see retraining work, fast on 2 cores."""
    return (mnist.train_x[:2000], mnist.train_y[:2000], mnist.test_x[:1000], mnist.test_y[:1000])


@pytest.fixture(scope="session")
def lenet300_path():
    return MODELS_DIR / "lenet-300-100" / "lenet-300-100.onnx"


@pytest.fixture(scope="session")
def lenet5_path():
    return MODELS_DIR / "lenet-5" / "lenet-5.onnx"


def rand_images(n, shape=(1, 28, 28), seed=0):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


# Tests that launch several processes (torchrun / torch.multiprocessing) are the suite's slow part:
# `make test` (-m "not slow") leaves them out, `make test-all` runs them.
SLOW_FIXTURES = {"two_proc"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
