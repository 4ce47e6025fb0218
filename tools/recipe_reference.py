"""Print docs/recipes.md: every recipe key, its type, default, allowed values and meaning, generated from
the option dataclasses themselves (their declared rules and the comments beside the fields):

    PYTHONPATH=. python tools/recipe_reference.py > docs/recipes.md

tests/test_recipe_reference.py fails when docs/recipes.md differs from what this prints.
"""
import sys

import toolchain

if __name__ == "__main__":
    sys.stdout.write(toolchain.Recipe.reference())
