"""toolchain import caffe NET.prototxt [WEIGHTS.caffemodel] -o MODEL.onnx — bring a Caffe model in as ONNX."""
from __future__ import annotations

from toolchain.errors import ToolchainError

NAME = "import"
HELP = "convert a Caffe model (.prototxt [+ .caffemodel]) to ONNX"
EXAMPLE = """example:
  toolchain import caffe lenet.prototxt lenet_iter_10000.caffemodel -o lenet.onnx"""


def add_arguments(p):
    p.add_argument("format", choices=["caffe"], help="source format")
    p.add_argument("prototxt", help="network definition (.prototxt; deploy or train/test net)")
    p.add_argument("weights", nargs="?", help="trained weights (.caffemodel); without it, random weights "
                   "drawn as the prototxt's fillers say (xavier when none), from --seed")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="one sample's input shape; needed when a Data layer feeds the net, else overrides "
                   "the declared shape (the batch dimension stays symbolic)")
    p.add_argument("--input-scale", metavar="S",
                   help="our inputs are pixels in [0,1]: multiply them by S in the graph (e.g. 255 for nets "
                   "that expect 0..255). Default 1, or 255 for a net fed by an image Data layer")
    p.add_argument("--mean", metavar="M[,M...]",
                   help="per-channel mean subtracted after scaling, in the net's channel order (e.g. "
                   "104,117,123 for BGR ImageNet nets); overrides a Data layer's mean_value")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights when no .caffemodel is given")


def _numbers(text: str | None, what: str, kind=float) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ToolchainError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ToolchainError(f"{what} is empty")
    return values


def run(args) -> int:
    from toolchain import import_caffe

    from converters import check_writable

    check_writable(args.output)
    shape = _numbers(args.input_shape, "--input-shape", int)
    scale = _numbers(args.input_scale, "--input-scale")
    if scale is not None and len(scale) != 1:
        raise ToolchainError(f"--input-scale takes one number, got {args.input_scale!r}")
    mean = _numbers(args.mean, "--mean")
    result = import_caffe(args.prototxt, args.weights, args.output, input_shape=shape,
                          input_scale=scale[0] if scale else None, mean=mean, seed=args.seed)
    print(result.summary())
    print(f"wrote {args.output}")
    return 0
