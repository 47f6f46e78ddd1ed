"""The core: plugin loading and the registry, run plans (and combined methods), feature taps,
device-resident data, the training engine and metrics. Imports only the public API (``kdbench``,
``kdbench.contracts``, ``kdbench.errors``, ``kdbench.losses``, ``kdbench.data``, ``kdbench.recipes``)."""
