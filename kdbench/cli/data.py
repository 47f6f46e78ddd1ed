"""`kdbench data …`: fetch and verify the files of datasets that read them."""
from __future__ import annotations

import click

from kdbench.errors import KdbenchError


@click.group("data")
def data_group():
    """Dataset files: download and verify."""


@data_group.command("download")
@click.argument("name")
@click.option("--data-dir", default=None, help="Where to put the files [default: the dataset's].")
@click.option("--base-url", default=None, help="A mirror to fetch from instead of the official host.")
def download_cmd(name, data_dir, base_url):
    """Download, checksum and extract the files of dataset NAME."""
    from kdbench.core import plugins

    dataset = plugins.registry().dataset(name)
    if dataset.download is None:
        how = "it is embedded: nothing to download" if dataset.embedded else "its plugin offers no download"
        raise KdbenchError(f"dataset {name!r} has no download ({how})")
    try:
        where = dataset.download(data_dir, base_url=base_url)
    except PermissionError as exc:  # an unwritable --data-dir (or default folder), in one line
        raise KdbenchError(f"cannot write {exc.filename or data_dir}: permission denied; pass a writable --data-dir") from None
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise KdbenchError(f"cannot create {exc.filename or data_dir} ({exc.strerror}); "
                           "pass a --data-dir in a folder that exists") from None
    click.echo(f"{name}: downloaded and verified{f' in {where}' if where else ''}")
