"""A Ctrl-C that lands in a finalizer is not lost.

Python runs a signal handler wherever the main thread happens to be, a garbage-collection callback
included (SQLAlchemy's weak-reference callbacks run that way, among others). The KeyboardInterrupt
raised there cannot leave the callback: Python prints it as "Exception ignored in …" with a
traceback and goes on, so the run it was meant to stop keeps training. :func:`keep_ctrl_c`
replaces that print with calling the SIGINT handler again at the first line of Python that runs
outside the callback, through a one-shot trace function (as a debugger stops a program). Delivering
it again with ``_thread.interrupt_main`` would not do: the handler would run inside the hook, which
swallows exceptions the same way.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

_installed: list[Callable] = []


def keep_ctrl_c(before_redelivery: Callable[[], None] = lambda: None) -> None:
    """Install the hook in this process (once; later calls only replace ``before_redelivery``,
    which runs before the handler is called again: a handler that raises only once re-arms there).
    Other unraisable exceptions are reported as before."""
    if _installed:
        _installed[0] = before_redelivery
        return
    _installed.append(before_redelivery)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _installed[0]()
            _handle_at_next_line(sys._getframe(1))
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _handle_at_next_line(frame) -> None:
    """Call the SIGINT handler at the next line run in ``frame``'s stack or in any function
    called from now on (what it raises is raised there), then trace as before."""
    previous = sys.gettrace()
    frames = []
    while frame is not None:
        frames.append((frame, frame.f_trace))
        frame = frame.f_back

    def tracer(frame, event, arg):
        sys.settrace(previous)
        for traced, before in frames:
            traced.f_trace = before
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        return None

    for traced, _ in frames:
        traced.f_trace = tracer
    sys.settrace(tracer)
