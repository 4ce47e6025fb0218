"""toolchain: a Caffe-style model compression toolchain (import -> passes -> export -> measure)."""
__version__ = "0.1.0"
