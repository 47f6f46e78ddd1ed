"""Hook specifications: the whole plugin contract.

A plugin is a module named by an entry point in the ``kdbench`` group. It implements any of
these hooks with :data:`kdbench.hookimpl`; each receives a ``register`` callback and calls it
once per thing it provides::

    from kdbench import hookimpl
    from kdbench.contracts import Method

    @hookimpl
    def register_methods(register):
        register(Method(name="mine", loss=my_loss, description="..."))

A hook takes one argument, named ``register`` (pluggy passes it by name); a misnamed hook or
argument is refused with one line, and a module that registers nothing is shown as ``empty`` with a
warning. Names are unique per distribution; a name two distributions register is usable only as
``DIST:NAME`` until one is removed (see :mod:`kdbench.core.plugins`).

A module may declare ``KDBENCH_API = 1`` (the API version it targets); a plugin targeting a
different major version is refused with a message and the rest of kdbench keeps working.
"""
import pluggy

hookspec = pluggy.HookspecMarker("kdbench")


@hookspec
def register_methods(register):
    """Call ``register(method)`` with a :class:`kdbench.contracts.Method` for each method."""


@hookspec
def register_models(register):
    """Call ``register(model)`` with a :class:`kdbench.contracts.Model` for each model."""


@hookspec
def register_datasets(register):
    """Call ``register(dataset)`` with a :class:`kdbench.contracts.Dataset` for each dataset."""


@hookspec
def register_leaderboards(register):
    """Call ``register(leaderboard)`` with a :class:`kdbench.contracts.Leaderboard` for each suite
    file the plugin ships (found by name by ``kdbench bench`` and ``kdbench leaderboard``)."""
