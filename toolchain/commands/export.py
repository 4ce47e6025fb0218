"""toolchain export MODEL.onnx -o OUT.onnx --form fast|portable|dense — re-export a (pruned) model.

Layers whose weights are mostly zero become pruned layers (mask = weight != 0), so any sparse
model, ours or another tool's, can be written in the portable compact form or the fast custom-op form.
The report compares against the dense original the file records (files `toolchain compress` wrote),
else against the input file.
"""
NAME = "export"
HELP = "re-export an ONNX model in the portable sparse form, the fast custom-op form or the dense form"
EXAMPLE = """example:
  toolchain export models/lenet-5/lenet-5-pruned.onnx -o out/lenet-5-fast.onnx --form fast"""


def add_arguments(p):
    p.add_argument("model", help="ONNX model (dense or pruned)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--form", choices=["portable", "fast", "dense"], default="fast",
                   help="fast: custom ops; portable: stock onnxruntime, compact; dense: plain float32 weights with "
                        "their zeros, for tools that need initializers (onnxruntime.quantization)")
    p.add_argument("--max-density", type=float, default=0.9,
                   help="treat layers at or below this density as sparse (default 0.9)")


def run(args) -> int:
    import torch

    import toolchain
    from toolchain.methods.prune import masked_from_dense

    from converters import check_writable

    check_writable(args.output)
    if not 0 < args.max_density <= 1:
        raise toolchain.ToolchainError(f"--max-density must be in (0, 1], not {args.max_density}")
    source = toolchain.read_onnx(args.model)
    net = toolchain.load(source)
    for name, layer in net.layers().items():
        if type(layer) in (torch.nn.Linear, torch.nn.Conv2d):
            nonzero = layer.weight != 0
            if float(nonzero.float().mean()) <= args.max_density:
                masked = masked_from_dense(layer)
                masked.prune_(nonzero)
                net.replace_layer(name, masked)
    # keep the records the input carries (recipe, error, original), under this file's producer
    keep = {p.key: p.value for p in source.metadata_props if p.key.startswith("ai.toolchain.")
            and p.key in ("ai.toolchain.recipe", "ai.toolchain.test_error", "ai.toolchain.original")}
    toolchain.export(net, args.output, form=args.form, metadata=keep)
    report = toolchain.info(args.output)
    if report.baseline is None:  # no recorded original: compare with the input file
        report = toolchain.info(args.output, baseline=args.model)
        print(f"(against the input file {args.model}; it records no dense original)")
    print(report.comparison())
    print(f"wrote {args.output} ({args.form} form)")
    return 0
