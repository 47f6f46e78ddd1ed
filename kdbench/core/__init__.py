"""The core: everything a run needs below the workflows.

* :mod:`~kdbench.core.plugins` — plugin discovery and the :class:`~kdbench.core.plugins.Registry`;
* :mod:`~kdbench.core.plan` — a run's configuration, its plan, the config hash and teacher key;
* :mod:`~kdbench.core.compose` — combined methods (``a+b``);
* :mod:`~kdbench.core.taps` — feature taps read by forward hooks, and which taps a method reads;
* :mod:`~kdbench.core.splits` — device-resident data and batched augmentation;
* :mod:`~kdbench.core.engine` — the training engine: model building, training, evaluation;
* :mod:`~kdbench.core.metrics` — accuracy, convergence, parameters and FLOPs.

It imports only the public API (``kdbench``, ``kdbench.contracts``, ``kdbench.hookspecs``,
``kdbench.errors``, ``kdbench.losses``, ``kdbench.data``, ``kdbench.recipes``) and its own
modules, never the workflows, the testing kit or the CLI.
"""
