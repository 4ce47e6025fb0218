"""Accuracy of an ONNX model in onnxruntime on a data set (MNIST test set, or an ImageNet-style folder)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import DataError
from .runtime import input_shape, make_session, run, run_batched


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


def fit_network_input(net, x, dataset: str = "data"):
    """Data samples shaped for a (traced or imported) Network's declared input, the same adaptation
    evaluate_onnx applies: an MLP declared on [N, 784] gets MNIST [N, 1, 28, 28] flattened; samples that
    cannot fit are a DataError now, before any training or writing. Inputs with unknown non-batch
    dimensions, and data sources (ImageNet), are returned as they are."""
    shapes = getattr(net, "input_shapes", None) or {}
    names = getattr(net, "input_names", None) or []
    if x is None or not names or not isinstance(x, np.ndarray):
        return x
    shape = shapes.get(names[0])
    if not shape or len(shape) < 2 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return x
    return fit_input(x, [None, *shape[1:]], dataset)


def validate_for_data(net, data, dataset: str = "data"):
    """(train_x, train_y, test_x, test_y) with x reshaped to the network's input (fit_network_input);
    raises DataError before anything is trained or written if the samples cannot fit the model."""
    if data is None:
        return None
    train_x, train_y, test_x, test_y = data
    return (fit_network_input(net, train_x, dataset), train_y, fit_network_input(net, test_x, dataset), test_y)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """Per-channel (x - mean) / std for models trained on normalised input (torchvision-style
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225; for MNIST --mean 0.1307 --std 0.3081).
    mean / std: a number or one value per channel (axis 1); std must be > 0 and everything finite."""
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float32))
    std = np.atleast_1d(np.asarray(std, dtype=np.float32))
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std <= 0).any():
        raise DataError(f"--mean / --std must be finite with std > 0, not mean {mean.tolist()} std {std.tolist()}")
    channels = x.shape[1] if x.ndim >= 2 else 1
    for name, v in (("mean", mean), ("std", std)):
        if v.size not in (1, channels):
            raise DataError(f"--{name} has {v.size} values; the data has {channels} channels (give 1 or {channels})")
    shape = [1, -1] + [1] * (x.ndim - 2) if x.ndim >= 2 else [-1]
    return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def normalization(mean, std):
    """(mean, std) from numbers, lists or comma-separated text (--mean / --std), or None when neither is
    given; one without the other, or a value that is not a finite number (std > 0), is a DataError."""
    if mean is None and std is None:
        return None
    if (mean is None) != (std is None):
        raise DataError("give --mean and --std together (the input is normalised as (x - mean) / std)")
    mean = parse_floats(mean, "mean") if isinstance(mean, str) else mean
    std = parse_floats(std, "std") if isinstance(std, str) else std
    m, s = np.atleast_1d(np.asarray(mean, dtype=np.float64)), np.atleast_1d(np.asarray(std, dtype=np.float64))
    if not (np.isfinite(m).all() and np.isfinite(s).all()) or (s <= 0).any() or m.ndim != 1 or s.ndim != 1:
        raise DataError(f"--mean / --std must be finite numbers with std > 0, not mean {mean!r} std {std!r}")
    return m.tolist(), s.tolist()


def parse_floats(text: str, what: str) -> list[float]:
    """'0.485,0.456,0.406' -> floats (for --mean / --std); a bad value is a DataError naming the flag."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise DataError(f"--{what} must be comma-separated numbers, not {text!r}") from None
    if not all(np.isfinite(vals)):
        raise DataError(f"--{what} values must be finite, not {text!r}")
    return vals


def evaluate_onnx(model, dataset: str = "mnist", data_dir=None, batch_size: int = 500, threads=None,
                  progress: bool = True, limit: int | None = None, mean=None, std=None) -> EvalResult:
    """Top-1 (and top-5) error of an ONNX model; `mean` / `std` normalise the input first (see normalize)."""
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
        if mean is not None or std is not None:
            x = normalize(x, 0.0 if mean is None else mean, 1.0 if std is None else std)
        x = fit_input(x, [None, *shape[1:]], "MNIST") if len(shape) > 1 else x
        logits = run_batched(sess, x, batch_size, progress=progress)
        return _score(logits, y, dataset)
    if dataset == "imagenet":
        from .data.imagenet import iterate_eval_batches

        wrong1 = wrong5 = n = 0
        for xb, yb in iterate_eval_batches(data_dir, shape, batch_size=batch_size, limit=limit, progress=progress):
            if mean is not None or std is not None:
                xb = normalize(xb, 0.0 if mean is None else mean, 1.0 if std is None else std)
            logits = run(sess, {sess.get_inputs()[0].name: xb})[0]
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
    logits = np.asarray(logits)
    if logits.size % max(len(y), 1) or logits.shape[0] != len(y):
        raise DataError(f"the model's output {list(logits.shape)} does not have one row per sample ({len(y)})")
    logits = logits.reshape(len(y), -1)
    finite = np.isfinite(logits).all(1)
    if not finite.all():
        bad = int((~finite).sum())
        raise DataError(f"the model's outputs are not finite (NaN or infinity) for {bad:,} of {len(y):,} samples; "
                        "no error rate can be measured (are the weights NaN, or does the input need --mean/--std?)")
    top1 = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5] if logits.shape[1] >= 5 else None
    e5 = None if top5 is None else float(1 - (top5 == y[:, None]).any(1).mean())
    return EvalResult(float((top1 != y).mean()), e5, len(y), dataset)
