"""Ctrl-C where Python's default handling goes wrong: in a finalizer, and inside a store call.

*In a finalizer.*
Python runs a signal handler wherever the main thread happens to be, a garbage-collection callback
included (SQLAlchemy's weak-reference callbacks run that way, among others). The KeyboardInterrupt
raised there cannot leave the callback: Python prints it as "Exception ignored in …" with a
traceback and goes on, so the run it was meant to stop keeps training. :func:`keep_ctrl_c`
replaces that print with calling the SIGINT handler again at the first line of Python that runs
outside the callback, through a one-shot trace function (as a debugger stops a program). Delivering
it again with ``_thread.interrupt_main`` would not do: the handler would run inside the hook, which
swallows exceptions the same way.

*Inside a store call.* A KeyboardInterrupt raised while SQLite executes a statement (MLflow's and
Optuna's stores, through SQLAlchemy) leaves that connection's transaction open: the database stays
locked until the process exits, and ending the interrupted runs KILLED then fails with "database is
locked" after the 20 s busy timeout (seen in ``bench --lockstep --jobs 2``: runs left RUNNING, or
ended FAILED by the parent). :func:`hold_ctrl_c_in` makes each of a store client's calls whole: a
Ctrl-C during one is handled when it returns.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable

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

    for traced, _ in frames:
        traced.f_trace = tracer
    sys.settrace(tracer)


_holding = [0]  # depth of held() blocks in the main thread


@contextlib.contextmanager
def held():
    """Ctrl-C held off until the block ends, then handled as usual (what the handler raises is
    raised at the block's end). Only the main thread gets signals; elsewhere, and inside another
    held block, this does nothing."""
    handler = signal.getsignal(signal.SIGINT)
    if _holding[0] or not callable(handler) or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(frame))
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
        signal.signal(signal.SIGINT, handler)
        if pressed:
            handler(signal.SIGINT, pressed[0])


def hold_ctrl_c_in(client):
    """``client`` with each of its public methods run whole (:func:`held`); returned."""
    for name in dir(type(client)):
        method = getattr(client, name, None) if not name.startswith("_") else None
        if callable(method) and not isinstance(method, type):
            setattr(client, name, _held_call(method))
    return client


def _held_call(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
        with held():
            return method(*args, **kwargs)

    return call
