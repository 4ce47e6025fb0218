"""Mutation score of a mutmut run over the compression methods, the recipe and the sparse format.

How the run is made (mutmut 3.8, in a copy of the tree so the worktree stays clean):

    git archive HEAD | tar -x -C /tmp/mut        # + the built toolchain/kernels/build/libtoolchain_ops.so
    # /tmp/mut/pyproject.toml gets MUTMUT_CONFIG (below); then, in /tmp/mut:
    mutmut run --max-children 2 toolchain.options.x_nonexistent__mutmut_1
    #   generates every mutant and the test-to-function stats, then stops (no mutant has that name)
    python tools/mutation_score.py sample mutants 1600 > /tmp/sample.txt     # a seeded sample
    mutmut run --max-children 2 $(cat /tmp/sample.txt)
    python tools/mutation_score.py score mutants /tmp/sample.txt

mutmut exit codes in mutants/**/*.meta: 1 killed, 0 survived, -24 timeout (counted as killed, as mutmut
does), 33 no test covers the function (reported separately), None not run.
"""
from __future__ import annotations

import glob
import json
import random
import sys
from collections import Counter
from pathlib import Path

MUTMUT_CONFIG = """
[tool.mutmut]
source_paths = ["toolchain/"]
only_mutate = ["toolchain/methods/*", "toolchain/recipe.py", "toolchain/options.py"]
also_copy = ["converters/", "models/", "docs/", "tools/"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
pytest_add_cli_args_test_selection = ["tests/test_recipe.py", "tests/test_recipe_reference.py", "tests/test_prune.py",
  "tests/test_hashed.py", "tests/test_lowrank.py", "tests/test_options.py", "tests/test_guards.py",
  "tests/test_bad_input.py", "tests/test_quantize.py", "tests/test_sparse_vd.py", "tests/test_splicing.py",
  "tests/test_global_prune.py", "tests/test_structured.py", "tests/test_kernels.py", "tests/test_kernels_packed.py",
  "tests/test_export_sparse.py", "-m", "not slow", "-k",
  "not shipped and not cli and not test_1_ and not test_2_ and not test_4 and not test_5 and not test_7 and not test_8 and not test_9"]
process_isolation = "forkserver"
timeout_multiplier = 5.0
"""


def results(mutants: Path) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for f in sorted(glob.glob(str(mutants / "**" / "*.meta"), recursive=True)):
        out.update(json.loads(Path(f).read_text()).get("exit_code_by_key", {}))
    return out


def main(argv: list[str]) -> None:
    cmd, mutants = argv[0], Path(argv[1])
    res = results(mutants)
    if cmd == "sample":
        pending = sorted(k for k, v in res.items() if v is None)
        print("\n".join(random.Random(15).sample(pending, min(int(argv[2]), len(pending)))))
        return
    names = set(Path(argv[2]).read_text().split()) if len(argv) > 2 else set(res)
    got = {k: v for k, v in res.items() if k in names and v is not None}
    c = Counter(got.values())
    killed, survived, timeout, no_test = c.get(1, 0), c.get(0, 0), c.get(-24, 0), c.get(33, 0)
    tested = killed + survived + timeout
    print(f"mutants in the sample run: {len(got)} of {len(names)} ({len(res)} generated)")
    print(f"killed {killed}, timed out {timeout} (counted as killed), survived {survived}, no covering test {no_test}")
    if tested:
        print(f"score: {100 * (killed + timeout) / tested:.1f}% of the {tested} covered mutants killed")
    by_file = Counter(k.split(".x")[0] for k, v in got.items() if v == 0)
    for mod, n in by_file.most_common():
        print(f"  survivors in {mod}: {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
