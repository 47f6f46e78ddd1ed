"""kdbench's built-in methods, models and datasets.

They are registered through the ``kdbench`` entry-point group exactly as a third-party package
registers its own (see pyproject.toml): nothing in the core names them.
"""
import importlib
import pkgutil

KDBENCH_API = 1


def each_module(package_name: str, package_path):
    """Import every module of a package (one file per method / model family / dataset)."""
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{package_name}.{info.name}")
