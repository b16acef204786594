"""The error every command raises for a problem the user can fix."""


class CliError(Exception):
    """Printed as `peftlab <command>: error: <message>` with exit status 1, no traceback."""
