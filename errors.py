"""The one error family: every error a user can cause (a file, a key, a value, a setting) derives from UserError,
which each entry point prints as one line, `error: ...`, with exit status 2 (utils.run_cli), never a traceback."""


class UserError(ValueError):
    """Bad input from the user (a file, a key, a value): reported as one line, without a traceback."""


class ParamsError(UserError):
    """params.json (or a --set override) is missing, unreadable, or holds an unknown key or a value not allowed."""
