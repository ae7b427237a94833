"""Errors that are the user's to fix: the CLI prints their message, no traceback."""


class UserError(Exception):
    """Bad input (config, file, argument). The message says what and where."""

    exit_code = 2
