"""toolchain zoo — list the reference models, or write one as ONNX (trained file if shipped, else its own init)."""

NAME = "zoo"
HELP = "list reference models or export one as ONNX (AlexNet: real architecture, own seeded init)"
EXAMPLE = """examples:
  toolchain zoo list
  toolchain zoo export alexnet -o out/alexnet.onnx --seed 0"""


def add_arguments(p):
    sub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="list the reference models")
    e = sub.add_parser("export", help="write a reference model as ONNX")
    e.add_argument("name", help="model name (see `toolchain zoo list`)")
    e.add_argument("-o", "--output", required=True, help="ONNX file to write")
    e.add_argument("--seed", type=int, default=0, help="seed of the initialisation (models without a shipped file)")
    e.add_argument("--init", action="store_true", help="write a freshly initialised model even if a trained one ships")


def run(args) -> int:
    from toolchain.zoo import get_model_spec, list_models

    if args.zoo_command == "list":
        for name in list_models():
            spec = get_model_spec(name)
            shipped = "trained ONNX shipped" if spec.onnx_path.exists() else "architecture only (own init)"
            print(f"{name:15s} input {list(spec.input_shape)}  {spec.dataset:8s}  {shipped}")
        return 0
    from converters import atomic_write_bytes, check_writable

    spec = get_model_spec(args.name)
    check_writable(args.output)
    if spec.onnx_path.exists() and not args.init:
        atomic_write_bytes(args.output, spec.onnx_path.read_bytes())
        print(f"copied trained {spec.onnx_path} -> {args.output}")
        return 0
    import torch

    from converters import torch_to_onnx

    torch.manual_seed(args.seed)
    model = spec.build().eval()
    torch_to_onnx(model, torch.zeros(1, *spec.input_shape), args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {args.name}, {n:,} parameters, initialised with seed {args.seed}")
    return 0
