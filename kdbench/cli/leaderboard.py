"""`kdbench leaderboard`: tables from the MLflow runs, of all finished student runs or of one suite."""
from __future__ import annotations

import click

from kdbench.cli.options import open_tracker, tracking_option, writable_file
from kdbench.errors import KdbenchError


@click.command("leaderboard")
@click.argument("name", required=False)
@click.option("--dataset", "-d", default=None, help="Only this dataset (without NAME).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "html"]), default="table",
              show_default=True)
@click.option("--output", "-o", default=None, metavar="FILE", help="Write here instead of stdout.")
@click.option("--no-summary", is_flag=True, help="Do not log the figures on the MLflow summary run (NAME only).")
@tracking_option
def leaderboard_cmd(name, dataset, fmt, output, no_summary, tracking_uri):
    """Tables from MLflow: per (dataset, teacher, student), each method's test top-1 mean ± std.

    With NAME (leaderboards/NAME.toml or a path): only that suite's runs, ranked by its metric,
    with published numbers where it has them; the figures are logged on its summary run."""
    from kdbench.workflows import bench, leaderboard, suites
    from kdbench.workflows.leaderboard import aggregate, plots, render, runs_frame

    writable_file(output, "--output")
    tracker = open_tracker(tracking_uri)
    suite = None
    if name:
        suite = suites.load_suite(name)
        runs = bench.suite_runs(tracker, suite)
        leaderboard.tag_suite_runs(tracker, suite, runs)
    else:
        runs = tracker.search(dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    metric = suite.metric if suite else "test_top1"
    tables = aggregate(runs_frame(runs), metric, suite.published if suite else None)
    if not tables:
        if dataset and not name:
            known = ", ".join(sorted(tracker.experiments())) or "none yet"
            raise KdbenchError(f"no finished student runs of dataset {dataset!r} in {tracker.uri} "
                               f"(datasets recorded there: {known})")
        hint = f"`kdbench bench {name}`" if name else "`kdbench run`"
        raise KdbenchError(f"no finished student runs in {tracker.uri}; run {hint} first")
    log_summary = suite is not None and not no_summary
    images = None
    if fmt == "html" or log_summary:
        run_ids = [run_id for table in tables.values() for ids in table.run_ids for run_id in ids]
        images = plots(tables, metric, leaderboard.histories(tracker, run_ids))
    text = render(fmt, tables, metric, suite, images)
    if log_summary:
        documents = {"leaderboard.md": render("markdown", tables, metric, suite),
                     "leaderboard.csv": render("csv", tables, metric, suite),
                     "leaderboard.html": render("html", tables, metric, suite, images)}
        leaderboard.log_summary(tracker, suite, images, documents)
    _emit(text, output)


def _emit(text: str, output: str | None) -> None:
    """``text`` into ``--output`` (saying so on stderr), else on stdout."""
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
