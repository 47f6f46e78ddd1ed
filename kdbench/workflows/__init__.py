"""Workflows: what the CLI runs, built on the core and the public API. They return data (and
report progress as event objects); the CLI formats it.

* ``run``: one student run (plan, tags, metrics, the vanilla reference), ``teachers``: obtaining,
  caching and tracking teachers, ``provenance``: the tags every run carries, ``tracking``: MLflow;
* ``tune``: an Optuna study of a method, ``studies``: stored studies (storage, best trial,
  summaries, dead workers);
* ``suites``: leaderboard suite files, ``bench``: a suite's cells, planned, resumed and run,
  ``leaderboard``: tables, documents and figures from tracked runs;
* ``scaffold``: ``kdbench plugin new``.
"""
