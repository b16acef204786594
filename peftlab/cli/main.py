"""`peftlab` console command: one argparse parser, one subcommand per module in COMMANDS."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import (compare_cmd, eval_cmd, export_cmd, generate_cmd, inspect_cmd, merge_cmd, methods_cmd, serve_cmd,
               train_cmd)
from .errors import DEBUG_ENV, report

# Each entry: a module with NAME, HELP, DESCRIPTION, add_arguments(parser) and run(args) -> int.
COMMANDS = [train_cmd, eval_cmd, generate_cmd, merge_cmd, export_cmd, compare_cmd, inspect_cmd, methods_cmd, serve_cmd]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, the options of that command alone (another command's add_arguments may import
    torch, e.g. to list the formats it writes: `peftlab train --help` must not pay for it)."""
    from importlib.metadata import version  # the installed package's (pyproject.toml); the package root sits above cli

    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning of pretrained transformers.",
        epilog="Run `peftlab COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {version('peftlab')}")
    debug_help = f"show the full traceback when a command fails (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.DESCRIPTION)
        # also after the command (`peftlab train x.yaml --debug`); SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if only is None or cmd.NAME == only:
            cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command named on the line (the first word that is not an option); none named: no command's options.
    named = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=named)
    if not argv:  # bare `peftlab`: show the commands rather than a terse usage line
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    # The one error boundary of every command: an error the user can fix is one line, exit status 1; a bug keeps
    # its traceback. Commands import torch and transformers inside run(), so parsing and --help never do.
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `peftlab inspect big-model | head`
        sys.stderr.close()
        return 0
    except Exception as err:
        line = report(err)
        if line is None or args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"peftlab {args.command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
