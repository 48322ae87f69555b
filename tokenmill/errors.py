"""The one exception type that reaches a user as a single line instead of a traceback."""


class TokenmillError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""
