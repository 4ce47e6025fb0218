"""Accuracy of an ONNX model in onnxruntime on a data set (MNIST test set, or an ImageNet-style folder)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import DataError
from .runtime import input_shape, make_session, run_batched


@dataclass
class EvalResult:
    error: float  # top-1 error, fraction
    top5_error: float | None
    samples: int
    dataset: str = "mnist"


def fit_input(x: np.ndarray, shape: list, dataset: str) -> np.ndarray:
    """Reshape data samples [N, ...] to the model's input shape, or raise DataError if they cannot fit."""
    want = shape[1:]
    if len(shape) < 2 or any(isinstance(d, str) or d is None for d in want):
        raise DataError(f"model input shape {shape} has unknown non-batch dimensions; cannot feed {dataset} samples {list(x.shape[1:])}")
    if int(np.prod(want)) != int(np.prod(x.shape[1:])) or (len(want) > 1 and want[-2:] != list(x.shape[-2:])):
        raise DataError(f"model input shape {shape} does not fit {dataset} samples of shape {list(x.shape[1:])}")
    batch = shape[0]
    if isinstance(batch, int) and batch > 0 and batch != len(x):
        raise DataError(f"model input has a fixed batch size {batch}; re-export it with a dynamic batch dimension")
    return x.reshape(len(x), *want)


def evaluate_onnx(model, dataset: str = "mnist", data_dir=None, batch_size: int = 500, threads=None,
                  progress: bool = True, limit: int | None = None) -> EvalResult:
    sess = make_session(model, threads=threads)
    shape = input_shape(sess)
    if dataset == "mnist":
        from .data import load_mnist

        d = load_mnist(data_dir)
        x, y = d.test_x, d.test_y
        if limit:
            x, y = x[:limit], y[:limit]
        if isinstance(shape[0], int) and shape[0] > 0:
            batch_size = shape[0]
        x = fit_input(x, [None, *shape[1:]], "MNIST") if len(shape) > 1 else x
        logits = run_batched(sess, x, batch_size, progress=progress)
        return _score(logits, y, dataset)
    if dataset == "imagenet":
        from .data.imagenet import iterate_eval_batches

        wrong1 = wrong5 = n = 0
        for xb, yb in iterate_eval_batches(data_dir, shape, batch_size=batch_size, limit=limit, progress=progress):
            logits = sess.run(None, {sess.get_inputs()[0].name: xb})[0]
            r = _score(logits, yb)
            wrong1 += r.error * r.samples
            wrong5 = None if r.top5_error is None else wrong5 + r.top5_error * r.samples
            n += r.samples
        if n == 0:
            raise DataError(f"no images found in {data_dir}")
        return EvalResult(wrong1 / n, None if wrong5 is None else wrong5 / n, n, dataset)
    raise DataError(f"unknown data set {dataset!r} (mnist, imagenet)")


def guess_dataset(model) -> str:
    """imagenet for a model with a 3-channel 4-D input, else mnist."""
    from .runtime import load_onnx

    m = model if isinstance(model, onnx.ModelProto) else load_onnx(model, check=False)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return "imagenet" if len(shape) == 4 and shape[1] == 3 else "mnist"


def _score(logits: np.ndarray, y: np.ndarray, dataset: str = "mnist") -> EvalResult:
    logits = logits.reshape(len(y), -1)
    top1 = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5] if logits.shape[1] >= 5 else None
    e5 = None if top5 is None else float(1 - (top5 == y[:, None]).any(1).mean())
    return EvalResult(float((top1 != y).mean()), e5, len(y), dataset)
