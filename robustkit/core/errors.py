"""Errors robustkit raises on purpose.

Every error a user can cause (a typo in a name, a malformed eps, missing data, a corrupt
checkpoint) is a :class:`RobustkitError`. The CLI turns these into one line on stderr and exit
code 2, so a traceback always means a robustkit bug rather than bad input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RobustkitError(Exception):
    """Base class of errors caused by input robustkit cannot use (CLI exit code 2)."""

    exit_code = 2


class UnknownNameError(RobustkitError, KeyError):
    """A model, attack or dataset name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        else:
            msg += f"; known {kind}s: {', '.join(known)}"
        super().__init__(msg)
        self.kind, self.name, self.close_matches = kind, name, close

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ConfigError(RobustkitError, ValueError):
    """A malformed option value (eps, norm, n-examples, batch size, preset file)."""


class DataError(RobustkitError):
    """A dataset that cannot be found, read or sliced as asked."""


class CheckpointError(RobustkitError):
    """A checkpoint that is missing, corrupt, or whose sha256 does not match its metadata."""


class InputRangeError(RobustkitError, ValueError):
    """Inputs outside [0, 1]: the model contract puts normalisation inside the model."""


class BudgetViolationError(RobustkitError):
    """An attack returned an adversarial example outside the threat model.

    This is never the user's fault, but it must stop the run: a robust accuracy computed from
    out-of-budget examples is wrong in the direction that flatters nobody and misleads everybody.
    """

    exit_code = 3


def close_matches_hint(name: str, known: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` or an empty string."""
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
