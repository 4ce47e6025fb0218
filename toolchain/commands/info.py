"""toolchain info MODEL.onnx — per-layer parameters, non-zeros, MACs and stored bytes, and file size."""
NAME = "info"
HELP = "print per-layer parameters, non-zeros, MACs and file size of an ONNX model"
EXAMPLE = """example:
  toolchain info models/lenet-300-100/lenet-300-100-pruned.onnx --baseline models/lenet-300-100/lenet-300-100.onnx"""


def add_arguments(p):
    p.add_argument("model", help="ONNX file")
    p.add_argument("--baseline", metavar="DENSE.onnx",
                   help="dense original to compare against (default: the one a compressed file records)")


def run(args) -> int:
    import toolchain

    print(toolchain.info(args.model, baseline=args.baseline).table())
    return 0
