"""`peftlab` console command: one argparse parser, one subcommand per module in COMMANDS."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import compare_cmd, eval_cmd, generate_cmd, inspect_cmd, merge_cmd, methods_cmd, train_cmd
from .errors import CliError

# Each entry: a module with NAME, HELP, DESCRIPTION, add_arguments(parser) and run(args) -> int.
COMMANDS = [train_cmd, eval_cmd, generate_cmd, merge_cmd, compare_cmd, inspect_cmd, methods_cmd]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning of pretrained transformers.",
        epilog="Run `peftlab COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.DESCRIPTION)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what was wrong and what to do: shown as one line."""
    from ..core.config import ConfigError
    from ..data import DataError
    from ..io.adapter_files import AdapterFileError
    from ..models import ModelSourceError

    return (CliError, ConfigError, DataError, AdapterFileError, ModelSourceError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `peftlab`: show the commands rather than a terse usage line
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except _user_errors() as err:
        if args.debug:
            raise
        print(f"peftlab {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `peftlab inspect big-model | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
