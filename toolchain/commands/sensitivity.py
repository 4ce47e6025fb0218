"""toolchain sensitivity MODEL.onnx — prune each layer alone at a sweep of densities, no retraining,
measured on the validation split (choices made from it never see the test set)."""
from pathlib import Path

NAME = "sensitivity"
HELP = "per-layer pruning sensitivity: error vs density for each layer alone (table + PNG)"
EXAMPLE = """example:
  toolchain sensitivity models/lenet-5/lenet-5.onnx --densities 1,.3,.1,.03 -o out/lenet-5-sensitivity.png"""


def add_arguments(p):
    p.add_argument("model", help="dense ONNX model")
    p.add_argument("--densities", default=None,
                   help="comma-separated densities in (0, 1] (default: 1,.5,.3,.2,.1,.05,.03,.02,.01)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: all)")
    p.add_argument("-o", "--output", default="sensitivity.png", help="PNG plot to write (table goes to stdout)")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|cuda:N|auto",
                   help="where to evaluate (default auto: the GPU when there is one, else the CPU)")
    p.add_argument("--data", metavar="DIR", default=None)
    p.add_argument("--val-split", default=None, metavar="N",
                   help="validation images held out of the MNIST training set (a count or a fraction; default: "
                        "the package's 10k validation set): the sweep is measured on them, never on the test set")
    p.add_argument("--mean", default=None, metavar="M[,M...]",
                   help="for models trained on normalised input: the validation images become (x - mean) / std")
    p.add_argument("--std", default=None, metavar="S[,S...]", help="... see --mean")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from toolchain import ToolchainError, load, normalization, normalize
    from toolchain.data import load_mnist, parse_val_split
    from toolchain.distributed import resolve_device
    from toolchain.plots import sensitivity_plot
    from toolchain.sensitivity import DEFAULT_DENSITIES, format_sensitivity, sensitivity

    device = resolve_device(args.device)  # a bad --device fails here, before any work
    densities = DEFAULT_DENSITIES
    if args.densities:
        try:
            densities = tuple(float(x) for x in args.densities.split(","))
        except ValueError:
            raise ToolchainError(f"--densities must be comma-separated numbers, not {args.densities!r}") from None
        bad = [d for d in densities if not 0 < d <= 1]
        if bad:
            raise ToolchainError(f"density {bad[0]} is outside (0, 1]")
    from converters import check_writable

    check_writable(args.output, "plot")
    norm = normalization(args.mean, args.std)
    net = load(args.model)
    layers = args.layers.split(",") if args.layers else None
    for name in layers or []:
        if name not in net.layers():
            raise ToolchainError(f"layer {name!r} is not in the model (layers: {', '.join(net.layers())})")
    _, _, val_x, val_y = load_mnist(args.data).holdout(parse_val_split(args.val_split))
    if norm:
        val_x = normalize(val_x, *norm)
    results, base = sensitivity(net, val_x, val_y, densities, layers, progress=not args.no_progress,
                                device=device)
    print(format_sensitivity(results, base))
    print(f"wrote {sensitivity_plot(results, Path(args.output), base)}")
    return 0
