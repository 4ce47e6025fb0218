"""CSR storage for the sparse ops and builders for their ONNX nodes.

Node layout (domain "ai.toolchain", version 1), inputs in this order:
    X, values [nnz] float32, col_idx [nnz] uint16 (when the column count <= 65536) or int32,
    row_ptr [M+1] int32, optional bias [M] float32.
SparseLinear: attribute in_features (K); W is the CSR matrix [M, K]; Y = X W^T + bias.
SparseConv:   attributes kernel_shape, strides, pads, dilations, group, in_channels; W is the conv
              weight [M, C/group, kh, kw] reshaped to [M, C/group*kh*kw]; Y as ONNX Conv. Optional
              max_pool [ph, pw]: Y is then the conv output max-pooled with that window and those
              strides (no padding, floor mode, a NaN in a window gives NaN), the fused Conv -> MaxPool
              of toolchain.kernels.graph.
Both take an optional string attribute activation: "Relu" applies a ReLU to Y (y < 0 ? 0 : y) in the
output pass (the fused Relu of toolchain.kernels.graph).
The CSR tensors must be initializers (the ops read and validate them when the session is created).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.errors import ModelFormatError
from toolchain.kernels import DOMAIN, OPSET_VERSION

DEFAULT_OPSET = 17
IR_VERSION = 8
UINT16_MAX_COLS = 65536


def index_dtype_for(n_cols: int) -> np.dtype:
    """uint16 column indices when every index fits (n_cols <= 65536), else int32."""
    return np.dtype(np.uint16) if n_cols <= UINT16_MAX_COLS else np.dtype(np.int32)


def _index_dtype(n_cols: int, index_dtype) -> np.dtype:
    if index_dtype is None:
        return index_dtype_for(n_cols)
    dt = np.dtype(index_dtype)
    if dt not in (np.dtype(np.uint16), np.dtype(np.int32)):
        raise ModelFormatError(f"col_idx dtype must be uint16 or int32, got {dt}")
    if dt == np.uint16 and n_cols > UINT16_MAX_COLS:
        raise ModelFormatError(f"uint16 column indices cannot address {n_cols} columns (max {UINT16_MAX_COLS})")
    return dt


def dense_to_csr(w2d: np.ndarray, index_dtype=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float32, col_idx uint16|int32, row_ptr int32) of the non-zeros of a 2-D matrix, row by row.

    col_idx is uint16 when the matrix has <= 65536 columns unless `index_dtype` says otherwise.
    """
    w = np.asarray(w2d)
    if w.ndim != 2:
        raise ModelFormatError(f"dense_to_csr needs a 2-D matrix, got shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    dt = _index_dtype(w.shape[1], index_dtype)
    mask = w != 0
    if np.count_nonzero(mask) > np.iinfo(np.int32).max:
        raise ModelFormatError("more than 2^31-1 non-zeros do not fit int32 row_ptr")
    rows, cols = np.nonzero(mask)  # row-major order
    values = np.ascontiguousarray(w[rows, cols], dtype=np.float32)
    col_idx = cols.astype(dt)
    row_ptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=row_ptr[1:])
    return values, col_idx, row_ptr


def validate_csr(values, col_idx, row_ptr, n_cols: int, where: str = "CSR weight") -> tuple:
    """THE check of a CSR triple, for every Python reader of the fast form (the SparseLinear / SparseConv
    importer, csr_to_dense): 1-D arrays, as many values as column indices, row_ptr from 0 to nnz and
    non-decreasing, every column index in [0, n_cols) (a negative index is an error, never wrapped),
    integer index types. Returns (values float32, col_idx int64, row_ptr int64)."""
    values, col_idx, row_ptr = (np.asarray(a) for a in (values, col_idx, row_ptr))
    if values.ndim != 1 or col_idx.ndim != 1 or row_ptr.ndim != 1:
        raise ModelFormatError(f"{where}: values, col_idx and row_ptr must be 1-D")
    if col_idx.dtype.kind not in "iu" or row_ptr.dtype.kind not in "iu":
        raise ModelFormatError(f"{where}: col_idx and row_ptr must be integer arrays")
    if len(row_ptr) < 1:
        raise ModelFormatError(f"{where}: row_ptr is empty")
    if len(values) != len(col_idx):
        raise ModelFormatError(f"{where}: {len(values)} values but {len(col_idx)} column indices")
    rp = row_ptr.astype(np.int64)
    if rp[0] != 0 or rp[-1] != len(values) or np.any(np.diff(rp) < 0):
        raise ModelFormatError(f"{where}: row_ptr must rise from 0 to the {len(values)} non-zeros")
    ci = col_idx.astype(np.int64)
    if ci.size and (ci.min() < 0 or ci.max() >= n_cols):
        bad = int(ci.min()) if ci.min() < 0 else int(ci.max())
        raise ModelFormatError(f"{where}: column index {bad} is outside [0, {n_cols})")
    return values.astype(np.float32, copy=False), ci, rp


def csr_to_dense(values: np.ndarray, col_idx: np.ndarray, row_ptr: np.ndarray, n_cols: int) -> np.ndarray:
    """Dense [M, n_cols] float32 matrix of a CSR triple (duplicates are summed)."""
    values, col_idx, row_ptr = validate_csr(values, col_idx, row_ptr, n_cols)
    m = len(row_ptr) - 1
    out = np.zeros((m, n_cols), dtype=np.float32)
    rows = np.repeat(np.arange(m), np.diff(row_ptr))
    np.add.at(out, (rows, col_idx), values)
    return out


def _csr_initializers(name: str, w2d: np.ndarray, bias, index_dtype) -> tuple[list[str], list[TensorProto]]:
    values, col_idx, row_ptr = dense_to_csr(w2d, index_dtype)
    tensors = [
        numpy_helper.from_array(values, f"{name}.values"),
        numpy_helper.from_array(col_idx, f"{name}.col_idx"),
        numpy_helper.from_array(row_ptr, f"{name}.row_ptr"),
    ]
    if bias is not None:
        b = np.asarray(bias, dtype=np.float32)
        if b.shape != (w2d.shape[0],):
            raise ModelFormatError(f"{name}: bias must have shape ({w2d.shape[0]},), got {b.shape}")
        tensors.append(numpy_helper.from_array(b, f"{name}.bias"))
    return [t.name for t in tensors], tensors


def sparse_linear_node(input_name: str, output_name: str, weight: np.ndarray, bias: np.ndarray | None = None,
                       *, name: str = "fc", index_dtype=None,
                       activation: str | None = None) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """SparseLinear node for Y = X weight^T + bias (weight dense [M, K], zeros dropped) and its initializers."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ModelFormatError(f"{name}: linear weight must be 2-D [out, in], got shape {w.shape}")
    inputs, tensors = _csr_initializers(name, w, bias, index_dtype)
    node = helper.make_node("SparseLinear", [input_name, *inputs], [output_name], name=name, domain=DOMAIN,
                            in_features=int(w.shape[1]))
    if activation:
        node.attribute.append(helper.make_attribute("activation", activation))
    return node, tensors


def sparse_conv_node(input_name: str, output_name: str, weight: np.ndarray, bias: np.ndarray | None = None, *,
                     strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                     dilations: Sequence[int] = (1, 1), group: int = 1, name: str = "conv",
                     index_dtype=None, max_pool: Sequence[int] | None = None,
                     activation: str | None = None) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """SparseConv node for an ONNX-Conv-equivalent layer with weight [M, C/group, kh, kw] and its initializers.

    pads are in ONNX order [top, left, bottom, right]; max_pool [ph, pw] fuses a following max pool.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4:
        raise ModelFormatError(f"{name}: conv weight must be 4-D [M, C/group, kh, kw], got shape {w.shape}")
    if group < 1 or w.shape[0] % group:
        raise ModelFormatError(f"{name}: group={group} must divide the {w.shape[0]} output channels")
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ModelFormatError(f"{name}: need 2 strides, 2 dilations and 4 pads (2-D convolution)")
    inputs, tensors = _csr_initializers(name, w.reshape(w.shape[0], -1), bias, index_dtype)
    node = helper.make_node(
        "SparseConv", [input_name, *inputs], [output_name], name=name, domain=DOMAIN,
        kernel_shape=[int(w.shape[2]), int(w.shape[3])], strides=[int(s) for s in strides],
        pads=[int(p) for p in pads], dilations=[int(d) for d in dilations], group=int(group),
        in_channels=int(w.shape[1] * group),
    )
    if max_pool is not None:
        node.attribute.append(helper.make_attribute("max_pool", [int(p) for p in max_pool]))
    if activation:
        node.attribute.append(helper.make_attribute("activation", activation))
    return node, tensors


def opset_imports(default_opset: int = DEFAULT_OPSET) -> list[onnx.OperatorSetIdProto]:
    """Opset imports for a model using the sparse ops."""
    return [helper.make_opsetid("", default_opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)]


def _model(node, tensors, x_shape, y_shape, graph_name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], graph_name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        initializer=tensors,
    )
    return helper.make_model(graph, opset_imports=opset_imports(), ir_version=IR_VERSION,
                             producer_name="toolchain.kernels")


def make_sparse_linear_model(weight: np.ndarray, bias: np.ndarray | None = None, *, index_dtype=None,
                             batch: int | str = "N", name: str = "fc", activation: str | None = None) -> onnx.ModelProto:
    """One-node model X [batch, K] -> Y [batch, M] with a SparseLinear of dense `weight` [M, K]."""
    node, tensors = sparse_linear_node("X", "Y", weight, bias, name=name, index_dtype=index_dtype, activation=activation)
    m, k = np.shape(weight)
    return _model(node, tensors, [batch, k], [batch, m], "sparse_linear")


def conv_output_hw(hw: Sequence[int], kernel: Sequence[int], strides=(1, 1), pads=(0, 0, 0, 0),
                   dilations=(1, 1)) -> tuple[int, int]:
    """(OH, OW) of an ONNX Conv / SparseConv on an input of spatial size hw (pads [top, left, bottom,
    right]), before any fused max pool."""
    return tuple((hw[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(2))


def make_sparse_conv_model(weight: np.ndarray, bias: np.ndarray | None = None, *, input_hw=("H", "W"),
                           strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                           index_dtype=None, batch: int | str = "N", name: str = "conv",
                           max_pool: Sequence[int] | None = None, activation: str | None = None) -> onnx.ModelProto:
    """One-node model X [batch, C, H, W] -> Y with a SparseConv of dense `weight` [M, C/group, kh, kw]."""
    node, tensors = sparse_conv_node("X", "Y", weight, bias, strides=strides, pads=pads, dilations=dilations,
                                     group=group, name=name, index_dtype=index_dtype, max_pool=max_pool,
                                     activation=activation)
    m, cg, kh, kw = np.shape(weight)
    h, w = input_hw
    if isinstance(h, int) and isinstance(w, int):
        oh, ow = conv_output_hw((h, w), (kh, kw), strides, pads, dilations)
        y_shape = [batch, m, oh // max_pool[0], ow // max_pool[1]] if max_pool else [batch, m, oh, ow]
    else:
        y_shape = [batch, m, "OH", "OW"]
    return _model(node, tensors, [batch, cg * group, h, w], y_shape, "sparse_conv")


__all__ = [
    "DOMAIN", "OPSET_VERSION", "index_dtype_for", "dense_to_csr", "csr_to_dense", "sparse_linear_node",
    "sparse_conv_node", "conv_output_hw", "opset_imports", "make_sparse_linear_model", "make_sparse_conv_model",
]
