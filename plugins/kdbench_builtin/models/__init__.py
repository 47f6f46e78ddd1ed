"""Built-in models: each module here defines ``MODELS``, a list registered below."""
from kdbench import hookimpl

from .. import KDBENCH_API, each_module  # noqa: F401  (KDBENCH_API: the API these target)


@hookimpl
def register_models(register):
    for module in each_module(__name__, __path__):
        for thing in module.MODELS:
            register(thing)
