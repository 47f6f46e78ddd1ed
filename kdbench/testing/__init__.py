"""A conformance kit for plugin authors: call it from your own tests.

::

    from kdbench.testing import check_method

    def test_conformance():
        check_method("mymethod")

``make_step(...)`` builds a :class:`~kdbench.contracts.Step` of random tensors for a loss's own
unit tests (see :mod:`~kdbench.testing.steps`).

Each ``check_*`` loads the installed plugins (your package must be installed, e.g. ``pip install
-e .``), finds the thing by name and exercises its contract for real: declarations, real forward
and backward passes through the harness's own code paths (:func:`kdbench.core.engine.setup_student`,
:class:`kdbench.core.taps.Tapped`), a short training run and determinism under a seed. A violation
raises :class:`AssertionError` whose message says what is wrong and what to change. The checks
run on the CPU on a subset of the training data, so they take seconds, not a benchmark run.

Names: ``DIST:NAME`` (``check_method("kdbench-mymethod:mymethod")``) checks the one your
distribution registers and fails when one of its plugins failed to load; a plain name fails when
several distributions register it, or when it resolves to another distribution than the plugin
named after it (entry point ``NAME`` or distribution ``kdbench-NAME``).

Modules: :mod:`~kdbench.testing.methods` (``check_method``; hyperparameter declarations in
:mod:`~kdbench.testing.hparams`), :mod:`~kdbench.testing.models` (``check_model``),
:mod:`~kdbench.testing.datasets` (``check_dataset``) and :mod:`~kdbench.testing.common` (what
they share: failure messages, one CPU thread, registry lookup).
"""
from __future__ import annotations

from kdbench.testing.datasets import check_dataset
from kdbench.testing.methods import check_method
from kdbench.testing.models import check_model
from kdbench.testing.steps import make_step

__all__ = ["check_method", "check_model", "check_dataset", "make_step"]
