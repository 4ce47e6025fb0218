"""toolchain train MODEL — train a zoo model on MNIST with its recipe (models/MODEL/train.toml), export ONNX."""
from pathlib import Path

NAME = "train"
HELP = "train a reference model from the zoo (resumable, seeded) and export it as ONNX"
EXAMPLE = """example:
  toolchain train lenet-5 -o out/lenet-5.onnx --epochs 1"""


def add_arguments(p):
    p.add_argument("model", help="zoo model name (lenet-300-100, lenet-5)")
    p.add_argument("-o", "--output", default=None, help="ONNX file (default: models/MODEL/MODEL.onnx)")
    p.add_argument("--config", default=None, help="training TOML (default: models/MODEL/train.toml)")
    p.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUTPUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|cuda:N|auto",
                   help="where to train (default auto: the GPU when there is one, else the CPU)")
    p.add_argument("--data", metavar="DIR", default=None)
    p.add_argument("--val-split", default=None, metavar="N",
                   help="validation images held out of the MNIST training set (a count or a fraction; default: the "
                        "package's 10k validation set): trained on the rest, the validation error reported beside "
                        "the test error, which is measured once")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import torch

    from converters import check_writable, torch_to_onnx
    from toolchain import ToolchainError, evaluate, fit, set_metadata, train_config
    from toolchain.data import load_mnist, parse_val_split
    from toolchain.distributed import resolve_device
    from toolchain.zoo import create_model, get_model_spec

    device = resolve_device(args.device)  # a bad --device fails here, before any work

    spec = get_model_spec(args.model)
    if spec.dataset != "mnist":
        raise ToolchainError(f"{args.model} trains on {spec.dataset}; see docs/scaling.md for distributed training")
    cfg = train_config(args.config or spec.folder / "train.toml", epochs=args.epochs, seed=args.seed)
    out = Path(args.output or spec.onnx_path)
    ckpt = args.checkpoint or f"{out}.ckpt"
    check_writable(out)
    check_writable(ckpt, "checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist(args.data)
    fit_x, fit_y, val_x, val_y = data.holdout(parse_val_split(args.val_split))  # validation: never trained on
    torch.manual_seed(cfg.seed)
    model = create_model(args.model).to(device)  # trained and evaluated where it is
    fit(model, (fit_x, fit_y), cfg, checkpoint=ckpt, resume=args.resume, progress=not args.no_progress)
    model.cpu()  # evaluated and exported from the CPU
    val_err = evaluate(model, (val_x, val_y))
    err = evaluate(model, (data.test_x, data.test_y))
    torch_to_onnx(model.eval(), torch.zeros(1, *spec.input_shape), out)
    set_metadata(out, test_error=err, train_images=len(fit_x), validation_error=val_err)
    Path(ckpt).unlink(missing_ok=True)  # finished: the checkpoint has served its purpose
    print(f"{args.model}: trained on {len(fit_x)} images; validation error {100 * val_err:.2f}% "
          f"({len(val_x)} held out), test error {100 * err:.2f}% -> wrote {out}")
    return 0
