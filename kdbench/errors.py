"""Errors that the CLI turns into one line and a non-zero exit (no traceback unless --debug)."""
import difflib


class KdbenchError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class NonFiniteLoss(KdbenchError):
    """The training loss became NaN or infinite."""


def closest(name: str, choices) -> str:
    """'; did you mean X?' for the nearest names, or '' when nothing is close."""
    near = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(near)}?" if near else ""
