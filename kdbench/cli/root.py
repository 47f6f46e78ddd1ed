"""The ``kdbench`` group: its options (``--debug``, ``--version``), its error handling (every bad
input is one line on stderr and a non-zero exit; ``--debug`` shows the traceback) and its commands,
one module each."""
from __future__ import annotations

import os
import sys

import click

from kdbench import __version__
from kdbench.cli import bench, catalog, data, leaderboard, plugin, run, tune, ui
from kdbench.errors import KdbenchError


class OneLineErrorGroup(click.Group):
    """Turns every error into one line (and exit 1) unless --debug."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return result
        except click.UsageError as exc:  # a bad choice, an unknown option, a missing argument: one line too
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            from kdbench.workflows import interrupts  # the standard library only: cheap

            terminated = interrupts.terminated()  # SIGTERM, handled as Ctrl-C: exit 128 + 15
            _end_own_runs(interrupts.interrupted_by())
            click.echo(f"interrupted{' by SIGTERM' if terminated else ''}; the run is marked KILLED in MLflow",
                       err=True)
            sys.exit(143 if terminated else 130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(one_line(exc), err=True)
            sys.exit(1)


def _end_own_runs(how: str = "Ctrl-C") -> None:
    """After Ctrl-C (or SIGTERM): any run this process still owns ends KILLED — the workflows end
    their own, but a Ctrl-C can land between a run's creation and the code that would end it."""
    from kdbench.workflows import claims  # the standard library only: cheap

    claims.end_owned_runs(f"interrupted ({how})")


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``kdbench show … | head``): stop without a message, as
    other command-line tools do. stdout is pointed at /dev/null so that Python's own flush at exit
    does not report the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass
    sys.exit(1)


def one_line(exc: Exception) -> str:
    """The error line for ``exc``: a :class:`KdbenchError` as it is, anything else as a failure
    of a plugin or kdbench with its first line."""
    if isinstance(exc, KdbenchError):
        return "error: " + " ".join(str(exc).split())
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
    _warnings_as_lines()
    from kdbench.workflows import interrupts  # here: `kdbench --help` loads no workflow

    interrupts.keep_ctrl_c()
    interrupts.sigterm_as_ctrl_c()  # kill, systemd, Slurm, docker stop: stopped as by Ctrl-C


def _warnings_as_lines() -> None:
    """kdbench's own warnings (e.g. a damaged cache file set aside) as ``warning: …`` lines on stderr."""
    import logging

    log = logging.getLogger("kdbench")
    if not any(getattr(handler, "kdbench", False) for handler in log.handlers):
        class _Stderr(logging.StreamHandler):
            """Writes to the current ``sys.stderr``, looked up per line (click's test runner and
            pytest swap it between commands)."""

            stream = property(lambda self: sys.stderr, lambda self, value: None)

        handler = _Stderr()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.kdbench = True
        log.addHandler(handler)
        log.propagate = False


COMMANDS = (
    catalog.list_cmd, catalog.plugins_cmd, catalog.show_cmd,
    run.run_cmd, tune.tune_cmd, bench.bench_cmd, ui.ui_cmd, leaderboard.leaderboard_cmd,
    data.data_group, plugin.plugin_group,
)

for _command in COMMANDS:
    main.add_command(_command)
