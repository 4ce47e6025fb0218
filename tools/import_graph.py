"""Print the import graph of the project's packages: edges between top-level packages (and, with
--depth 2, between their sub-packages), counts of import statements, and any cycle.

    python tools/import_graph.py [--depth 2] [--check]

--check exits 1 when there is a cycle or an import from `converters` up to `toolchain`.
Deferred imports (inside functions) count the same as module-level ones.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("converters", "toolchain")
LOWER_TO_HIGHER = {"converters": 0, "toolchain": 1}  # a package may import only from packages at or below its level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[str]:
    """Absolute module names imported by the file (relative imports resolved)."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` may name a sub-module: count that module where it exists
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                out.append(sub if _is_module(sub) else target)
    return [m for m in out if m.split(".")[0] in PACKAGES]


def group(mod: str, depth: int) -> str:
    return ".".join(mod.split(".")[:depth])


def edges(depth: int) -> Counter:
    count: Counter = Counter()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            src = group(module_name(path), depth)
            for target in imports_of(path):
                dst = group(target, depth)
                if dst != src:
                    count[(src, dst)] += 1
    return count


def find_cycle(count: Counter) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in count:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=1, help="1: top-level packages; 2: their sub-packages")
    ap.add_argument("--check", action="store_true", help="exit 1 on a cycle or an upward import")
    args = ap.parse_args(argv)
    count = edges(args.depth)
    for (a, b), n in sorted(count.items()):
        print(f"{a} -> {b}: {n}")
    bad = [(a, b) for (a, b) in count if LOWER_TO_HIGHER[a.split('.')[0]] < LOWER_TO_HIGHER[b.split('.')[0]]]
    cycle = find_cycle(count)
    print(f"upward imports: {len(bad)}" + (f" ({', '.join(f'{a} -> {b}' for a, b in bad)})" if bad else ""))
    print(f"cycle: {' -> '.join(cycle) if cycle else 'none'}")
    return 1 if args.check and (bad or cycle) else 0


if __name__ == "__main__":
    sys.exit(main())
