"""`kdbench plugin …`: write your own plugin (scaffold a package) and check one against the
contract (the conformance kit of :mod:`kdbench.testing`)."""
from __future__ import annotations

import click

from kdbench.cli.options import KIND, data_option_flags, data_options
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
@data_option_flags(dir_help="Where a dataset's files are.")
def check_cmd(kind, name, trials, data_dir, data_opts):
    """Run the conformance kit (kdbench.testing) on an installed method, model or dataset."""
    from kdbench import testing

    try:
        if kind == "method":
            testing.check_method(name, trials=trials)
        elif kind == "model":
            testing.check_model(name)
        else:
            testing.check_dataset(name, options=data_options(data_dir, data_opts))
    except AssertionError as exc:
        raise KdbenchError(f"does not conform: {exc}") from None
    click.echo(f"ok: {kind} {name!r} conforms to the kdbench plugin contract")
