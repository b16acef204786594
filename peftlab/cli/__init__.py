"""The `peftlab` command line.

`main.py` builds one argparse parser with a subcommand per module listed in `main.COMMANDS`. A command
module defines NAME, HELP, DESCRIPTION, `add_arguments(parser)` and `run(args) -> int`, and raises
`CliError` for anything the user should fix (printed as one line, exit status 1, no traceback). Adding a
command (train, eval, generate, merge, compare, ...) is one module plus one entry in `COMMANDS`.
"""

from .errors import CliError

__all__ = ["CliError"]
