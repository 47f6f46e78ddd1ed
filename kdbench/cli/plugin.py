"""`kdbench plugin …`: write your own plugin (scaffold a package) and check one against the
contract (the conformance kit of :mod:`kdbench.testing`)."""
from __future__ import annotations

import click

from kdbench.cli.options import KIND, data_option_flags, data_options, parse_key_values
from kdbench.errors import KdbenchError


@click.group("plugin")
def plugin_group():
    """Write a plugin: scaffold a package, check one against the contract."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--kind", type=KIND, default="method", show_default=True, help="What the plugin provides.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where to create the package folder kdbench-NAME/.")
def new_cmd(name, kind, directory):
    """Scaffold a ready-to-publish plugin package providing one NAME.

    It holds a pyproject.toml with the `kdbench` entry point, one module declaring KDBENCH_API, a
    conformance test (kdbench.testing) and a README; `pip install -e .` and `pytest` work as is."""
    from kdbench.core import plugins
    from kdbench.workflows import scaffold

    root, files = scaffold.create(name, kind, directory, registry=plugins.registry())
    names = scaffold.names(name)
    click.echo(f"created {root}/")
    for path in files:
        click.echo(f"  {path.relative_to(root)}")
    click.echo("next:")
    click.echo(f"  cd {root} && pip install -e '.[test]'")
    click.echo(f"  pytest                      # kdbench's conformance kit on {names['name']}")
    click.echo(f"  kdbench list {kind}s         # {names['name']} ... ({names['dist']} 0.1.0)")


@plugin_group.command("check")
@click.argument("kind", type=KIND)
@click.argument("name")
@click.option("--trials", type=int, default=50, show_default=True,
              help="Optuna trials sampled from a method's search space.")
@click.option("--dataset", default=None, help="A method: check it on this dataset [default: the embedded one].")
@click.option("--teacher", default=None, help="A method: this teacher [default: the dataset's].")
@click.option("--student", default=None, help="A method: this student [default: the dataset's].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A method: a hyperparameter fixed in every check (repeatable).")
@data_option_flags(dir_help="Where the dataset's files are (checking a dataset, or a method on one).")
def check_cmd(kind, name, trials, dataset, teacher, student, sets, data_dir, data_opts):
    """Run the conformance kit (kdbench.testing) on an installed method, model or dataset.

    NAME may be DIST:NAME (e.g. kdbench-mymethod:mymethod) to check the one your distribution
    registers, and to fail when any of its plugins failed to load."""
    from kdbench import testing

    pair = {"dataset": dataset, "teacher": teacher, "student": student}
    given = [f"--{key}" for key, value in {**pair, "set": sets}.items() if value]
    if kind != "method" and given:
        raise KdbenchError(f"{', '.join(given)} apply to `kdbench plugin check method`, not to a {kind}")
    options = data_options(data_dir, data_opts)
    if kind == "model" and options:
        raise KdbenchError("--data-dir/--data-option apply to checking a method or a dataset, not a model")
    try:
        if kind == "method":
            testing.check_method(name, trials=trials, options=options, hparams=parse_key_values(sets), **pair)
        elif kind == "model":
            testing.check_model(name)
        else:
            testing.check_dataset(name, options=options)
    except AssertionError as exc:
        raise KdbenchError(f"does not conform: {exc}") from None
    click.echo(f"ok: {kind} {name!r} conforms to the kdbench plugin contract")
