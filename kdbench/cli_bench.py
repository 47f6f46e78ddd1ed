"""`kdbench` commands for this area; ``COMMANDS`` is added to the main group by kdbench.cli."""
import click  # noqa: F401

COMMANDS: list = []
