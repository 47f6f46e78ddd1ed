"""Ctrl-C where Python's default handling goes wrong: in a finalizer, and inside a store call; and
SIGTERM handled as Ctrl-C.

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

*SIGTERM.* What ``kill``, systemd, Slurm, docker stop and Ray send to stop a process. Python's default
ends the process at once: no cleanup, its MLflow run left RUNNING. :func:`sigterm_as_ctrl_c` makes it
a Ctrl-C in the command's process: the same KeyboardInterrupt (its text ``SIGTERM``, which the run's
``failure_reason`` shows), so every cleanup written for Ctrl-C runs; and SIGINT to the processes of
the group this process started, which a Ctrl-C in a terminal would have reached (a SIGTERM sent to
this process alone reaches none of them), so its workers stop as on Ctrl-C. The holds above hold
SIGTERM too.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable

_installed: list[Callable] = []
TERMINATED = "SIGTERM"  # the text of a KeyboardInterrupt that SIGTERM raised
_terminated: list[int] = []  # SIGTERM was received by this process


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
            signum = signal.SIGTERM if unraisable.exc_value.args == (TERMINATED,) else signal.SIGINT
            _handle_at_next_line(sys._getframe(1), signum)
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _handle_at_next_line(frame, signum: int = signal.SIGINT) -> None:
    """Call ``signum``'s handler at the next line run in ``frame``'s stack or in any function
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
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, frame)

    for traced, _ in frames:
        traced.f_trace = tracer
    sys.settrace(tracer)


_holding = [0]  # depth of held() blocks in the main thread


def _held_signals() -> tuple[int, ...]:
    return (signal.SIGINT, signal.SIGTERM) if hasattr(signal, "SIGTERM") else (signal.SIGINT,)


@contextlib.contextmanager
def held():
    """Ctrl-C (and SIGTERM handled as Ctrl-C) held off until the block ends, then handled as
    usual (what the handler raises is raised at the block's end). Only the main thread gets
    signals; elsewhere, and inside another held block, this does nothing."""
    handlers = {signum: signal.getsignal(signum) for signum in _held_signals()}
    handlers = {signum: handler for signum, handler in handlers.items() if callable(handler)}
    if _holding[0] or not handlers or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    for signum in handlers:
        signal.signal(signum, lambda signum, frame: pressed.append((signum, frame)))
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if pressed:
            signum, frame = pressed[0]
            handlers[signum](signum, frame)


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


def sigterm_as_ctrl_c() -> None:
    """Handle SIGTERM in this process as Ctrl-C (:func:`_on_sigterm`): the command's process, once.
    A SIGTERM already handled or ignored (``nohup``-style launchers, an embedding program) is left
    as it is; only the main thread can set a handler."""
    if (not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return
    signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    """Whether this process received SIGTERM (its command ends with exit status 143, not 130)."""
    return bool(_terminated)


def interrupted_by() -> str:
    """What interrupted this process, as its messages and runs' tags name it: SIGTERM or Ctrl-C."""
    return "SIGTERM" if _terminated else "Ctrl-C"


def _on_sigterm(signum, frame) -> None:
    """SIGTERM as Ctrl-C: SIGINT to the processes Ctrl-C would also have reached, then the
    KeyboardInterrupt that Python's SIGINT handler raises, with the text ``SIGTERM``."""
    _terminated.append(signum)
    for pid in _group_descendants():
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:  # ended meanwhile
            pass
    raise KeyboardInterrupt(TERMINATED)


def _group_descendants() -> list[int]:
    """The processes this one started (and theirs) that share its process group: those a Ctrl-C
    in a terminal reaches besides this one. From /proc; without it, this process's
    multiprocessing children."""
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        import multiprocessing

        return [child.pid for child in multiprocessing.active_children()]
    group, children = os.getpgrp(), {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as stat:
                ppid, pgrp = stat.read().rsplit(")", 1)[1].split()[1:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(pgrp) == group:
            children.setdefault(int(ppid), []).append(int(name))
    found, todo = [], [os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found
