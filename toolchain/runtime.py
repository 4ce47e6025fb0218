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
        if not model.graph.output:
            raise ModelFormatError(f"{label}: the graph has no outputs")
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


def make_session(src, threads: int | None = None, optimize: bool = True, session_opts=None):
    """An InferenceSession on CPU; registers the toolchain custom-op library if the model needs it.
    Any failure to create it (an invalid graph, a missing kernel) is one ModelFormatError line."""
    import onnxruntime as ort

    model = src if isinstance(src, onnx.ModelProto) else load_onnx(src, check=False)
    if not model.graph.output:
        raise ModelFormatError("the model's graph has no outputs")
    so = session_opts or session_options(threads, custom_ops=uses_custom_ops(model))
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelFormatError(f"onnxruntime cannot load the model: {_ort_message(e)}") from None


def _ort_message(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    for prefix in ("[ONNXRuntimeError] : ",):
        text = text.replace(prefix, "")
    return text if len(text) <= 300 else text[:297] + "..."


def run(sess, feed: dict, outputs=None) -> list:
    """sess.run, the ONE place models are run: an onnxruntime failure (a shape that does not fit, a fixed
    batch size, a bias of the wrong length, a kernel error) becomes one ModelFormatError line."""
    try:
        return sess.run(outputs, feed)
    except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        shapes = ", ".join(f"{k} {list(getattr(v, 'shape', []))}" for k, v in feed.items())
        raise ModelFormatError(f"onnxruntime cannot run the model on {shapes}: {_ort_message(e)}") from None


def fixed_batch(sess) -> int | None:
    """The batch size the model's first input hard-codes, or None if it is dynamic."""
    shape = input_shape(sess)
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def input_shape(sess) -> list:
    return list(sess.get_inputs()[0].shape)


def run_batched(sess, x: np.ndarray, batch_size: int = 500, progress: bool = False, desc: str = "eval") -> np.ndarray:
    from tqdm.auto import tqdm

    name = sess.get_inputs()[0].name
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        outs.append(run(sess, {name: x[i : i + batch_size]})[0])
    return np.concatenate(outs)
