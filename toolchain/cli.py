"""`toolchain` command line. Each sub-command is a module in toolchain/commands/ exposing
NAME, HELP, EXAMPLE, add_arguments(parser) and run(args) -> int, listed in COMMANDS below.
Commands use the public API only (`toolchain`, its public modules, `converters`).

User errors (ToolchainError) print one line and exit 2; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._version import __version__
from .errors import ToolchainError


COMMANDS = ("bench", "compress", "eval", "export", "import_", "info", "sensitivity", "train", "zoo")


def _commands():
    mods = [importlib.import_module(f"{__package__}.commands.{name}") for name in COMMANDS]
    return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolchain",
        description="Model compression toolchain: import ONNX/Caffe, compress (prune, low-rank, hashing), "
        "export compact ONNX, measure.",
        epilog="example:\n  toolchain compress models/lenet-300-100/lenet-300-100.onnx "
               "-r models/lenet-300-100/prune.toml -o out/pruned.onnx\n"
               "`toolchain COMMAND --help` shows each command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, epilog=mod.EXAMPLE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except ToolchainError as e:
        if args.debug:
            raise
        print(f"toolchain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toolchain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
