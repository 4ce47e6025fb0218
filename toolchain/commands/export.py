"""toolchain export MODEL.onnx -o OUT.onnx --form fast|portable — re-export a (pruned) model.

Layers whose weights are mostly zero become pruned layers (mask = weight != 0), so any sparse
model, ours or another tool's, can be written in the portable compact form or the fast custom-op form.
"""
NAME = "export"
HELP = "re-export an ONNX model in the portable sparse form or the fast custom-op form"


def add_arguments(p):
    p.add_argument("model", help="ONNX model (dense or pruned)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--form", choices=["portable", "fast"], default="fast")
    p.add_argument("--max-density", type=float, default=0.9,
                   help="treat layers at or below this density as sparse (default 0.9)")


def run(args) -> int:
    import torch

    from converters import import_onnx

    from ..errors import ToolchainError
    from ..exporter import export_compressed
    from ..methods.prune.layers import masked_from_dense
    from ..measure import format_comparison, measure

    if not 0 < args.max_density <= 1:
        raise ToolchainError(f"--max-density must be in (0, 1], not {args.max_density}")
    net = import_onnx(args.model)
    for name, layer in net.layers().items():
        if type(layer) in (torch.nn.Linear, torch.nn.Conv2d):
            nonzero = layer.weight != 0
            if float(nonzero.float().mean()) <= args.max_density:
                masked = masked_from_dense(layer)
                masked.prune_(nonzero)
                net.replace_layer(name, masked)
    export_compressed(net, args.output, form=args.form)
    print(format_comparison(measure(args.model), measure(args.output)))
    print(f"wrote {args.output} ({args.form} form)")
    return 0
