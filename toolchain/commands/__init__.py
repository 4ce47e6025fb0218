"""CLI sub-commands, one module each (see toolchain/cli.py)."""
