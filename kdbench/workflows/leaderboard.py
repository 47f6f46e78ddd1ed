"""Leaderboard tables from tracked runs: one table per (dataset, teacher, student), mean ± std
over seeds. ``runs_frame`` turns MLflow runs into rows, ``aggregate`` does the maths (pandas,
scipy), ``render`` writes text / Markdown / CSV / HTML, ``plots`` draws the figures (matplotlib),
``histories`` reads the validation curves and ``log_summary`` logs it all on a suite's summary run.

Definitions (accuracies are fractions; shown in % in the formatted outputs):

* ``top1_mean``/``top1_std``: test top-1 at the last epoch, mean and sample std (n−1) over seeds;
  ``bestval_mean``/``bestval_std``: test top-1 of the best-validation epoch.
* One table per (dataset, teacher, student, recipe): runs of another recipe (e.g. a 5-epoch
  tuning retrain beside 20-epoch suite cells) are never ranked together; the heading names the recipe.
* Differences are paired by seed: runs of one seed share the teacher, the data and (with common
  random numbers) the batch order, so comparing a method with vanilla or with the best uses the
  per-seed differences over the seeds both have.
* ``delta_vs_vanilla`` / ``delta_std``: mean and sample std of (method − vanilla) over the common
  seeds, computed here from the vanilla runs of the same table (never a number frozen into a run);
  without a common seed, the difference of the means (no std).
* ``gap_closed``: ``delta_vs_vanilla`` / (teacher test top-1 − vanilla mean); empty when the
  teacher is no better than vanilla.
* ``tie``: "best" for the top method by the ranking metric; "tied" when the paired t-test
  (``scipy.stats.ttest_rel``) of a method's per-seed values against the best's over ≥ 2 common
  seeds gives p ≥ 0.05 — Welch's t-test (``ttest_ind(equal_var=False)``) where fewer seeds pair;
  identical differences: tied only when they are zero; empty when either has < 2 seeds.
  ``test`` says which test gave ``p_vs_best``.
"""
from __future__ import annotations

import base64
import io
import json
import math
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS = [
    "run_id", "dataset", "teacher", "student", "method", "seed", "recipe_hash", "recipe", "config_hash",
    "start_time", "test_top1", "test_top1_bestval", "teacher_test_top1", "flops_student",
    "params_student", "params_extra", "epochs_to_95", "train_seconds",
]
_METRIC_COLUMNS = COLUMNS[10:]
#: recipe params (``recipe.*``) shown in a table's heading, in this order
RECIPE_LABEL = ("epochs", "optimizer", "lr", "batch_size", "schedule")
TIE_ALPHA = 0.05


def runs_frame(runs) -> pd.DataFrame:
    """Finished student runs (MLflow ``Run`` objects) as a DataFrame with :data:`COLUMNS`.

    Several finished runs with one config hash (the same experiment) count once: the latest."""
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        if tags.get("role") != "student" or "test_top1" not in metrics:
            continue
        rows.append({
            "run_id": r.info.run_id,
            **{k: tags.get(k, "") for k in ("dataset", "teacher", "student", "method", "recipe_hash", "config_hash")},
            "seed": int(tags.get("seed", 0)),
            "recipe": recipe_label(r.data.params),
            "start_time": r.info.start_time or 0,
            **{k: metrics.get(k) for k in _METRIC_COLUMNS},
            "lockstep": bool(tags.get("lockstep")),  # trained in a lockstep group: train_seconds is a share
            "variant": variant_of(r.data.params, tags),
        })
    df = pd.DataFrame(rows, columns=[*COLUMNS, "lockstep", "variant"])
    if df.empty:
        return df
    df = df.sort_values("start_time")
    keyed = df[df.config_hash != ""].drop_duplicates("config_hash", keep="last")
    return pd.concat([keyed, df[df.config_hash == ""]]).sort_values("start_time").reset_index(drop=True)


def variant_of(params: dict, tags: dict) -> str:
    """What makes a run of a method another configuration than its other seeds, beyond the
    recipe (its own table): hyperparameters, data options, precision and teacher (as JSON)."""
    key = {k: v for k, v in params.items() if k.startswith(("hp.", "data."))}
    key.update({k: tags[k] for k in ("precision", "teacher_key") if tags.get(k)})
    return json.dumps(key, sort_keys=True) if key else ""


def label_variants(rows: pd.DataFrame) -> pd.DataFrame:
    """One leaderboard row per configuration: where a method's runs in ``rows`` have several
    (:func:`variant_of`), its latest configuration keeps the method's name and each earlier one is
    named by what differs, e.g. ``kd [T=2.0, alpha=0.5]``; so a row's mean, spread and Δ vs
    vanilla are over the seeds of one configuration, never over a mix of them."""
    if "variant" not in rows or rows.variant.fillna("").nunique() < 2:
        return rows
    rows = rows.copy()
    rows["variant"] = rows.variant.fillna("")
    for method, group in rows.sort_values("start_time").groupby("method", sort=False):
        variants = list(dict.fromkeys(group.variant))
        if len(variants) < 2:
            continue
        parsed = {v: json.loads(v) if v else {} for v in variants}
        keys = sorted({k for d in parsed.values() for k in d}, key=str)
        keys = [k for k in keys if len({str(d.get(k)) for d in parsed.values()}) > 1]
        for variant in variants[:-1]:
            shown = ", ".join(f"{_short(k)}={_short_value(k, parsed[variant].get(k, '-'))}" for k in keys)
            rows.loc[(rows.method == method) & (rows.variant == variant), "method"] = f"{method} [{shown}]"
    return rows


def _short(key: str) -> str:
    return key.removeprefix("hp.").removeprefix("data.")


def _short_value(key: str, value) -> str:
    return str(value)[:8] if key == "teacher_key" else str(value)


def recipe_label(params: dict) -> str:
    """A short description of a run's recipe from its ``recipe.*`` params, e.g.
    ``20 epochs, adam, lr 0.01, batch 64, cosine`` ('' when the run recorded none)."""
    values = {k: params.get(f"recipe.{k}") for k in RECIPE_LABEL}
    parts = []
    if values["epochs"] is not None:
        parts.append(f"{values['epochs']} epochs")
    if values["optimizer"] is not None:
        parts.append(values["optimizer"])
    if values["lr"] is not None:
        parts.append(f"lr {values['lr']}")
    if values["batch_size"] is not None:
        parts.append(f"batch {values['batch_size']}")
    if values["schedule"] is not None:
        parts.append(values["schedule"])
    return ", ".join(parts)


def welch_p(a, b) -> float:
    """Two-sided p of Welch's t-test; NaN when a sample has < 2 values; for two constant samples
    1.0 if their means are equal, else 0.0."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    if math.isnan(p):
        return 1.0 if math.isclose(sum(a) / len(a), sum(b) / len(b)) else 0.0
    return float(p)


def _by_seed(rows: pd.DataFrame, method: str, metric: str) -> dict[int, float]:
    """seed → value of ``metric`` for one method's runs (the latest run where a seed repeats)."""
    picked = rows[(rows.method == method) & rows[metric].notna()].sort_values("start_time")
    return dict(zip(picked.seed.astype(int), picked[metric].astype(float)))


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a[seed] − b[seed] over the seeds both have, in seed order."""
    return [a[seed] - b[seed] for seed in sorted(set(a) & set(b))]


def paired_p(a: dict[int, float], b: dict[int, float]) -> tuple[float, str]:
    """(two-sided p, test name) comparing two methods' per-seed values: the paired t-test over
    ≥ 2 common seeds; identical differences give 1.0 when they are all zero, else 0.0; with
    fewer common seeds Welch's t-test of all values (:func:`welch_p`)."""
    from scipy import stats

    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        diffs = paired_differences(a, b)
        if max(diffs) - min(diffs) < 1e-12:
            return (1.0 if abs(diffs[0]) < 1e-12 else 0.0), "paired"
        return float(stats.ttest_rel([a[seed] for seed in common], [b[seed] for seed in common]).pvalue), "paired"
    return welch_p(list(a.values()), list(b.values())), "Welch"


def aggregate(df: pd.DataFrame, metric: str = "test_top1",
              published: dict[str, dict[str, float]] | None = None) -> dict[tuple[str, str, str, str], pd.DataFrame]:
    """Per (dataset, teacher, student, recipe hash): one row per method, sorted by ``metric``
    (best first). Each table's ``attrs["recipe"]`` describes its recipe.

    Methods without a teacher (vanilla, rocket) join every table with their student and recipe.
    ``published`` maps "teacher->student" to {method: top-1 %} (reference numbers)."""
    tables = {}
    if df.empty:
        return tables
    published = published or {}
    df = df.reindex(columns=list(dict.fromkeys([*COLUMNS, *df.columns])))
    pairs = df[df.teacher != ""][["dataset", "teacher", "student", "recipe_hash"]].drop_duplicates()
    for _, pair in pairs.iterrows():
        same_student = (df.dataset == pair.dataset) & (df.student == pair.student) & (df.recipe_hash == pair.recipe_hash)
        rows = label_variants(df[same_student & ((df.teacher == pair.teacher) | (df.teacher == ""))])
        table = _table(rows, metric, published.get(f"{pair.teacher}->{pair.student}", {}))
        labels = [label for label in rows.recipe.dropna().unique() if label]
        table.attrs["recipe"] = labels[0] if labels else ""
        tables[(pair.dataset, pair.teacher, pair.student, pair.recipe_hash)] = table
    return tables


def _table(rows: pd.DataFrame, metric: str, published: dict[str, float]) -> pd.DataFrame:
    bestval = "test_top1_bestval"
    g = rows.groupby("method")
    table = pd.DataFrame({
        "runs": g.size(),
        "top1_mean": g.test_top1.mean(),
        "top1_std": g.test_top1.std(),
        "bestval_mean": g[bestval].mean(),
        "bestval_std": g[bestval].std(),
        "teacher_top1": g.teacher_test_top1.mean(),
        "flops": g.flops_student.first(),
        "params": g.params_student.first(),
        "params_extra": g.params_extra.first(),
        "epochs_to_95": g.epochs_to_95.mean(),
        "train_seconds": g.train_seconds.mean(),
        "time_shared": g.lockstep.agg(lambda v: bool(v.fillna(False).any())) if "lockstep" in rows else False,
        "run_ids": g.run_id.agg(list),
    })
    score = table.top1_mean if metric == "test_top1" else table.bestval_mean
    van = score.get("vanilla", float("nan"))
    teacher = table.teacher_top1.dropna().mean() if table.teacher_top1.notna().any() else float("nan")
    table["score"] = score
    table["teacher_top1"] = teacher
    table = table.sort_values("score", ascending=False, kind="stable").reset_index()
    values = {method: _by_seed(rows, method, metric) for method in table.method}
    deltas, delta_stds = [], []
    for method, mean in zip(table.method, table.score):
        diffs = paired_differences(values[method], values["vanilla"]) if "vanilla" in values else []
        deltas.append(sum(diffs) / len(diffs) if diffs else mean - van)
        delta_stds.append(pd.Series(diffs).std() if len(diffs) >= 2 else float("nan"))
    table["delta_vs_vanilla"] = deltas
    table["delta_std"] = delta_stds
    table["gap_closed"] = table.delta_vs_vanilla / (teacher - van) if teacher - van > 0 else float("nan")
    best = table.method.iloc[0]
    ps, tests, ties = [], [], []
    for method in table.method:
        if method == best:
            ps.append(float("nan"))
            tests.append("")
            ties.append("best")
            continue
        p, test = paired_p(values[best], values[method])
        ps.append(p)
        tests.append(test if not math.isnan(p) else "")
        ties.append("" if math.isnan(p) else ("tied" if p >= TIE_ALPHA else ""))
    table["p_vs_best"] = ps
    table["test"] = tests
    table["tie"] = ties
    table["published"] = [published.get(method, float("nan")) for method in table.method]  # in %
    table["published_delta"] = 100 * table.score - table.published
    return table


# --------------------------------------------------------------------------- formatting


def _pct(v, signed=False) -> str:
    if v is None or pd.isna(v):
        return ""
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _pm(mean: float, std: float, runs: int) -> str:
    """``mean ± std`` in %; a single seed has no spread to show (never "± 0.00")."""
    if pd.isna(mean):
        return ""
    return f"{100 * mean:.2f}" + ("" if pd.isna(std) or runs < 2 else f" ± {100 * std:.2f}")


def display_frame(table: pd.DataFrame, metric: str = "test_top1", notes: dict[str, str] | None = None) -> pd.DataFrame:
    """The human-readable columns (strings; accuracies in %)."""
    notes = notes or {}
    out = pd.DataFrame({
        "method": [method + (" ≈" if tie == "tied" else " ★" if tie == "best" else "") + notes.get(method, "")
                   for method, tie in zip(table.method, table.tie)],
        "seeds": table.runs,
        "test top-1 % (last)": [_pm(mean, std, n) for mean, std, n in zip(table.top1_mean, table.top1_std, table.runs)],
        "test top-1 % (best val)": [_pm(mean, std, n)
                                    for mean, std, n in zip(table.bestval_mean, table.bestval_std, table.runs)],
        "Δ vs vanilla": [_pct(d, signed=True) + ("" if pd.isna(sd) else f" ± {100 * sd:.2f}")
                         for d, sd in zip(table.delta_vs_vanilla, table.delta_std)],
        "gap closed": ["" if pd.isna(v) else f"{v:.2f}" for v in table.gap_closed],
        "p vs best": ["" if pd.isna(v) else f"{v:.3f}" for v in table.p_vs_best],
        "epochs→95%": ["" if pd.isna(v) else f"{v:.1f}" for v in table.epochs_to_95],
        "params": ["" if pd.isna(v) else f"{int(v):,}" + (f" +{int(e):,}" if e else "")
                   for v, e in zip(table.params, table.params_extra.fillna(0))],
        "MFLOPs": ["" if pd.isna(v) else f"{v / 1e6:.2f}" for v in table.flops],
        "train s": ["" if pd.isna(v) else f"{v:.1f}" + (" ‡" if shared else "")
                    for v, shared in zip(table.train_seconds, _time_shared(table))],
    })
    if table.published.notna().any():
        out["paper %"] = ["" if pd.isna(v) else f"{v:.2f}" for v in table.published]
        out["Δ vs paper"] = ["" if pd.isna(v) else f"{v:+.2f}" for v in table.published_delta]
    return out


def format_table(table: pd.DataFrame, metric: str = "test_top1") -> str:
    """Human-readable: accuracies in %, mean ± std."""
    return display_frame(table, metric).to_string(index=False)


def _time_shared(table: pd.DataFrame) -> list[bool]:
    return list(table.time_shared) if "time_shared" in table else [False] * len(table)


def footer(metric: str, suite=None, tables=None) -> list[str]:
    lines = [
        f"Ranked by {'test top-1 at the last epoch' if metric == 'test_top1' else 'test top-1 at the best-validation epoch'}"
        " (mean over seeds; ± is the sample std).",
        f"★ best; ≈ tied with the best: the paired t-test over seeds (scipy.stats.ttest_rel) of the per-seed "
        f"values against the best's gives p ≥ {TIE_ALPHA} (Welch's t-test where fewer than 2 seeds pair).",
        "Δ vs vanilla = mean ± std of the per-seed differences (method − vanilla of the same seed), from this "
        "table's vanilla runs; gap closed = Δ / (teacher − vanilla); epochs→95% = first epoch with validation "
        "top-1 ≥ 95 % of its final value; FLOPs per sample (student).",
    ]
    if tables and any(any(_time_shared(table)) for table in tables.values()):
        lines.append("‡ trained in lockstep (kdbench bench --lockstep): train s is the group's training time "
                     "shared among its members, not the method's own cost (run without --lockstep to compare costs).")
    if suite is not None:
        untuned = [f"{spec.name} ({spec.tune_trials} trials)" for spec in suite.methods if spec.tune_trials]
        if untuned:
            lines.append("† tuned on the validation split with kdbench tune before their cells ran, "
                         + ", ".join(untuned) + "; runs tagged tuned=false ran with the listed params.")
        if suite.published:
            lines.append("paper % = published number " + (f"({suite.published_note})" if suite.published_note else "")
                         + "; Δ vs paper = ours − paper, in points.")
    return lines


def _notes(suite) -> dict[str, str]:
    return {spec.name: " †" for spec in suite.methods if spec.tune_trials} if suite is not None else {}


def _heading(key, table: pd.DataFrame | None = None) -> str:
    ds, teacher, student, recipe_hash = key
    label = table.attrs.get("recipe", "") if table is not None else ""
    recipe = f" · recipe {label} [{recipe_hash}]" if label else (f" · recipe [{recipe_hash}]" if recipe_hash else "")
    return f"{ds}: {teacher} → {student}{recipe}"


def to_text(tables, metric="test_top1", suite=None) -> str:
    parts = []
    for key, table in sorted(tables.items()):
        parts += ["", _heading(key, table), display_frame(table, metric, _notes(suite)).to_string(index=False)]
    return "\n".join(parts + [""] + footer(metric, suite, tables)) + "\n"


def _md_table(frame: pd.DataFrame) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(esc(v) for v in row) + " |")
    return "\n".join(lines)


def to_markdown(tables, metric="test_top1", suite=None, title=None) -> str:
    parts = [f"# Leaderboard: {title or (suite.name if suite else 'all runs')}", ""]
    if suite is not None and suite.description:
        parts += [suite.description, ""]
    for key, table in sorted(tables.items()):
        parts += [f"## {_heading(key, table)}", "", _md_table(display_frame(table, metric, _notes(suite))), ""]
    parts += [f"- {line}" for line in footer(metric, suite, tables)]
    return "\n".join(parts) + "\n"


def flat_frame(tables) -> pd.DataFrame:
    """All tables in one numeric frame (CSV): one row per (dataset, teacher, student, method)."""
    frames = []
    for (ds, teacher, student, recipe_hash), table in sorted(tables.items()):
        flat = table.drop(columns=["run_ids"]).copy()
        flat.insert(0, "recipe", table.attrs.get("recipe", ""))
        flat.insert(0, "recipe_hash", recipe_hash)
        flat.insert(0, "student", student)
        flat.insert(0, "teacher", teacher)
        flat.insert(0, "dataset", ds)
        flat.insert(3, "rank", range(1, len(flat) + 1))
        frames.append(flat)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def to_csv(tables) -> str:
    return flat_frame(tables).to_csv(index=False)


def to_html(tables, metric="test_top1", suite=None, images: dict[str, bytes] | None = None, title=None) -> str:
    import html

    name = title or (suite.name if suite else "all runs")
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>kdbench leaderboard: {html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#eee}img{max-width:100%;margin:1em 0}</style>",
        "</head><body>", f"<h1>Leaderboard: {html.escape(name)}</h1>",
    ]
    if suite is not None and suite.description:
        parts.append(f"<p>{html.escape(suite.description)}</p>")
    images = images or {}
    for key, table in sorted(tables.items()):
        parts.append(f"<h2>{html.escape(_heading(key, table))}</h2>")
        parts.append(display_frame(table, metric, _notes(suite)).to_html(index=False, escape=True))
        for kind in ("bars", "curves"):
            png = images.get(f"{kind}_{_slug(key)}.png")
            if png:
                parts.append(_img(png, f"{kind} {_heading(key, table)}"))
    if "pareto.png" in images:
        parts += ["<h2>Accuracy vs FLOPs</h2>", _img(images["pareto.png"], "accuracy vs FLOPs Pareto front")]
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in footer(metric, suite, tables)) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _slug(key) -> str:
    """File-name part of a table's figures: ``<dataset>_<teacher>_<student>_<recipe hash>``."""
    return "_".join(part for part in key if part)


def bars_plot(key, table: pd.DataFrame, metric: str = "test_top1") -> bytes:
    """Each method's ranking metric, mean ± std (orange the best, green the tied), with the
    vanilla student's and the teacher's accuracy as reference lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(table)), 4))
    std = (table.top1_std if metric == "test_top1" else table.bestval_std).fillna(0)
    colors = ["tab:orange" if tie == "best" else "tab:green" if tie == "tied" else "tab:blue" for tie in table.tie]
    ax.bar(table.method, 100 * table.score, yerr=100 * std, capsize=3, color=colors)
    highs, lows = [100 * (table.score + std).max()], [100 * (table.score - std).min()]
    references = {"vanilla": table.score[table.method == "vanilla"].mean(), "teacher": table.teacher_top1.mean()}
    for (name, value), style in zip(references.items(), ("--", ":")):
        if not pd.isna(value):
            ax.axhline(100 * value, color="black", ls=style, lw=1, label=f"{name} {100 * value:.2f} %")
            highs.append(100 * value)
            lows.append(100 * value)
    ax.set_ylim(max(0, min(lows) - 2), min(100, max(highs) + 1))
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"{_heading(key, table)}\n(orange best, green tied with the best)", fontsize=9)
    ax.tick_params(axis="x", rotation=60)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _line_styles(count: int) -> list[tuple[str, str]]:
    """(colour, line style) pairs, all distinct for up to 60 lines (20 colours × 3 styles)."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    return [(colours[i % 20], ("-", "--", ":")[i // 20 % 3]) for i in range(count)]


def curves_plot(key, table: pd.DataFrame, histories: dict[str, list[tuple[int, float]]]) -> bytes:
    """Each method's validation top-1 per epoch, mean over its runs (``histories``: run id → curve).
    Every line has its own colour/style; the best method is drawn thick, vanilla in black, and
    the legend (outside the axes) lists methods in table order with their final value."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for (method, run_ids, tie), (colour, style) in zip(zip(table.method, table.run_ids, table.tie),
                                                       _line_styles(len(table))):
        series = [pd.Series(dict(histories[r])) for r in run_ids if histories.get(r)]
        if not series:
            continue
        mean = pd.concat(series, axis=1).mean(axis=1).sort_index()
        if method == "vanilla":
            colour, style = "black", "--"
        ax.plot(mean.index, 100 * mean.values, color=colour, ls=style, lw=2.4 if tie == "best" else 1.1,
                label=f"{method} ({100 * mean.values[-1]:.1f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 % (mean over seeds)")
    ax.set_title(f"validation curves: {_heading(key, table)}", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7, ncol=1 + len(ax.lines) // 20, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  title="method (final)", title_fontsize=7)
    return _png(fig)


def pareto_points(tables) -> list[tuple[float, float, str, float]]:
    """(student FLOPs, score %, "method (student)", mean training seconds) of every row with
    FLOPs, over all tables."""
    points = []
    for key, table in sorted(tables.items()):
        for row in table.itertuples():
            if not pd.isna(row.flops):
                points.append((row.flops, 100 * row.score, f"{row.method} ({key[2]})", row.train_seconds))
    return points


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The points no other point beats on both axes (lower or equal x, higher accuracy)."""
    front, best = [], -1.0
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def _front_plot(ax, points: list[tuple[float, float, str]], label_all: bool) -> None:
    """Scatter of (x, accuracy, label) on a log x axis with its Pareto front; labels on the front
    (or on every point with ``label_all``)."""
    from matplotlib import ticker

    xs, ys, _labels = zip(*points)
    ax.scatter(xs, ys, s=14, color="tab:blue")
    front = pareto_front(points)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", label="Pareto front")
    for x, y, label in points if label_all else front:
        ax.annotate(label, (x, y), fontsize=6 if label_all else 7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.legend(fontsize=8)


def pareto_plot(points: list[tuple[float, float, str, float]]) -> bytes:
    """Accuracy vs student FLOPs (log scale) with the Pareto front labelled. With a single student
    architecture every method has the same FLOPs, so the trade-off that remains is the method's
    cost: the plot is then accuracy vs training seconds (its Pareto front), every point labelled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_ylabel("test top-1 % (mean over seeds)")
    timed = [(sec, acc, label.rsplit(" (", 1)[0]) for _flops, acc, label, sec in points if not pd.isna(sec) and sec > 0]
    if points and len({p[0] for p in points}) == 1 and timed:
        _front_plot(ax, timed, label_all=True)
        ax.set_xlabel(f"training seconds (mean over seeds) — one student architecture, {points[0][0]:,.0f} FLOPs")
        ax.set_title("accuracy vs training time (equal FLOPs)")
    elif points:
        _front_plot(ax, [p[:3] for p in points], label_all=False)
        ax.set_xlabel("student FLOPs per sample")
        ax.set_title("accuracy vs FLOPs")
    else:
        ax.text(0.5, 0.5, "no runs with FLOPs recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("student FLOPs per sample")
        ax.set_title("accuracy vs FLOPs")
    return _png(fig)


def plots(tables, metric="test_top1", histories: dict[str, list[tuple[int, float]]] | None = None) -> dict[str, bytes]:
    """PNG figures: ``pareto.png`` (accuracy vs student FLOPs, Pareto front), and per table
    ``bars_<ds>_<teacher>_<student>_<recipe>.png`` (mean ± std, vanilla and teacher lines) and
    ``curves_…png`` (mean val top-1 per epoch per method, from ``histories``: run id →
    [(epoch, val_top1)])."""
    import matplotlib

    matplotlib.use("Agg")
    out = {}
    for key, table in sorted(tables.items()):
        suffix = _slug(key) + ".png"
        out["bars_" + suffix] = bars_plot(key, table, metric)
        out["curves_" + suffix] = curves_plot(key, table, histories or {})
    out["pareto.png"] = pareto_plot(pareto_points(tables))
    return out


def render(fmt: str, tables, metric="test_top1", suite=None, images=None, title=None) -> str:
    if fmt == "table":
        return to_text(tables, metric, suite)
    if fmt == "markdown":
        return to_markdown(tables, metric, suite, title)
    if fmt == "csv":
        return to_csv(tables)
    if fmt == "html":
        return to_html(tables, metric, suite, images, title)
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------- tracked runs


#: histories read at once: MLflow reads one run's history per request, so a suite's leaderboard
#: on a tracking server (cifar100-repdistiller: about 1,000 runs, one per cell and seed) waits on a
#: thousand round trips, which overlap in threads (a local sqlite store gains nothing, loses nothing)
HISTORY_READERS = 8


def histories(tracker, run_ids, key: str = "val_top1") -> dict[str, list[tuple[int, float]]]:
    """Run id → [(epoch, value)] of a metric's history (the curves of :func:`curves_plot`), each
    run's read once, ``HISTORY_READERS`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def read(run_id: str) -> list[tuple[int, float]]:
        return [(point.step, point.value) for point in tracker.client.get_metric_history(run_id, key)]

    unique = list(dict.fromkeys(run_ids))
    with ThreadPoolExecutor(max_workers=HISTORY_READERS, thread_name_prefix="kdbench-history") as pool:
        return dict(zip(unique, pool.map(read, unique)))


def tag_suite_runs(tracker, suite, runs) -> int:
    """Tag the suite's runs that lack a ``leaderboard`` tag (e.g. made by hand with ``kdbench run``
    but counted as cells because their config hash is a cell's) with ``leaderboard=NAME``, so the
    MLflow UI filter ``tags.leaderboard = 'NAME'`` finds exactly the runs the table shows. A run
    already tagged for another suite keeps its tag. Returns how many runs were tagged."""
    tagged = 0
    for run in runs:
        if not run.data.tags.get("leaderboard"):
            tracker.client.set_tag(run.info.run_id, "leaderboard", suite.name)
            tagged += 1
    return tagged


def log_summary(tracker, suite, images: dict[str, bytes], documents: dict[str, str]) -> str:
    """Log the figures and rendered documents on the suite's summary run (role=summary,
    leaderboard=NAME; one per leaderboard, reused and overwritten on every render)."""
    found = tracker.search(suite.dataset, f"tags.role = 'summary' AND tags.leaderboard = '{suite.name}'", 1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = tracker.start(suite.dataset, f"leaderboard-{suite.name}",
                               {"role": "summary", "leaderboard": suite.name, "dataset": suite.dataset}, {})
        tracker.finish(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in images.items():
            (Path(tmp) / name).write_bytes(data)
        for name, text in documents.items():
            (Path(tmp) / name).write_text(text)
        tracker.client.log_artifacts(run_id, tmp, artifact_path="leaderboard")
    return run_id

