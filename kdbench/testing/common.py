"""What every check of the kit shares: failures that name what is checked, one CPU thread, and
finding a plugin's registration by name."""
from __future__ import annotations

import contextlib
import functools

import torch

from kdbench.core import plugins
from kdbench.errors import KdbenchError


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
    ``name`` (or ``DIST:NAME``: the one distribution ``DIST`` registered); else an AssertionError
    that says why it is not: the plugin that failed to load, or how to install and register it.

    It also fails when the name may not be the plugin's own: a name several distributions
    register; a plain ``name`` that resolves to another distribution than the plugin whose entry
    point (or distribution, ``kdbench-NAME``) is called ``name``; and, for ``DIST:NAME``, any
    plugin of ``DIST`` that failed to load."""
    singular = kind[:-1]
    table = getattr(reg, kind)
    qualified = ":" in name and plugins.normalize(name.split(":", 1)[0]) in {
        plugins.normalize(plugin.dist) for plugin in reg.plugins}
    if name in table or qualified or (kind, name) in reg.contested:
        try:
            entry = reg.entry(kind, name)
        except KdbenchError as exc:
            raise AssertionError(str(exc)) from None
        _require_own(reg, singular, name, entry, qualified)
        return entry.obj
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


def _owners(reg: plugins.Registry, name: str) -> list:
    """The plugins that look like ``name``'s own: entry point ``name`` or distribution ``kdbench-name``."""
    wanted = {plugins.normalize(name), plugins.normalize(f"kdbench-{name}")}
    return [plugin for plugin in reg.plugins if plugin.status != "disabled"
            and (plugin.plugin == name or plugins.normalize(plugin.dist) in wanted)]


def _require_own(reg: plugins.Registry, singular: str, name: str, entry: plugins.Entry,
                 qualified: bool) -> None:
    """AssertionError when ``entry`` may be another distribution's, or its plugin failed to load."""
    plain = name.split(":", 1)[1] if qualified else name
    contested = reg.contested.get((f"{singular}s", plain), [])
    if not qualified and len(contested) > 1 and entry.dist != plugins.CORE_DIST:
        raise AssertionError(plugins.contested_error(f"{singular}s", plain, contested))
    if qualified:
        failed = [failure for failure in reg.failures if plugins.normalize(failure.dist) == plugins.normalize(entry.dist)]
        if failed:
            raise AssertionError(
                f"{singular} {name!r} is registered, but a plugin of {entry.dist} failed to load: "
                + "; ".join(failure.line() for failure in failed)
            )
        return
    others = [plugin for plugin in _owners(reg, plain) if plugin.dist != entry.dist]
    if others:
        owner = others[0]
        state = "failed to load: " + next((f.error for f in reg.failures if (f.plugin, f.dist) == (owner.plugin, owner.dist)), "?") \
            if owner.status == "failed" else f"is {owner.status}"
        raise AssertionError(
            f"{singular} {plain!r} resolves to {entry.source} (plugin {entry.plugin}), not to plugin "
            f"{owner.plugin} of {owner.dist} {owner.version}, which {state}; check "
            f"`{owner.dist}:{plain}` to name the distribution under test"
        )
