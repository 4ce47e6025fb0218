"""The public face: compress a model you already have, export it, load it back.

    import torch.nn as nn
    import toolchain

    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    ...                                                     # train it as usual
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "prune", "rounds": 2,
                                         "layers": {"default": {"quality": 1.0}}, "retrain": {"epochs": 1}}]})
    result = toolchain.compress(model, recipe)              # built-in MNIST; or data=(x, y) / (train_loader, val_loader)
    print(result.table())                                   # parameters, non-zeros, bytes, MACs, before and after
    toolchain.export(result.model, "mlp.onnx")              # portable form (stock onnxruntime)
    toolchain.export(result.model, "mlp-fast.onnx", form="fast")
    net = toolchain.load("mlp.onnx")                        # back in PyTorch, pruned layers with their masks

`result.model` is your module itself, its layers swapped in place for compressed ones (same class,
same forward; BatchNorm and Dropout stay as they are while it retrains).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from converters import Network, import_onnx
from converters.torch_import import from_module

from . import methods  # noqa: F401  (every built-in method registered)
from ._version import __version__
from .errors import DataError, RecipeError, ToolchainError
from .exporter import FORMS, export_compressed
from .recipe import Recipe, load_recipe

__all__ = ["compress", "export", "load", "evaluate", "info", "read_onnx", "session", "fit", "train_config", "import_caffe",
           "file_metadata",
           "set_metadata", "CompressionResult", "ModelInfo"]

METADATA_RECIPE = "ai.toolchain.recipe"
METADATA_ERROR = "ai.toolchain.test_error"
METADATA_ORIGINAL = "ai.toolchain.original"
METADATA_TRAIN_IMAGES = "ai.toolchain.train_images"  # a dense model trained by `toolchain train`: on how many images
METADATA_VAL_ERROR = "ai.toolchain.validation_error"  # ... and its error on the held-out rest


@dataclass
class CompressionResult:
    """What `compress` returns: the compressed model and the before/after measurements."""

    model: nn.Module  # the user's module (or the Network given), compressed in place
    network: Network  # the graph view the passes worked on (shares the model's layers)
    recipe: Recipe
    error_before: float | None  # top-1 error (fraction) on the evaluation data; None without data
    error_after: float | None
    before: tuple = field(repr=False, default=())  # toolchain.measure.measure() of the dense model
    after: tuple = field(repr=False, default=())
    lines: list[str] = field(default_factory=list)  # what each pass did
    # With the built-in MNIST (data=None or an MNIST folder) errors before/after are on the validation
    # split (the training set's held-out 10k) and the test set is evaluated once, here, at the end.
    test_error: float | None = None

    def table(self) -> str:
        """The per-layer before/after table the CLI prints."""
        from .measure import format_comparison

        text = format_comparison(self.before, self.after)
        if self.error_before is not None and self.error_after is not None:
            which = "validation error" if self.test_error is not None else "error"
            text += f"\n{which}: {100 * self.error_before:.2f}% before, {100 * self.error_after:.2f}% after"
        if self.test_error is not None:
            text += f"\ntest error (measured once, after): {100 * self.test_error:.2f}%"
        return text

    def metadata(self) -> dict[str, str]:
        """The records `export` writes into the file: recipe, measured error, the dense original's measurement."""
        meta = {METADATA_RECIPE: self.recipe.source or self.recipe.path}
        error = self.test_error if self.test_error is not None else self.error_after
        if error is not None:
            meta[METADATA_ERROR] = f"{error:.6f}"
        if self.before:
            meta[METADATA_ORIGINAL] = original_record(self.before)
        return meta


_ORIGINAL_TOTALS = ("params", "macs_dense", "stored_bytes", "file_bytes")


def original_record(measured: tuple) -> str:
    """The dense original's measurement as compact JSON: what a before/after comparison reads of it (per
    layer its name, parameters and MACs; four totals), for a compressed file to report against later."""
    stats, totals = measured
    layers = [[st.name, st.params, st.macs_dense] for st in stats]
    return json.dumps({"layers": layers, "totals": [totals[k] for k in _ORIGINAL_TOTALS]}, separators=(",", ":"))


def original_from_metadata(model: onnx.ModelProto) -> "ModelInfo | None":
    """The dense original recorded in a compressed file's metadata (None if the file has no record)."""
    from .measure import LayerStats

    record = next((p.value for p in model.metadata_props if p.key == METADATA_ORIGINAL), None)
    if record is None:
        return None
    try:
        data = json.loads(record)
        layers = [LayerStats(name, "", (), params, params, params, 4 * params, macs, macs)
                  for name, params, macs in data["layers"]]
        totals = dict(zip(_ORIGINAL_TOTALS, data["totals"]))
        totals.update(nnz=totals["params"], macs=totals["macs_dense"], stored=totals["stored_bytes"] // 4)
        return ModelInfo(layers, totals)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _as_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise RecipeError(f"recipe must be a TOML path, a dict of recipe tables or a toolchain.Recipe, not {type(recipe).__name__}")


class _LoaderSource:
    """A map-style dataset (a DataLoader's) as a training-data source: the recipe's batches of indices."""

    def __init__(self, loader, shape: tuple[int, ...] | None):
        self.dataset, self.collate, self.shape = loader.dataset, loader.collate_fn, shape
        try:
            len(self.dataset)
        except TypeError:
            raise DataError("a DataLoader over an iterable-style dataset has no length; give a map-style "
                            "dataset (one with __getitem__ and __len__)") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, batches, seed: int = 0, epoch: int = 0):
        for idx in batches:
            x, y = self.collate([self.dataset[int(i)] for i in idx])[:2]
            yield (x.reshape(len(x), *self.shape) if self.shape else x), torch.as_tensor(y, dtype=torch.long)


def _first_batch(data) -> torch.Tensor | None:
    if data is None:
        return None
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.utils.data.DataLoader):
        x = data[0].collate_fn([data[0].dataset[0], data[0].dataset[1]])[0]
        return torch.as_tensor(x)
    if isinstance(data, tuple) and len(data) in (2, 4):  # (inputs, labels[, eval inputs, eval labels])
        return torch.as_tensor(np.asarray(data[0][:2]))
    return None


def _fit_example(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """An input batch the model accepts: the data's samples as they are, else flattened."""
    was = model.training
    model.eval()
    err: Exception | None = None
    flat = sample.reshape(len(sample), -1)
    try:
        for cand in [sample] + ([flat] if flat.shape != sample.shape else []):
            try:
                with torch.no_grad():
                    model(cand)
                return cand
            except Exception as e:  # the model's own error: shapes that do not fit
                err = e
    finally:
        model.train(was)
    raise DataError(f"data samples of shape {list(sample.shape[1:])} do not fit {type(model).__name__} "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); pass example_input=")


def _arrays_for(x, y, shape) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32))
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{len(x)} samples but {len(y)} labels")
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise DataError(f"data samples of shape {list(x.shape[1:])} do not fit the model input {list(shape)}")
    return x.reshape(len(x), *shape), y


def _training_data(data, recipe: Recipe, shape: tuple[int, ...], workers: int | None = None, device=None):
    """(train_x, train_y, test_x, test_y) for the driver, fitted to the model's sample shape."""
    if data is None or isinstance(data, (str, os.PathLike)):
        from .driver import load_training_data

        tx, ty, vx, vy = load_training_data(recipe, data, input_shape=[None, *shape], num_workers=workers,
                                            device=device)
        if ty is None:  # image folders: data sources already shaped by the crop
            return tx, ty, vx, vy
        return (*_arrays_for(tx, ty, shape), *_arrays_for(vx, vy, shape))
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, torch.utils.data.DataLoader) for d in data):
        return _LoaderSource(data[0], shape), None, _LoaderSource(data[1], shape), None
    if isinstance(data, tuple) and len(data) == 2:
        x, y = _arrays_for(data[0], data[1], shape)
        return x, y, x, y
    if isinstance(data, tuple) and len(data) == 4:
        return (*_arrays_for(data[0], data[1], shape), *_arrays_for(data[2], data[3], shape))
    raise DataError("data must be None (built-in MNIST), a data folder, (inputs, labels), "
                    "(train_x, train_y, eval_x, eval_y) or (train_loader, eval_loader)")


def _network(model: nn.Module, example: torch.Tensor | None) -> Network:
    if isinstance(model, Network):
        return model
    if example is None:
        raise DataError(f"{type(model).__name__}: pass example_input= (a batch the model accepts) to trace it")
    return from_module(model, example)


def compress(model: nn.Module, recipe, data=None, *, example_input: torch.Tensor | None = None,
             optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             checkpoint: str | os.PathLike | None = None, resume: bool = False, retrain: bool = True,
             progress: bool = True, baseline: str | os.PathLike | onnx.ModelProto | None = None,
             workers: int | None = None, device=None, mean=None, std=None) -> CompressionResult:
    """Compress `model` with `recipe`, retraining between rounds; returns a CompressionResult.

    model:   any torch.nn.Module (your own class, an nn.Sequential) or a Network from `load`.
    recipe:  a TOML path, a dict of recipe tables, or a `toolchain.Recipe`.
    data:    None for the built-in MNIST (trained on 50k, errors before/after on the 10k validation
             split, the test set measured once at the end: result.test_error); a data folder (MNIST IDX files, or an
             ImageNet-style folder for imagenet recipes); `(inputs, labels)` tensors or arrays (trained
             and evaluated on); `(train_x, train_y, eval_x, eval_y)`; or `(train_loader, eval_loader)`
             DataLoaders over map-style datasets (the recipe's batch size and seeded order are used).
             Samples are reshaped to the model's input (MNIST images feed an MLP on [N, 784]).
    example_input: a batch the model accepts; by default taken from the data.
    optimizer: `fn(params) -> torch.optim.Optimizer` instead of the recipe's Caffe-style SGD (the
             recipe's lr schedule scales its learning rates); `loss`: `fn(output, labels)` (a batch
             mean) instead of cross-entropy.
    checkpoint / resume: a file written after every round; `resume=True` continues from it.
    retrain: False applies the passes without retraining.
    baseline: the dense ONNX file `model` was loaded from, measured as the "before" (default: the
             model as it is before compression, exported).
    workers: image-decoding processes for an image-folder data set (default: from the CPU count).
    device:  where to retrain: "cpu", "cuda", "cuda:N", "auto" or a torch.device (default: where the
             model is; under torchrun, the process's GPU). The model is returned where it came from.
    mean / std: for a model trained on normalised input (an imported ONNX or Caffe model): numbers,
             one per channel, or comma-separated text; every sample it trains and is measured on,
             test set included, becomes (x - mean) / std. Array data only (the built-in MNIST, a
             folder of MNIST IDX files, tensors or arrays): DataLoaders normalise in their own transforms.

    Everything is checked before training starts: the recipe, its layer names against the model,
    that each stage selects a layer, that the data fits the model.
    """
    from .accuracy import normalization, normalize
    from .driver import compress_network
    from .measure import measure

    recipe = _as_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise ToolchainError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    norm = normalization(mean, std)
    if norm and (recipe.dataset != "mnist" or (isinstance(data, tuple) and len(data) == 2 and
                                                isinstance(data[0], torch.utils.data.DataLoader))):
        raise DataError("--mean / --std normalise array data (MNIST, tensors, arrays); normalise DataLoaders "
                        "and image folders in their own transforms")
    if not retrain:
        recipe = copy.deepcopy(recipe)
        for stage in recipe.stages:
            stage.retrain = stage.retrain_final = dataclasses.replace(stage.retrain, epochs=0)
    if isinstance(model, Network):
        example = None
        shape = tuple(d if isinstance(d, int) else 1 for d in model.input_shapes[model.input_names[0]][1:])
    else:
        if example_input is None:
            sample = _first_batch(data)
            if sample is None:  # the built-in data: MNIST images
                sample = torch.zeros(2, 1, 28, 28)
            example_input = _fit_example(model, sample.float())
        example = example_input
        shape = tuple(example.shape[1:])
    net = _network(model, example)
    if not net.layers():
        raise RecipeError(f"{type(model).__name__} has no layer the recipe can act on (no nn.Linear / nn.Conv2d "
                          "or compressed layer in its forward)")
    for stage in recipe.stages:
        stage.make_pass(net)  # layer names, per-layer options, a stage selecting nothing: all checked here
    was_training = model.training
    before = measure(baseline if baseline is not None else export_compressed(net))
    model.train(was_training)
    no_data = data is None and recipe.dataset == "imagenet" and not retrain  # AlexNet without ImageNet
    train_data = None if no_data else _training_data(data, recipe, shape, workers, device)
    if norm and train_data is not None:
        tx, ty, vx, vy = train_data
        ntx = normalize(tx, *norm)
        train_data = (ntx, ty, ntx if vx is tx else normalize(vx, *norm), vy)
    res = compress_network(net, recipe, train_data, checkpoint=checkpoint, resume=resume, progress=progress,
                           model=model, make_optimizer=optimizer, loss_fn=loss, device=device)
    test_error = None
    if train_data is not None and recipe.dataset == "mnist" and (data is None or isinstance(data, (str, os.PathLike))):
        from .data import load_mnist
        from .train import evaluate as torch_evaluate

        d = load_mnist(data)  # trained on train minus validation, chosen on validation: test once, now
        test_x, test_y = _arrays_for(d.test_x, d.test_y, shape)
        test_error = torch_evaluate(model, normalize(test_x, *norm) if norm else test_x, test_y)
    after = measure(export_compressed(res.net))
    model.train(was_training)
    out = model if not isinstance(model, Network) else res.net
    return CompressionResult(out, res.net, recipe, res.error_before, res.error_after, before, after, res.lines,
                             test_error)


def export(model: nn.Module, path: str | os.PathLike | None, form: str = "portable", *,
           example_input: torch.Tensor | None = None, result: CompressionResult | None = None,
           metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Write `model` (a module the passes produced, or a Network) as ONNX and return the ModelProto.

    form: "portable" (stock onnxruntime: compact initializers the runtime expands once at session
    start), "fast" (sparse layers as the toolchain's custom ops; see toolchain.kernels) or "dense"
    (pruned / weight-sharing / int8 layers as plain float32 weights, zeros kept: what
    onnxruntime.quantization.quantize_dynamic / quantize_static need).
    example_input: a batch the model accepts (needed for your own modules unless `result` is given).
    result: the CompressionResult it came from: its recipe and measured error go into the file's
    metadata. The file is written atomically: it appears complete or not at all.
    """
    if form not in FORMS:
        raise ToolchainError(f"form must be one of {', '.join(FORMS)}, not {form!r}")
    if result is not None and model is result.model:
        net = result.network
    elif isinstance(model, Network):
        net = model
    else:
        if example_input is None:
            raise ToolchainError(f"exporting a {type(model).__name__} needs example_input= (a batch it accepts)")
        net = from_module(model, example_input)
    meta = {}  # the producer is in the file's own producer_name / producer_version fields
    if result is not None:
        meta.update(result.metadata())
    meta.update(metadata or {})
    was_training = model.training
    try:
        return export_compressed(net, path, form=form, metadata=meta)
    finally:
        model.train(was_training)


def load(path: str | os.PathLike | bytes | onnx.ModelProto) -> Network:
    """Read any ONNX file (the toolchain's own, in either form, or a third party's) into PyTorch.

    Compressed layers come back as their own types: pruned layers with their masks (fast form:
    from the stored non-zeros; portable form: from the file's record of which layers were pruned),
    hashed layers from their hash record. The result is a Network (an nn.Module): retrain it,
    `compress` it further or `export` it again.
    """
    return import_onnx(path)


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file as a dict (producer, recipe, test error, ...)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@dataclass
class ModelInfo:
    """Per-layer measurements of an ONNX file (`info`): parameters, non-zeros, MACs, stored bytes."""

    layers: list  # toolchain.measure.LayerStats, one per weighted layer
    totals: dict  # params, nnz, macs_dense, macs, stored, stored_bytes, file_bytes
    baseline: "ModelInfo | None" = None

    def table(self) -> str:
        from .measure import format_table

        return format_table(self.layers, self.totals, self.baseline.totals if self.baseline else None)

    def comparison(self) -> str:
        """Before/after table against `baseline` (Han et al. Tables 2-3 layout)."""
        from .measure import format_comparison

        if self.baseline is None:
            raise ToolchainError("comparison() needs a baseline: info(path, baseline=dense_path)")
        return format_comparison((self.baseline.layers, self.baseline.totals), (self.layers, self.totals))


def info(model: str | os.PathLike | onnx.ModelProto, baseline: str | os.PathLike | onnx.ModelProto | None = None) -> ModelInfo:
    """Measure an ONNX file (any producer's): per layer and in total, optionally against a dense baseline
    (default: the dense original a compressed file of ours records in its metadata)."""
    from .measure import measure

    proto = read_onnx(model)
    base = info(baseline) if baseline is not None else original_from_metadata(proto)
    return ModelInfo(*measure(proto if isinstance(model, onnx.ModelProto) else model), base)


def read_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Parse and check an ONNX file; a missing, truncated or invalid file is one ModelFormatError line."""
    from .runtime import load_onnx

    return load_onnx(model)


def evaluate(model, data=None, *, dataset: str | None = None, threads: int | None = None, limit: int | None = None,
             progress: bool = False, batch_size: int = 500, mean=None, std=None):
    """Top-1 error (a fraction) of `model` on a test set.

    model: an ONNX path or ModelProto (run in onnxruntime, the custom-op library registered when the
    file needs it; returns an EvalResult with .error, .top5_error, .samples), or a torch module
    (returns the error as a float). data: None for the MNIST test set, a data folder (MNIST IDX files
    or an ImageNet-style folder), or (inputs, labels) for a torch module. mean / std (numbers, one per
    channel, or comma-separated text): an ONNX model trained on normalised input gets (x - mean) / std.
    """
    if isinstance(model, nn.Module):
        from .train import evaluate as torch_evaluate

        if data is None or isinstance(data, (str, os.PathLike)):
            from .data import load_mnist

            d = load_mnist(data)
            data = (d.test_x, d.test_y)
        example = _first_batch((data[0], data[1]))
        if not isinstance(model, Network):
            example = _fit_example(model, example.float())
        x, y = _arrays_for(data[0], data[1], tuple(example.shape[1:]) if not isinstance(model, Network) else
                           tuple(d if isinstance(d, int) else 1 for d in model.input_shapes[model.input_names[0]][1:]))
        return torch_evaluate(model, x[:limit] if limit else x, y[:limit] if limit else y, progress=progress)
    from .accuracy import evaluate_onnx, guess_dataset, normalization

    norm = normalization(mean, std)
    mean, std = norm if norm else (None, None)
    dataset = dataset or guess_dataset(model)
    return evaluate_onnx(model, dataset, data, batch_size=batch_size, threads=threads, progress=progress, limit=limit,
                         mean=mean, std=std)


def session(model: str | os.PathLike | onnx.ModelProto, threads: int | None = None):
    """An onnxruntime InferenceSession on the CPU, with the toolchain's custom ops registered when the file uses them."""
    from .runtime import make_session

    return make_session(model, threads=threads)


def fit(model: nn.Module, data, config=None, *, teacher: nn.Module | None = None, regularizer=None, after_step=None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        where: str = "fit config", desc: str | None = None, **overrides) -> nn.Module:
    """Train `model` in place with the toolchain's seeded, resumable loop (Caffe-style SGD by default).

    data: (inputs, labels) arrays or tensors, or a data source with `load()`; config: a TrainConfig,
    a TOML file of its keys, or a dict of its keys (epochs, batch_size, lr, momentum, weight_decay, lr_policy, seed, ...), with
    keyword `overrides` on top. `teacher` distils (with distill_temperature/weight), `regularizer(model)`
    adds a loss term, `after_step(model)` runs after each step.
    """
    from .train import TrainConfig, TrainHooks, train

    if config is None:
        config = TrainConfig()
    if isinstance(config, (str, os.PathLike)):  # a TOML file of TrainConfig keys (checked: UTF-8, types, ranges)
        config = train_config(config)
    if isinstance(config, dict):
        from .recipe import build_dataclass

        config = build_dataclass(TrainConfig, config, where)
    if overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)
    hooks = TrainHooks(regularizer=regularizer, after_step=after_step, teacher=teacher)
    desc = desc or f"train {type(model).__name__}"
    if isinstance(data, tuple):
        x, y = data
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return train(model, x.astype(np.float32), y.astype(np.int64), config, hooks, checkpoint, resume,
                     desc=desc, progress=progress)
    return train(model, data, None, config, hooks, checkpoint, resume, desc=desc, progress=progress)


def train_config(config: str | os.PathLike | dict | None = None, **overrides):
    """A checked TrainConfig from a TOML file of its keys (or a dict), with keyword overrides on top;
    a file that is not UTF-8 or TOML, an unknown key or a value out of range is one RecipeError."""
    from .recipe import build_dataclass, load_toml_table
    from .train import TrainConfig

    where = str(config) if isinstance(config, (str, os.PathLike)) else "training config"
    table = load_toml_table(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    table.update({k: v for k, v in overrides.items() if v is not None})
    return build_dataclass(TrainConfig, table, where)


def import_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None,
                 output: str | os.PathLike | None = None, **options):
    """Caffe prototxt (+ caffemodel) -> ONNX without Caffe; written atomically to `output` when given.
    Returns converters.caffe.ImportResult (.model, .serialized, ...). Options: see converters.caffe.convert_caffe."""
    from converters.caffe import convert_caffe, import_caffe as _import

    if output is None:
        return convert_caffe(prototxt, caffemodel, **options)
    return _import(prototxt, caffemodel, output, **options)


def set_metadata(path: str | os.PathLike, *, recipe: str | None = None, baseline: str | os.PathLike | None = None,
                 test_error: float | None = None, train_images: int | None = None,
                 validation_error: float | None = None) -> dict[str, str]:
    """Write the toolchain's records into an existing ONNX file (atomically; the graph is untouched):
    the producer (producer_name / producer_version, where the file names none), the recipe that made it (its compact JSON, or a
    reference to its file), its measured test error and the dense `baseline`'s
    measurement (what `info` and `toolchain export` report against); for a trained dense model, the number
    of images it was trained on and its error on the held-out validation split. Returns the file's metadata."""
    from converters import atomic_write_bytes

    model = read_onnx(path)
    if not model.producer_name:  # a file another exporter wrote (torch.onnx for the zoo's dense files) keeps its producer
        model.producer_name, model.producer_version = "toolchain", __version__
    records = {}
    if recipe is not None:
        records[METADATA_RECIPE] = recipe
    if test_error is not None:
        records[METADATA_ERROR] = f"{test_error:.6f}"
    if train_images is not None:
        records[METADATA_TRAIN_IMAGES] = str(int(train_images))
    if validation_error is not None:
        records[METADATA_VAL_ERROR] = f"{validation_error:.6f}"
    if baseline is not None:
        records[METADATA_ORIGINAL] = original_record((lambda i: (i.layers, i.totals))(info(baseline)))
    meta = {p.key: p.value for p in model.metadata_props if p.key != "ai.toolchain.producer"}  # now producer_name
    meta.update(records)
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    atomic_write_bytes(path, model.SerializeToString())
    return meta
