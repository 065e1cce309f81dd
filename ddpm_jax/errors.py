"""The one base class of the errors a user can fix.

Every error that a wrong flag, config value, dataset, path or checkpoint can cause derives from
``UserError``; its message is one line that names the problem and the fix. The command-line layer
(``ddpm_jax.cli``) prints such an error as ``error: <message>`` and exits with code 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names it and says how.

    Attributes:
      exit_code: the exit code of a command that stops with this error.
    """

    exit_code = 2


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of ``error``'s message (its type's name if it has none), cut
    to ``limit`` characters: how a caught error is quoted inside a one-line message."""
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()),
                type(error).__name__)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
