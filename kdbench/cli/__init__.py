"""The ``kdbench`` command line (entry point ``kdbench.cli:main``; ``python -m kdbench``).

- :mod:`~kdbench.cli.root`: the ``kdbench`` group, its one-line error handling, its commands;
- :mod:`~kdbench.cli.options`: what commands share (``--tracking-uri``, ``--data-dir`` and
  ``--data-option``, ``KEY=VALUE`` parsing);
- one module per command or command group: :mod:`~kdbench.cli.catalog` (list, plugins, show),
  :mod:`~kdbench.cli.run`, :mod:`~kdbench.cli.tune`, :mod:`~kdbench.cli.bench`,
  :mod:`~kdbench.cli.ui`, :mod:`~kdbench.cli.leaderboard`, :mod:`~kdbench.cli.data`,
  :mod:`~kdbench.cli.plugin`.

Commands import only :mod:`~kdbench.cli.options`, never one another; the heavy imports (torch,
MLflow, Optuna, the workflows) happen inside the command functions, so ``kdbench --help`` is fast;
the catalog commands (list, plugins, show) print from a cache once the plugins were loaded once, so
they import neither the plugins nor torch (tests/benchmarks/cli_startup.py measures both).
"""
from kdbench.cli.root import main

__all__ = ["main"]
