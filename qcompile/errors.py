"""User-facing errors.

A `UserError` is a problem with what the user gave us (a path, an option, a model folder). The CLI
prints its message as one line on stderr and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, node or option and says what is wrong, in one line."""


class MissingDependencyError(UserError):
    """An optional package a target or feature needs is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'qcompile[{extra}]'")
