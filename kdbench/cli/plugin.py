"""`kdbench plugin …`: write your own plugin (scaffold a package) and check one against the
contract (the conformance kit of :mod:`kdbench.testing`). ``COMMANDS`` is added to the main group
by kdbench.cli."""
import click

from kdbench.errors import KdbenchError

KIND = click.Choice(["method", "model", "dataset"])


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
    n = scaffold.names(name)
    click.echo(f"created {root}/")
    for path in files:
        click.echo(f"  {path.relative_to(root)}")
    click.echo("next:")
    click.echo(f"  cd {root} && pip install -e '.[test]'")
    click.echo(f"  pytest                      # kdbench's conformance kit on {n['name']}")
    click.echo(f"  kdbench list {kind}s         # {n['name']} ... ({n['dist']} 0.1.0)")


@plugin_group.command("check")
@click.argument("kind", type=KIND)
@click.argument("name")
@click.option("--trials", type=int, default=50, show_default=True, help="Optuna trials sampled from a method's search space.")
@click.option("--data-dir", default=None, help="Where a dataset's files are.")
@click.option("--data-option", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="A dataset option (repeatable), e.g. size=64 for image_folder.")
def check_cmd(kind, name, trials, data_dir, data_opts):
    """Run the conformance kit (kdbench.testing) on an installed method, model or dataset."""
    from kdbench import testing
    from kdbench.cli import data_options

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


COMMANDS: list = [plugin_group]
