"""Caffe import (prototxt + caffemodel -> ONNX) and export of our PyTorch models as Caffe files.

Reads and writes Caffe's formats with the ``protobuf`` package and a schema built in
:mod:`converters.caffe.schema`; Caffe itself is not needed.
"""
from .prototxt import Blob, Layer, Net, filter_layers, parse_net_text, parse_prototxt, read_caffemodel
from .to_onnx import SUPPORTED_LAYERS, ImportResult, Preprocess, convert_caffe, import_caffe
from .writer import CaffeExport, export_caffe, write_caffe

__all__ = [
    "Blob", "Layer", "Net", "filter_layers", "parse_net_text", "parse_prototxt", "read_caffemodel",
    "SUPPORTED_LAYERS", "ImportResult", "Preprocess", "convert_caffe", "import_caffe",
    "CaffeExport", "export_caffe", "write_caffe",
]
