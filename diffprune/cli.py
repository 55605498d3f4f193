"""`diffprune` command line: one subcommand per module in `diffprune.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DiffPruneError, UsageError  # noqa: F401  (UsageError: its old home, re-exported)

# name -> module in diffprune.commands exposing add_parser(subparsers) and run(args) -> int
COMMANDS = ("train", "eval", "predict", "inspect", "merge", "compress", "serve")


def add_base_mismatch_flag(parser: argparse.ArgumentParser) -> None:
    """``--allow-base-mismatch``: the CLI's form of ``allow_base_mismatch=True``."""
    parser.add_argument(
        "--allow-base-mismatch", action="store_true",
        help="use a diff even when the base model's fingerprint differs from the one it was trained on "
             "(only when you know the weights are compatible: the outputs are otherwise meaningless)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprune", description="Diff pruning for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffprune.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"diffprune.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A process of a multi-process launch (torchrun) ends here, through
    `diffprune.training.distributed.end_process` (see there: torch's teardown of a used gloo group can abort
    a finished run)."""
    code = _run(build_parser().parse_args(argv))
    from .training.distributed import end_process, launched_processes

    if launched_processes() > 1:
        end_process(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.run(args) or 0)
    except (DiffPruneError, FileNotFoundError) as e:
        print(f"diffprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
