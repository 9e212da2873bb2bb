"""The one exception type a user is meant to read: its message names the file and the fix."""

from __future__ import annotations


class InputError(ValueError):
    """A bad input file, folder or setting; the message says which and what to do about it."""


class WeightsUnavailableError(RuntimeError):
    """The backbone weights could not be loaded; the message says how to get them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job, ``kill``): stops the run as Ctrl-C does, with exit code 143."""
