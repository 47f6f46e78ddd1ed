"""What several ``kdbench`` commands share: the ``--tracking-uri`` option and opening the tracker
it names, the ``--data-dir``/``--data-option`` pair and its parser, ``KEY=VALUE`` parsing (also
for ``--set``), and the plugin kinds as an argument type.

Only click is imported here, so every command module can use it without slowing ``kdbench --help``;
the workflows are imported inside the functions that need them.
"""
from __future__ import annotations

import click

from kdbench.errors import KdbenchError

#: the registry's plural kinds (``kdbench list KIND``)
KINDS = ("methods", "models", "datasets")

#: one kind of plugin object, as an argument (``kdbench show KIND``, ``kdbench plugin check KIND``)
KIND = click.Choice(["method", "model", "dataset"])

tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking URI [default: sqlite:///mlflow.db in the working directory].",
)

DATA_DIR_HELP = "Where the dataset's files are (datasets that read files)."
DATA_OPTION_HELP = "A dataset option (repeatable), e.g. size=64 for image_folder."


def tracking_uri_or_default(uri: str | None) -> str:
    """``--tracking-uri`` as given, else kdbench's default store."""
    from kdbench.workflows.tracking import default_tracking_uri

    return uri or default_tracking_uri()


def open_tracker(uri: str | None):
    """The :class:`~kdbench.workflows.tracking.Tracker` on ``--tracking-uri`` (or the default)."""
    from kdbench.workflows.tracking import Tracker

    return Tracker(tracking_uri_or_default(uri))


def parse_key_values(pairs, option: str = "--set") -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict (stripped); a pair without ``=`` is an error naming ``option``."""
    parsed = {}
    for pair in pairs:
        if "=" not in pair:
            raise KdbenchError(f"{option} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key in parsed and parsed[key] != value.strip():
            raise KdbenchError(f"{option} {key} given twice ({parsed[key]!r} and {value.strip()!r}); keep one")
        parsed[key] = value.strip()
    return parsed


def writable_file(path: str | None, option: str) -> None:
    """A file ``option`` will write: its folder must exist and be writable — said before any work
    is done, not as an error after it."""
    if not path:
        return
    import os
    from pathlib import Path

    target = Path(path).expanduser()
    folder = target.resolve().parent
    if target.is_dir():
        raise KdbenchError(f"{option} {path}: is a folder; pass a file path")
    if not folder.is_dir():
        raise KdbenchError(f"{option} {path}: folder {folder} does not exist; create it or pass another path")
    if not os.access(folder, os.W_OK):
        raise KdbenchError(f"{option} {path}: folder {folder} is not writable; pass another path")


def data_option_flags(dir_help: str = DATA_DIR_HELP, option_help: str = DATA_OPTION_HELP):
    """Adds ``--data-dir`` (parameter ``data_dir``) and ``--data-option KEY=VALUE`` (parameter
    ``data_opts``) to a command; turn them into load options with :func:`data_options`."""
    data_dir = click.option("--data-dir", default=None, help=dir_help)
    data_option = click.option("--data-option", "data_opts", multiple=True, metavar="KEY=VALUE",
                               help=option_help)

    def decorate(command):
        return data_dir(data_option(command))

    return decorate


def data_options(data_dir: str | None, pairs) -> dict[str, str]:
    """``--data-dir`` and ``--data-option KEY=VALUE`` as the dataset's load options."""
    options = parse_key_values(pairs, "--data-option")
    if data_dir:
        options["data_dir"] = data_dir
    return options


#: kdbench.core.precision.PRECISIONS and kdbench.core.capture.CAPTURES, spelled out here so that
#: ``kdbench --help`` does not import torch (a test keeps them equal)
PRECISIONS = ("bf16", "fp32")
CAPTURES = ("none", "compile", "graphs", "compile+graphs")


def _one_of(choices: tuple[str, ...]):
    """A click callback: the value if it is one of ``choices``, else one error line and exit 2."""
    def check(ctx, param, value):
        if value is None or value in choices:
            return value
        click.echo(f"error: unknown {param.opts[0]} {value!r}; choose one of: {', '.join(choices)}", err=True)
        ctx.exit(2)

    return check


def engine_flags(command):
    """Adds ``--precision`` (parameter ``precision``) and ``--capture`` (parameter ``capture``)."""
    precision = click.option(
        "--precision", default=None, metavar="[bf16|fp32]", callback=_one_of(PRECISIONS),
        help="Numeric precision of the networks (losses are always float32) [default: bf16 on CUDA, fp32 on CPU].")
    capture = click.option(
        "--capture", default=None, metavar="[none|compile|graphs|compile+graphs]", callback=_one_of(CAPTURES),
        help="How training steps run: none (eager), compile (torch.compile of the networks), graphs "
             "(the whole step replayed as a CUDA graph; CUDA only), compile+graphs (both; CUDA only) [default: compile+graphs on CUDA, none elsewhere]. A method whose "
             "step cannot be captured runs eagerly, saying so.")
    return precision(capture(command))


threads_option = click.option(
    "--threads", type=int, default=None, metavar="N", envvar="KDBENCH_THREADS",
    help="CPU threads of this process [default: a fair share of the cores among the kdbench trainings "
         "running on this machine, adjusted between epochs].")


def cpu_share(threads: int | None):
    """Register this training process and set its CPU threads (:mod:`kdbench.core.threads`);
    returns a per-epoch callback that keeps the share fair while other trainings start and stop."""
    from kdbench.core import threads as cpu

    share = cpu.take_share(threads)
    return lambda event: cpu.rebalance(share)


#: kdbench.workflows.executors.EXECUTORS and DEFAULT_RUNS_PER_GPU, spelled out so that ``--help``
#: imports no workflow (tests/distributed/test_executors.py keeps them equal)
EXECUTORS = ("local", "ray")
DEFAULT_RUNS_PER_GPU = 1


def _at_least_one(ctx, param, value):
    if value is None or value >= 1:
        return value
    click.echo(f"error: {param.opts[0]} must be at least 1, got {value}", err=True)
    ctx.exit(2)


def executor_flags(command):
    """Adds ``--executor`` (parameter ``executor``), ``--ray-address`` (``ray_address``, also
    ``$RAY_ADDRESS``, Ray's own convention) and ``--runs-per-gpu`` (``runs_per_gpu``)."""
    executor = click.option(
        "--executor", default="local", show_default=True, metavar="[local|ray]", callback=_one_of(EXECUTORS),
        help="local: worker processes on this machine; ray: Ray tasks on a Ray cluster (pip install 'kdbench[ray]').")
    address = click.option(
        "--ray-address", envvar="RAY_ADDRESS", default=None, metavar="HOST:PORT",
        help="The Ray cluster's head (as printed by `ray start --head`) [default: $RAY_ADDRESS, else a Ray "
             "instance started on this machine].")
    per_gpu = click.option(
        "--runs-per-gpu", type=int, default=DEFAULT_RUNS_PER_GPU, show_default=True, callback=_at_least_one,
        help="Runs packed on one GPU (each takes 1/K of it); 4 runs on one H100 gave 3.35x the throughput of "
             "one. No effect without GPUs.")
    return executor(address(per_gpu(command)))
