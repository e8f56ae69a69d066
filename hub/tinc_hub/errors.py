"""The one exception type the CLI turns into a one-line error message."""

from typing import Optional


class HubError(Exception):
    """A user-facing failure: a one-line message plus an optional hint."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message
