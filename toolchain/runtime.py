"""onnxruntime helpers: load and check ONNX files, create sessions (registering our custom-op
library when a model uses it), run a model on arrays in batches."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from .errors import ModelFormatError
from .kernels import DOMAIN as CUSTOM_DOMAIN  # defined once, in toolchain.kernels


def load_onnx(src: str | os.PathLike | bytes | onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    """Parse an ONNX model; a missing, truncated or invalid file raises ModelFormatError."""
    if isinstance(src, onnx.ModelProto):
        model, label = src, "model"
    else:
        label = "bytes" if isinstance(src, bytes) else str(src)
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
        except FileNotFoundError:
            raise ModelFormatError(f"{label}: no such file") from None
        except OSError as e:
            raise ModelFormatError(f"{label}: cannot read ({e.strerror})") from None
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception:
            raise ModelFormatError(f"{label}: not an ONNX model (protobuf parse failed; truncated or wrong format?)") from None
        if not model.graph.node and not model.graph.output:
            raise ModelFormatError(f"{label}: not an ONNX model (no graph)")
        if not isinstance(src, bytes) and any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(Path(src).parent))
            except Exception as e:
                raise ModelFormatError(f"{label}: cannot read its external weight data: {str(e).splitlines()[0]}") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as e:  # onnx raises ValidationError and friends
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFormatError(f"{label}: invalid ONNX graph: {msg}") from None
    return model


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == CUSTOM_DOMAIN for n in model.graph.node)


def session_options(threads: int | None = None, custom_ops: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if custom_ops:
        from . import kernels

        kernels.register(so)
    return so


def make_session(src, threads: int | None = None, optimize: bool = True):
    """An InferenceSession on CPU; registers the toolchain custom-op library if the model needs it."""
    import onnxruntime as ort

    model = src if isinstance(src, onnx.ModelProto) else load_onnx(src, check=False)
    so = session_options(threads, custom_ops=uses_custom_ops(model))
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"onnxruntime cannot load the model: {msg}") from None


def input_shape(sess) -> list:
    return list(sess.get_inputs()[0].shape)


def run_batched(sess, x: np.ndarray, batch_size: int = 500, progress: bool = False, desc: str = "eval") -> np.ndarray:
    from tqdm.auto import tqdm

    name = sess.get_inputs()[0].name
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        outs.append(sess.run(None, {name: x[i : i + batch_size]})[0])
    return np.concatenate(outs)
