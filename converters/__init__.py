"""Model converters: ONNX <-> Network (the toolchain's trainable IR), torch -> ONNX.

    net = import_onnx("lenet-5.onnx")        # Network; net.layers() -> {"conv1": nn.Conv2d, ...}
    export_onnx(net, "out.onnx", opset=17)   # our emitter, one registered per module type
"""
from .fileio import atomic_path, atomic_write_bytes, atomic_write_text, check_writable
from .ir import Network, Node, register_layer_type
from .onnx_export import ExportContext, export_onnx, torch_to_onnx
from .onnx_import import import_onnx
from .torch_import import from_module
from .ops.registry import Converted, OnnxNode, register_converter, register_emitter, supported_ops

__all__ = [
    "Network", "Node", "atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable", "register_layer_type", "import_onnx", "from_module", "export_onnx", "torch_to_onnx", "ExportContext",
    "register_converter", "register_emitter", "supported_ops", "Converted", "OnnxNode",
]
