"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix."""
