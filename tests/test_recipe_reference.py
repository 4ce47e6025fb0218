"""docs/recipes.md is generated from the option dataclasses: it must match tools/recipe_reference.py."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from toolchain.methods import PASSES
from toolchain.options import rules

ROOT = Path(__file__).resolve().parents[1]


def test_docs_recipes_md_is_what_the_script_prints():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "recipe_reference.py")], capture_output=True,
                         text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert (ROOT / "docs" / "recipes.md").read_text() == out, \
        "docs/recipes.md is stale: PYTHONPATH=. python tools/recipe_reference.py > docs/recipes.md"


def test_every_numeric_or_string_option_of_every_pass_declares_its_allowed_values():
    from toolchain.options import field_types

    for name, cls in PASSES.items():
        for opts in (cls.Options, cls.LayerOptions):
            hints = field_types(opts)
            for f in dataclasses.fields(opts):
                if hints[f.name] in (bool,) or f.name == "layout":
                    continue
                assert rules(opts, f), f"{name}: {opts.__name__}.{f.name} declares no range or choices"
