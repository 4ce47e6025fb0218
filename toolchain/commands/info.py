"""toolchain info MODEL.onnx — per-layer parameters, non-zeros, MACs and stored bytes, and file size."""
from ..measure import format_table, measure

NAME = "info"
HELP = "print per-layer parameters, non-zeros, MACs and file size of an ONNX model"


def add_arguments(p):
    p.add_argument("model", help="ONNX file")
    p.add_argument("--baseline", metavar="DENSE.onnx", help="dense original to compare against")


def run(args) -> int:
    stats, totals = measure(args.model)
    base = measure(args.baseline)[1] if args.baseline else None
    print(format_table(stats, totals, base))
    return 0
