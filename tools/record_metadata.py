"""Write the toolchain's records into the shipped ONNX files: producer, the recipe that made each file,
its test error measured now (stock onnxruntime, MNIST test set) and, for compressed files, the dense
original's measurement. Graphs are untouched (checked). Prints one line per file.

    python tools/record_metadata.py [--check]

--check only verifies that every shipped file carries the records, and that the recorded error is the
one `toolchain eval` measures now; exit 1 if not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402

import toolchain  # noqa: E402
from toolchain.zoo import MODELS_DIR  # noqa: E402

SUFFIX_RECIPE = {"": "train.toml", "-pruned": "prune.toml", "-svd": "svd.toml", "-lowrank-denil": "lowrank-denil.toml",
                 "-hashed-8": "hashed-8.toml", "-hashed-64": "hashed-64.toml",
                 "-deep-compression": "deep-compression.toml", "-pruned-record": "prune-record.toml",
                 "-channels": "channels.toml"}
# files made by a script rather than a recipe file
SUFFIX_COMMAND = {"-pruned-int8": "python tools/reproduce_deep_compression.py --models {model} --test --keep-int8"}


def shipped() -> list[tuple[Path, Path | str, Path]]:
    """(file, its recipe file or the command that made it, the dense original) for every shipped ONNX file."""
    out = []
    for folder in sorted(p for p in MODELS_DIR.iterdir() if p.is_dir()):
        dense = folder / f"{folder.name}.onnx"
        for path in sorted(folder.glob("*.onnx")):
            suffix = path.stem[len(folder.name):]
            if suffix in SUFFIX_RECIPE and (folder / SUFFIX_RECIPE[suffix]).is_file():
                out.append((path, folder / SUFFIX_RECIPE[suffix], dense))
            elif suffix in SUFFIX_COMMAND:
                out.append((path, SUFFIX_COMMAND[suffix].format(model=folder.name), dense))
            else:
                raise SystemExit(f"{path}: no recipe known for it; add its suffix to SUFFIX_RECIPE")
    return out


def _recipe_record(recipe: Path | str) -> str:
    """A shipped file's recipe as a reference to the file beside it (name and SHA-256 prefix): the
    recipe ships with the model, and a reference costs ~70 bytes where the tables cost ~0.5 KB, which
    matters in a 10 KB file. (Files a user exports record the recipe's tables: toolchain.export.)"""
    import hashlib
    import json

    if isinstance(recipe, str):  # no recipe file: the command that made it
        return json.dumps({"command": recipe}, separators=(",", ":"))
    digest = hashlib.sha256(recipe.read_bytes()).hexdigest()[:16]
    return json.dumps({"file": recipe.name, "sha256": digest}, separators=(",", ":"))


def graph_bytes(path: Path) -> bytes:
    m = onnx.load(str(path))
    del m.metadata_props[:]
    return m.SerializeToString()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    bad = 0
    for path, recipe, dense in shipped():
        err = toolchain.evaluate(path).error
        if args.check:
            meta = toolchain.file_metadata(path)
            ok = meta.get("ai.toolchain.recipe") == _recipe_record(recipe) and \
                abs(float(meta.get("ai.toolchain.test_error", "nan")) - err) < 1e-9
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {path.relative_to(MODELS_DIR)}: test error {100 * err:.2f}%")
            continue
        before = graph_bytes(path)
        toolchain.set_metadata(path, recipe=_recipe_record(recipe), test_error=err,
                               baseline=dense if path != dense else None)
        assert graph_bytes(path) == before, f"{path}: graph changed"
        print(f"{path.relative_to(MODELS_DIR)}: recipe {getattr(recipe, 'name', recipe)}, test error {100 * err:.2f}%, "
              f"{path.stat().st_size:,} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
