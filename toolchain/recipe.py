"""Compression recipes (TOML): which passes, per-layer settings, rounds, retraining, seed.

    seed = 0
    dataset = "mnist"

    [[stage]]
    pass = "prune"            # a registered pass (toolchain.methods)
    only = "fc"               # optional: "all" (default), "conv" or "fc"
    rounds = 3                # pass options (the pass's Options dataclass)
    [stage.layers.default]    # per-layer options for every layer (the pass's LayerOptions)
    quality = 1.0
    [stage.layers.ip1]        # ... overridden for one layer
    quality = 1.5
    [stage.retrain]           # retraining after each round (toolchain.train.TrainConfig)
    epochs = 2
    lr = 0.001
    clip_grad_norm = 5.0      # optional: rescale larger gradients to this L2 norm (Caffe's clip_gradients)
    precision = "bf16"        # optional: "fp32" (default) or "bf16" (autocast: matmuls/convs in bfloat16)
    [stage.retrain_final]     # optional: overrides for the last round's retraining
    epochs = 10

Everything is validated on load (and layer names against the model before training):
unknown keys, passes, layers, and out-of-range values are RecipeErrors.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from converters.ir import safe_key

from .errors import RecipeError
from .methods import CompressionPass, get_pass
from .options import check_table, declare_rules, describe_rules, field_docs, field_types, option, type_name
from .train import TrainConfig

TOP_KEYS = {"seed", "dataset", "stage", "description"}
STAGE_KEYS = {"pass", "only", "layers", "retrain", "retrain_final"}
SEED_RANGE = "[0, 2^32)"

# The retraining settings' allowed values (TrainConfig lives with the training loop).
declare_rules(
    TrainConfig,
    epochs={"range": "[0, 10000]"},
    batch_size={"range": "[1, 2^20]", "doc": "samples per SGD step (the global batch when data-parallel)"},
    lr={"range": "[0, inf)", "doc": "base learning rate of SGD (scaled by lr_policy)"},
    momentum={"range": "[0, 1)", "doc": "SGD momentum"},
    weight_decay={"range": "[0, 1]"},
    l1={"range": "[0, 1]"},
    lr_policy={"choices": ("cosine", "step", "fixed", "inv")},
    augment_shift={"range": "[0, 64]"},
    seed={"range": SEED_RANGE, "doc": "data order, augmentation and dropout (default: the recipe's seed)"},
    distill_temperature={"range": "[0, 1000]"},
    distill_weight={"range": "[0, 1]"},
    clip_grad_norm={"range": "[0, inf)"},
)


@dataclass
class RecipeTop:
    """The recipe's top-level keys (besides [[stage]] tables)."""

    seed: int = option(0, SEED_RANGE)  # seeds every stage's rounds and retraining (and default pass seeds)
    dataset: str = option("mnist", choices=("mnist", "imagenet"))  # the data set retrained and evaluated on
    description: str = ""  # free text, recorded in exported files


@dataclass
class StageKeys:
    """The keys of a [[stage]] table besides its pass's options."""

    pass_: str = option("", doc="the compression pass (a registered method: prune, lowrank, hashed, ...)")
    only: str = option("all", choices=("all", "conv", "fc"))  # which layer kinds the stage compresses


@dataclass
class Stage:
    index: int
    pass_cls: type[CompressionPass]
    options: object
    layer_tables: dict[str, dict]  # raw per-layer tables, "default" included
    retrain: TrainConfig
    only: str = "all"
    retrain_final: TrainConfig | None = None  # the last round's retraining, if it differs

    def retrain_for(self, round_index: int, rounds: int) -> TrainConfig:
        return self.retrain_final if (self.retrain_final and round_index == rounds - 1) else self.retrain

    def make_pass(self, net: nn.Module) -> CompressionPass:
        return self.pass_cls(self.options, resolve_layers(self, net))


@dataclass
class Recipe:
    """A validated compression recipe. Build one from a TOML file (`Recipe.load`), TOML text
    (`Recipe.parse`) or Python tables (`Recipe.from_dict`, the same keys as the TOML file)."""

    path: str
    seed: int = 0
    dataset: str = "mnist"
    stages: list[Stage] = field(default_factory=list)
    description: str = ""
    source: str = ""  # its tables as compact JSON (comments dropped), recorded in exported files

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return load_recipe(path)

    @classmethod
    def parse(cls, text: str, name: str = "<recipe>") -> "Recipe":
        return parse_recipe(text, name)

    @classmethod
    def from_dict(cls, tables: dict, name: str = "<recipe>") -> "Recipe":
        return recipe_from_dict(tables, name)

    @staticmethod
    def reference() -> str:
        """The reference of every recipe key (Markdown: docs/recipes.md), generated from the option classes."""
        return reference_markdown()


def build_dataclass(cls, table: dict, where: str):
    """Instantiate dataclass `cls` from a recipe table; unknown keys and bad values are RecipeErrors."""
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a table, got {type(table).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in table:
        if k not in names:
            allowed = ", ".join(sorted(names)) or "none"
            raise RecipeError(f"{where}: unknown key {k!r} (allowed: {allowed})")
    try:
        check_table(cls, table, "")  # types and ranges from the field declarations (toolchain.options)
        return cls(**table)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    return recipe_from_dict(data, path)


def recipe_from_dict(data: dict, path: str = "<recipe>") -> Recipe:
    """A Recipe from the same tables a TOML recipe holds, as Python dicts and lists (validated alike)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a table (dict), not {type(data).__name__}")
    for k in data:
        if k not in TOP_KEYS:
            raise RecipeError(f"{path}: unknown key {k!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    stages_raw = data.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{path}: a recipe needs at least one [[stage]]")
    top = build_dataclass(RecipeTop, {k: v for k, v in data.items() if k != "stage"}, path)
    recipe = Recipe(path=path, seed=top.seed, dataset=top.dataset, description=top.description)
    for i, st in enumerate(stages_raw):
        where = f"{path}: stage {i + 1}"
        if not isinstance(st, dict):
            raise RecipeError(f"{where}: a [[stage]] is a table, not {type(st).__name__}")
        if "pass" not in st:
            raise RecipeError(f"{where}: missing key 'pass'")
        if not isinstance(st["pass"], str):
            raise RecipeError(f"{where}: pass must be a string (a method name), not {st['pass']!r}")
        for key in ("retrain", "retrain_final"):
            if key in st and not isinstance(st[key], dict):
                raise RecipeError(f"{where}: [{key}] must be a table, not {type(st[key]).__name__}")
        pass_cls = get_pass(st["pass"])
        where = f"{where} ({st['pass']})"
        opt_table = {k: v for k, v in st.items() if k not in STAGE_KEYS}
        options = build_dataclass(pass_cls.Options, opt_table, where)
        layers = st.get("layers", {})
        if not isinstance(layers, dict):
            raise RecipeError(f"{where}: 'layers' must be a table of layer tables")
        for lname, lt in layers.items():
            build_dataclass(pass_cls.LayerOptions, lt, f"{where}: layer {lname!r}")  # validate now
        retrain_table = dict(st.get("retrain", {}))
        retrain_table.setdefault("seed", recipe.seed)
        retrain = build_dataclass(TrainConfig, retrain_table, f"{where}: retrain")
        final = None
        if "retrain_final" in st:
            final = build_dataclass(TrainConfig, {**retrain_table, **st["retrain_final"]}, f"{where}: retrain_final")
        only = build_dataclass(StageKeys, {"only": st.get("only", "all")}, where).only
        recipe.stages.append(Stage(i, pass_cls, options, layers, retrain, only, final))
    for st in recipe.stages:  # methods in an order that cannot compose (e.g. splicing after weight sharing)
        for prev in recipe.stages[: st.index]:
            if prev.pass_cls.name in getattr(st.pass_cls, "cannot_follow", ()):
                raise RecipeError(f"{path}: stage {st.index + 1} ({st.pass_cls.name}) cannot follow stage "
                                  f"{prev.index + 1} ({prev.pass_cls.name}): {st.pass_cls.name} moves individual "
                                  f"weights, which {prev.pass_cls.name} has tied or factored; put it first")
    recipe.source = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return recipe


def read_text_file(path: str | Path, what: str = "recipe") -> str:
    """A UTF-8 text file's contents; missing, unreadable, a directory, or not UTF-8: one RecipeError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise RecipeError(f"{what} {p} is a directory, not a file") from None
    except OSError as e:
        raise RecipeError(f"cannot read {what} {p}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} {p} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                          f"save it as UTF-8") from None


def load_toml_table(path: str | Path, what: str = "training config") -> dict:
    """A TOML file as a table (for `toolchain train --config`): errors as one RecipeError."""
    text = read_text_file(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_text_file(path), str(Path(path)))


def _kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "fc"


def merge_layer_tables(cls, default: dict, specific: dict) -> dict:
    """The default table overridden by a layer's own. Options in one of the LayerOptions' EXCLUSIVE
    groups (e.g. prune's quality / density) replace the whole group: a layer's `density` drops the
    default's `quality`."""
    merged = dict(default)
    for group in getattr(cls, "EXCLUSIVE", ()):
        if any(k in specific for k in group):
            for k in group:
                merged.pop(k, None)
    merged.update(specific)
    return merged


def resolve_layers(stage: Stage, net: nn.Module) -> dict[str, object]:
    """Per-layer options for the layers this stage compresses (names checked against the model)."""
    layers = net.layers()
    where = f"{stage.pass_cls.name} stage {stage.index + 1}"
    # a module path ("features.0") names the layer of a traced module ("features_0")
    tables = {(safe_key(k) if k not in layers and safe_key(k) in layers else k): v for k, v in stage.layer_tables.items()}
    for lname in tables:
        if lname != "default" and lname not in layers:
            raise RecipeError(f"{where}: layer {lname!r} is not in the model (layers: {', '.join(layers)})")
    default = tables.get("default")
    out = {}
    for lname, module in layers.items():
        if stage.only != "all" and _kind(module) != stage.only:
            continue
        if not isinstance(module, stage.pass_cls.layer_types):
            if lname in tables:
                raise RecipeError(f"{where}: layer {lname!r} is a {type(module).__name__}, which this pass cannot compress")
            continue
        if lname in tables or default is not None:
            table = merge_layer_tables(stage.pass_cls.LayerOptions, default or {}, tables.get(lname, {}))
            out[lname] = build_dataclass(stage.pass_cls.LayerOptions, table, f"{where}: layer {lname!r}")
    if not out:
        kinds = ", ".join(sorted({type(m).__name__ for m in layers.values()})) or "no weighted layers"
        raise RecipeError(f"{where} selects no layer of the model (its layers: {', '.join(layers) or 'none'}; "
                          f"{kinds}); name layers in [stage.layers.NAME] or give [stage.layers.default]")
    return out


# ------------------------------------------------------------------ the generated reference (docs/recipes.md)
def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "(required)"
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    return f"`{v}`"


def _table(cls, rename=None) -> list[str]:
    rename = rename or {}
    hints, docs = field_types(cls), field_docs(cls)
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        allowed = describe_rules(cls, f) or "any"
        doc = docs[f.name].replace("|", "\\|")
        lines.append(f"| `{rename.get(f.name, f.name)}` | {type_name(hints[f.name])} | {_default(f)} | {allowed} | {doc} |")
    return lines


def reference_markdown() -> str:
    """docs/recipes.md: every recipe key with its type, default, allowed values and meaning, generated from
    the option dataclasses (their declared rules and the comments beside the fields)."""
    from .methods import PASSES

    out = ["# Recipe reference", "",
           "<!-- GENERATED by `PYTHONPATH=. python tools/recipe_reference.py > docs/recipes.md`; do not edit. -->", "",
           "Every key a compression recipe (TOML, or the same tables as Python dicts) may hold. Values are "
           "checked when the recipe is loaded, before any model or data is read: a wrong type (`\"2\"` or `[2]` "
           "for a number, `2.5` for an integer), NaN or infinity, a value outside its interval, an unknown "
           "choice or an unknown key is an error naming the key and what it allows. Intervals use `[` / `]` for "
           "an included bound and `(` / `)` for an excluded one; `2^32` is 4,294,967,296.", "",
           "## Top level", ""]
    out += _table(RecipeTop)
    out += ["", "## `[[stage]]`", "",
            "Each stage runs one pass for its `rounds` (if the pass has them), retraining after each round. "
            "Besides the pass's own options (below) a stage holds:", ""]
    out += _table(StageKeys, {"pass_": "pass"})
    out += ["| `[stage.layers.NAME]` | table | | a layer of the model, or `default` | that layer's options (the pass's layer options below) |",
            "| `[stage.retrain]` | table | | retraining keys below | retraining after every round |",
            "| `[stage.retrain_final]` | table | | retraining keys below | overrides for the last round's retraining |"]
    for name in sorted(PASSES):
        cls = PASSES[name]
        out += ["", f"## pass = \"{name}\"", ""]
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        if doc:
            out += [doc[0], ""]
        out += ["Stage options (keys of the `[[stage]]` table):", ""]
        out += _table(cls.Options) if dataclasses.fields(cls.Options) else ["(none)"]
        out += ["", "Layer options (keys of `[stage.layers.NAME]` / `[stage.layers.default]`):", ""]
        out += _table(cls.LayerOptions) if dataclasses.fields(cls.LayerOptions) else ["(none)"]
        for group in getattr(cls.LayerOptions, "EXCLUSIVE", ()):
            out += ["", f"Give exactly one of {', '.join(f'`{k}`' for k in group)}; a layer's own table replaces "
                        f"the default's choice."]
    out += ["", "## `[stage.retrain]` / `[stage.retrain_final]`", "",
            "`seed` defaults to the recipe's seed; the driver reseeds every round from (seed, stage, round).", ""]
    out += _table(TrainConfig)
    return "\n".join(out) + "\n"
