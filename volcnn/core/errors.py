"""The errors volcnn reports to a user as one message, each carrying the exit code of the ``volcnn`` command.

Library functions raise them with a message that names the file (or option) and the problem; the command's
``main`` maps them to exit codes in one place (:func:`volcnn.cli.main`), so every command agrees:

* 0: all good;
* 1 (:class:`VolcnnError`): an input could not be used (a damaged scan, a malformed datalist or CSV, a broken
  checkpoint); in a batch, the good inputs were still processed and the failures are listed;
* 2 (:class:`UsageError`): the command line is wrong (a path that does not exist, an invalid option value, a
  bundle or output folder that cannot be used) and nothing was processed.

Domain errors also derive from the builtin a caller would catch (``ValueError`` for bad content), so code written
against the builtins keeps working.
"""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "VolcnnError"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class VolcnnError(Exception):
    """An input or resource could not be used; the message names it and the problem. Exit code 1."""

    exit_code: int = EXIT_FAILED


class UsageError(VolcnnError):
    """The command line is wrong: a missing path, an invalid option, an unusable bundle or output folder. Exit 2."""

    exit_code = EXIT_USAGE
