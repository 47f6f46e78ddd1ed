"""Leaderboard tables from tracked runs: one table per (dataset, teacher, student), mean ± std
over seeds. Pure pandas: ``runs_frame`` turns MLflow runs into rows, ``aggregate`` does the maths."""
from __future__ import annotations

import pandas as pd

COLUMNS = [
    "run_id", "dataset", "teacher", "student", "method", "seed", "recipe_hash", "test_top1",
    "test_top1_bestval", "teacher_test_top1", "flops_student", "params_student", "params_extra",
    "epochs_to_95", "train_seconds",
]


def runs_frame(runs) -> pd.DataFrame:
    """Finished student runs (MLflow ``Run`` objects) as a DataFrame with :data:`COLUMNS`."""
    rows = []
    for r in runs:
        tags, m = r.data.tags, r.data.metrics
        if tags.get("role") != "student" or "test_top1" not in m:
            continue
        rows.append({
            "run_id": r.info.run_id,
            **{k: tags.get(k, "") for k in ("dataset", "teacher", "student", "method", "recipe_hash")},
            "seed": int(tags.get("seed", 0)),
            **{k: m.get(k) for k in COLUMNS[7:]},
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def aggregate(df: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """Per (dataset, teacher, student): method, runs, mean/std of test top-1 (last epoch and
    best-on-val), Δ vs the vanilla mean for the same student and recipe, and the costs.

    Vanilla runs use no teacher; they join every table with their student and recipe. Sorted by
    mean test top-1, best first. Accuracies are fractions; std is the sample std (n−1; NaN for n=1).
    """
    tables = {}
    if df.empty:
        return tables
    vanilla = df[df.method == "vanilla"]
    pairs = df[df.teacher != ""][["dataset", "teacher", "student", "recipe_hash"]].drop_duplicates()
    for _, pair in pairs.iterrows():
        same_student = (df.dataset == pair.dataset) & (df.student == pair.student) & (df.recipe_hash == pair.recipe_hash)
        rows = df[same_student & ((df.teacher == pair.teacher) | (df.method == "vanilla"))]
        van = vanilla[(vanilla.dataset == pair.dataset) & (vanilla.student == pair.student) & (vanilla.recipe_hash == pair.recipe_hash)]
        van_mean = van.test_top1.mean() if len(van) else float("nan")
        g = rows.groupby("method")
        table = pd.DataFrame({
            "runs": g.size(),
            "top1_mean": g.test_top1.mean(),
            "top1_std": g.test_top1.std(),
            "bestval_top1_mean": g.test_top1_bestval.mean(),
            "flops": g.flops_student.first(),
            "params": g.params_student.first(),
            "params_extra": g.params_extra.first(),
            "epochs_to_95": g.epochs_to_95.mean(),
            "train_seconds": g.train_seconds.mean(),
        })
        table.insert(3, "delta_vs_vanilla", table.top1_mean - van_mean)
        table = table.sort_values("top1_mean", ascending=False).reset_index()
        key = (pair.dataset, pair.teacher, pair.student)
        tables[key] = table if key not in tables else pd.concat([tables[key], table])
    return tables


def format_table(table: pd.DataFrame) -> str:
    """Human-readable: accuracies in %, mean ± std."""
    out = pd.DataFrame({
        "method": table.method,
        "runs": table.runs,
        "test top-1 % (last)": [_pm(m, s) for m, s in zip(table.top1_mean, table.top1_std)],
        "top-1 % (best val)": [f"{100 * v:.2f}" for v in table.bestval_top1_mean],
        "Δ vs vanilla": ["" if pd.isna(d) else f"{100 * d:+.2f}" for d in table.delta_vs_vanilla],
        "epochs→95%": [f"{v:.1f}" for v in table.epochs_to_95],
        "MFLOPs": [f"{v / 1e6:.2f}" for v in table.flops],
        "params": [f"{int(v):,}" + (f" +{int(e):,}" if e else "") for v, e in zip(table.params, table.params_extra.fillna(0))],
        "train s": [f"{v:.1f}" for v in table.train_seconds],
    })
    return out.to_string(index=False)


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f}" + ("" if pd.isna(std) else f" ± {100 * std:.2f}")
