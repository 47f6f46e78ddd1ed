"""Built-in methods: each module here defines ``METHODS``, a list registered below."""
from kdbench import hookimpl

from .. import KDBENCH_API, each_module  # noqa: F401  (KDBENCH_API: the API these target)


@hookimpl
def register_methods(register):
    for module in each_module(__name__, __path__):
        for thing in module.METHODS:
            register(thing)
