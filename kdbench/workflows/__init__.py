"""Workflows: a run (teachers and students, tracked in MLflow), tuning, suites and leaderboards,
plugin scaffolding. They return data; the CLI formats it. Imports the core and the public API."""
