"""Physical removal of dead neurons / channels (Han et al. 2015, section 3.5).

A unit of layer L is dead if it has no inputs (its weight row / filter is all zero: it outputs a
constant act(b)) or no outputs (the next layer S ignores it). Such units are sliced out of L and
the matching input columns out of S; a constant output is first folded into S's bias, so the
network computes the same function before any retraining.

Handled between L and S: element-wise ops, max pooling and flatten (a conv channel feeding a
fully-connected layer owns a block of H*W columns). Grouped convolutions, padded convolutions fed
by a constant channel, and anything else (LRN, BatchNorm, concat, graph outputs) are left alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ELEMENTWISE = {"Relu", "LeakyRelu", "Identity", "Dropout", "Sigmoid", "Tanh"}
CONSTANT_PRESERVING = {"MaxPool", "Flatten", "Reshape"}


def _weight(layer: nn.Module) -> torch.Tensor:
    return getattr(layer, "masked_weight", layer.weight).detach()


def _chain(net, name: str, succ: str):
    """The pass-through nodes from layer `name` to `succ`, or None if the path is not a simple chain."""
    nodes = net.nodes_after(name)
    value = net.node(name).outputs[0]
    chain = []
    for _ in range(len(nodes) + 1):
        if value in net.output_names:
            return None
        readers = net.consumers(value)
        if len(readers) != 1:
            return None
        nxt = readers[0]
        if nxt.name == succ:
            return chain if nxt.inputs[0] == value else None
        if nxt.op_type not in ELEMENTWISE | CONSTANT_PRESERVING:
            return None
        if nxt.op_type == "Reshape" and len(getattr(net.ops[nxt.name], "shape", None) or []) != 2:
            return None  # only a flatten to [N, features] with a constant shape
        chain.append(nxt)
        value = nxt.outputs[0]
    return None


def _resize(layer: nn.Module, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> nn.Module:
    """A copy of a Linear/Conv2d (or masked subclass) keeping the given output rows / input columns."""
    w = layer.weight.detach()
    mask = getattr(layer, "mask", None)
    bias = layer.bias.detach() if layer.bias is not None else None
    if keep_out is not None:
        w, bias = w[keep_out], (bias[keep_out] if bias is not None else None)
        mask = mask[keep_out] if mask is not None else None
    if keep_in is not None:
        w = w[:, keep_in]
        mask = mask[:, keep_in] if mask is not None else None
    if isinstance(layer, nn.Linear):
        new = type(layer)(w.shape[1], w.shape[0], bias is not None)
    else:
        new = type(layer)(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, 1, bias is not None, layer.padding_mode)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
        if mask is not None:
            new.mask.copy_(mask)
    new.train(layer.training)
    return new


def _columns(L: nn.Module, S: nn.Module) -> int | None:
    """How many input columns of S each output unit of L owns (None if the shapes don't line up)."""
    units = L.weight.shape[0]
    fan = S.weight.shape[1] if isinstance(S, nn.Linear) else S.in_channels
    if isinstance(S, nn.Conv2d):
        return 1 if fan == units and S.groups == 1 else None
    if fan % units:
        return None
    return fan // units if (isinstance(L, nn.Conv2d) or fan == units) else None


def remove_dead_units(net) -> dict[str, int]:
    """Remove dead units everywhere (repeating until nothing changes); returns units removed per layer."""
    removed: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        layers = net.layers()
        for name, L in layers.items():
            if not isinstance(L, (nn.Linear, nn.Conv2d)) or getattr(L, "groups", 1) != 1:
                continue
            succ = net.next_layers(name)
            if len(succ) != 1 or not isinstance(layers[succ[0]], (nn.Linear, nn.Conv2d)):
                continue
            S = layers[succ[0]]
            chain = _chain(net, name, succ[0])
            cols = _columns(L, S)
            if chain is None or cols is None or (isinstance(L, nn.Linear) and isinstance(S, nn.Conv2d)):
                continue
            wl, ws = _weight(L), _weight(S)
            units = wl.shape[0]
            no_in = (wl.reshape(units, -1) == 0).all(1)
            ws_units = ws.reshape(ws.shape[0], units, cols, -1) if isinstance(S, nn.Linear) else ws
            no_out = (ws_units.transpose(0, 1).reshape(units, -1) == 0).all(1)
            # Constant output act(b) of input-less units, pushed through the element-wise chain.
            b = L.bias.detach() if L.bias is not None else torch.zeros(units)
            const = b.clone()
            for node in chain:
                if node.op_type in ELEMENTWISE:
                    mod = net.ops[node.name]
                    was = mod.training
                    mod.eval()
                    const = mod(const.view(1, -1)).view(-1)
                    mod.train(was)
            fold = no_in & ~no_out & (const != 0)
            padded = isinstance(S, nn.Conv2d) and any(p != 0 for p in S.padding)
            if fold.any() and (S.bias is None or padded):
                no_in = no_in & ~fold  # cannot fold exactly: keep those units
                fold[:] = False
            dead = no_in | no_out
            if not dead.any() or dead.all():
                continue
            with torch.no_grad():
                if fold.any():
                    if isinstance(S, nn.Linear):
                        contrib = ws.reshape(ws.shape[0], units, cols)[:, fold].sum(-1) @ const[fold]
                    else:
                        contrib = ws[:, fold].sum((2, 3)) @ const[fold]
                    S.bias.add_(contrib)
            keep = ~dead
            keep_in = keep.repeat_interleave(cols) if isinstance(S, nn.Linear) else keep
            net.replace_layer(name, _resize(L, keep_out=keep))
            for node in chain:  # a constant flatten shape [N, features] follows the new width
                mod = net.ops[node.name]
                if node.op_type == "Reshape" and mod.shape[1] == ws.shape[1]:
                    mod.shape = [mod.shape[0], int(keep_in.sum())]
            net.replace_layer(succ[0], _resize(S, keep_in=keep_in))
            removed[name] = removed.get(name, 0) + int(dead.sum())
            changed = True
            break  # the layer table is stale now: rescan
    return removed
