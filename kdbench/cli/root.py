"""The ``kdbench`` group: its options (``--debug``, ``--version``), its error handling (every bad
input is one line on stderr and a non-zero exit; ``--debug`` shows the traceback) and its commands,
one module each."""
from __future__ import annotations

import sys

import click

from kdbench import __version__
from kdbench.cli import bench, catalog, data, leaderboard, plugin, run, tune, ui
from kdbench.errors import KdbenchError


class OneLineErrorGroup(click.Group):
    """Turns every error into one line (and exit 1) unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; the run is marked KILLED in MLflow", err=True)
            sys.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(one_line(exc), err=True)
            sys.exit(1)


def one_line(exc: Exception) -> str:
    """The error line for ``exc``: a :class:`KdbenchError` as it is, anything else as a failure
    of a plugin or kdbench with its first line."""
    if isinstance(exc, KdbenchError):
        return f"error: {exc}"
    lines = str(exc).strip().splitlines()
    return (f"error: {type(exc).__name__}: {lines[0] if lines else ''} "
            "(a plugin or kdbench failed; rerun with --debug for the traceback)")


@click.group(cls=OneLineErrorGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="kdbench")
@click.pass_context
def main(ctx, debug):
    """kdbench: benchmark knowledge-distillation methods."""
    ctx.obj = {"debug": debug}


COMMANDS = (
    catalog.list_cmd, catalog.plugins_cmd, catalog.show_cmd,
    run.run_cmd, tune.tune_cmd, bench.bench_cmd, ui.ui_cmd, leaderboard.leaderboard_cmd,
    data.data_group, plugin.plugin_group,
)

for _command in COMMANDS:
    main.add_command(_command)
