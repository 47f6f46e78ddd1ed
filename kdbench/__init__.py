"""kdbench: a plugin-based benchmark harness for knowledge distillation.

The public API for plugin authors is :mod:`kdbench.contracts` (what a method, model or dataset
is) and :mod:`kdbench.hookspecs` (how a plugin registers them); :data:`hookimpl` marks a
plugin's hook implementations.
"""
from importlib.metadata import PackageNotFoundError, version as _version

import pluggy

try:
    __version__ = _version("kdbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

#: The plugin API version. A plugin declaring ``KDBENCH_API = N`` with a different major is refused.
API_VERSION = 1

hookimpl = pluggy.HookimplMarker("kdbench")

__all__ = ["API_VERSION", "__version__", "hookimpl"]
