"""The one error type that crosses the CLI edge (pipx style).

Everything the user can get wrong, and every kernel refusal we can explain, is raised
as :class:`OvlrunError` with a message meant for a human.  ``cli.main`` catches it, prints
``ovlrun: <message>`` and exits with ``status``; an ``OSError``, ``MemoryError`` or
``RecursionError`` nothing turned into one is one line and 125 there too (a safety net:
under a caller's resource limits anything may fail); anything else is a bug and may show
a traceback.
"""

from __future__ import annotations

# env(1)/chroot(1) conventions: 125 = the wrapper itself failed, 126 = command found but
# not executable, 127 = command not found.
EXIT_USAGE = 2  # a command line ovlrun cannot make sense of (every command, as typer does)
EXIT_OVLRUN = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class OvlrunError(Exception):
    """A failure with a message for the user; never shown with a traceback."""

    def __init__(self, message: str, status: int = EXIT_OVLRUN) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[OvlrunError], tuple[str, int]]:
        # Crosses process boundaries (the bounded walk worker) with its class and status;
        # every subclass takes (message, status).
        return (type(self), (self.message, self.status))
