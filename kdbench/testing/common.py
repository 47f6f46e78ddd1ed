"""What every check of the kit shares: failures that name what is checked, one CPU thread, and
finding a plugin's registration by name."""
from __future__ import annotations

import contextlib
import functools

import torch

from kdbench.core import plugins


class Fail:
    """Builds AssertionErrors prefixed with what is being checked."""

    def __init__(self, owner: str):
        self.owner = owner

    def __call__(self, message: str) -> AssertionError:
        return AssertionError(f"{self.owner}: {message}")

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise self(message)


@contextlib.contextmanager
def _one_thread():
    """Run on one CPU thread: the checked networks are tiny, and on a shared machine several
    threads mostly wait for each other (often 10x slower); one thread is also reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_threaded(fn):
    """Decorate a check to run on one CPU thread (see :func:`_one_thread`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper


def find_registered(reg: plugins.Registry, kind: str, name: str) -> object:
    """The method, model or dataset (``kind``: "methods", "models", "datasets") registered as
    ``name``; else an AssertionError that says why it is not: the plugin that failed to load, or
    how to install and register it."""
    table = getattr(reg, kind)
    if name in table:
        return table[name].obj
    singular = kind[:-1]
    related = [failure for failure in reg.failures if repr(name) in failure.error or name in (failure.plugin, failure.dist)]
    failures = related or reg.failures
    if failures:
        lines = "; ".join(failure.line() for failure in failures)
        raise AssertionError(
            f"{singular} {name!r} is not registered because a plugin failed to load: {lines}"
        )
    known = ", ".join(sorted(table)) or "none"
    raise AssertionError(
        f"{singular} {name!r} is not registered (registered {kind}: {known}). Is your package "
        f"installed (`pip install -e .`) with an entry point in the `kdbench` group whose module "
        f"implements register_{kind}? Check with `kdbench plugins`."
    )
