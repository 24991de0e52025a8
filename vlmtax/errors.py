"""User-facing errors: one line that names the problem and the fix, no traceback."""


class VlmtaxError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
