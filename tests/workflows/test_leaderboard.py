"""Leaderboard maths and formats on a fabricated MLflow store (runs made with MlflowClient)."""
import io
import re
import statistics

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from kdbench.cli import main
from kdbench.workflows.leaderboard import aggregate, runs_frame, welch_p

TEACHER = 0.90
# method -> per-seed test top-1 (last epoch)
ACC = {
    "vanilla": [0.70, 0.72, 0.71],
    "kd": [0.80, 0.81, 0.79],
    "at": [0.79, 0.80, 0.805],  # within noise of kd
    "fitnets": [0.74, 0.745, 0.75],  # clearly below kd
}


def fabricate(uri, acc=ACC, teacher="cnn1d_4x32", student="cnn1d_2x16", extra_tags=None, hashes=None):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    exp_id = exp.experiment_id if exp else client.create_experiment("kdbench/mnist1d")
    for method, values in acc.items():
        for seed, v in enumerate(values):
            run = client.create_run(exp_id, run_name=f"{method}-s{seed}")
            tags = {"role": "student", "dataset": "mnist1d", "method": method, "student": student,
                    "teacher": "" if method == "vanilla" else teacher, "seed": str(seed),
                    "recipe_hash": "r1", "config_hash": (hashes or {}).get((method, seed), f"{method}{seed}"),
                    **(extra_tags or {})}
            metrics = {"test_top1": v, "test_top1_bestval": v - 0.01, "flops_student": 32000,
                       "params_student": 3034, "params_extra": 0, "epochs_to_95": 3 + seed,
                       "train_seconds": 10.0 + seed}
            if method != "vanilla":
                metrics["teacher_test_top1"] = TEACHER
            client.log_batch(run.info.run_id, tags=[RunTag(k, str(x)) for k, x in tags.items()],
                             metrics=[Metric(k, float(x), 0, 0) for k, x in metrics.items()]
                             + [Metric("val_top1", v * e / 3, 0, e) for e in (1, 2, 3)])
            client.set_terminated(run.info.run_id)
    return client


@pytest.fixture
def store(env):
    uri = f"sqlite:///{env}/mlflow.db"
    fabricate(uri)
    return uri


def test_aggregate_against_hand_computed_numbers(store):
    from kdbench.workflows.tracking import Tracker

    runs = Tracker(store).search("mnist1d", "attributes.status = 'FINISHED'")
    (table,) = aggregate(runs_frame(runs)).values()
    t = table.set_index("method")
    assert list(table.method) == ["kd", "at", "fitnets", "vanilla"]
    van = statistics.mean(ACC["vanilla"])
    for m, values in ACC.items():
        assert t.loc[m, "runs"] == 3
        assert t.loc[m, "top1_mean"] == pytest.approx(statistics.mean(values))
        assert t.loc[m, "top1_std"] == pytest.approx(statistics.stdev(values))
        assert t.loc[m, "bestval_mean"] == pytest.approx(statistics.mean(values) - 0.01)
        assert t.loc[m, "delta_vs_vanilla"] == pytest.approx(statistics.mean(values) - van)
    # hand-computed: kd mean 0.80, vanilla 0.71, teacher 0.90 -> (0.80-0.71)/(0.90-0.71) = 0.473684
    assert t.loc["kd", "gap_closed"] == pytest.approx(0.09 / 0.19)
    assert t.loc["kd", "delta_vs_vanilla"] == pytest.approx(0.09)
    assert t.loc["kd", "epochs_to_95"] == pytest.approx(4.0) and t.loc["kd", "train_seconds"] == pytest.approx(11.0)
    # Δ vs vanilla is paired by seed: mean ± std of (method − vanilla) per seed
    diffs = [k - v for k, v in zip(ACC["kd"], ACC["vanilla"])]  # 0.10, 0.09, 0.08
    assert t.loc["kd", "delta_std"] == pytest.approx(statistics.stdev(diffs)) == pytest.approx(0.01)
    assert t.loc["vanilla", "delta_std"] == 0.0
    # tie test: the paired t-test over seeds against the best (kd)
    assert t.loc["kd", "tie"] == "best"
    p_at = stats.ttest_rel(ACC["kd"], ACC["at"]).pvalue
    assert p_at >= 0.05 and t.loc["at", "tie"] == "tied" and t.loc["at", "p_vs_best"] == pytest.approx(p_at)
    assert t.loc["at", "test"] == "paired"
    p_fit = stats.ttest_rel(ACC["kd"], ACC["fitnets"]).pvalue
    assert p_fit < 0.05 and t.loc["fitnets", "tie"] == ""


def test_ranking_by_best_val_and_published_numbers():
    rows = []
    for m, values in ACC.items():
        for s, v in enumerate(values):
            bestval = 0.9 if m == "fitnets" else v  # fitnets wins on best-val
            rows.append({"run_id": f"{m}{s}", "dataset": "d", "teacher": "" if m == "vanilla" else "T",
                         "student": "S", "method": m, "seed": s, "recipe_hash": "r", "config_hash": f"{m}{s}",
                         "start_time": s, "test_top1": v, "test_top1_bestval": bestval, "teacher_test_top1": TEACHER})
    df = pd.DataFrame(rows)
    (table,) = aggregate(df, "test_top1_bestval", {"T->S": {"kd": 79.0}}).values()
    assert table.method.iloc[0] == "fitnets"
    t = table.set_index("method")
    assert t.loc["kd", "published"] == 79.0 and t.loc["kd", "published_delta"] == pytest.approx(80.0 - 79.0)
    assert pd.isna(t.loc["at", "published"])


def test_duplicate_hash_counts_once_and_welch_edge_cases(env):
    uri = f"sqlite:///{env}/mlflow.db"
    fabricate(uri)
    fabricate(uri, {"kd": [0.5]})  # a second FINISHED run of hash kd0 (later): it replaces the first
    from kdbench.workflows.tracking import Tracker

    df = runs_frame(Tracker(uri).search("mnist1d"))
    assert len(df) == 12 and df.set_index("config_hash").loc["kd0", "test_top1"] == 0.5
    assert welch_p([0.5, 0.5], [0.5, 0.5]) == 1.0 and welch_p([0.5, 0.5], [0.6, 0.6]) == 0.0
    assert pd.isna(welch_p([0.5], [0.5, 0.6]))


def _invoke(*args):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_formats_parse(store, tmp_path):
    text = _invoke("leaderboard")
    assert "mnist1d: cnn1d_4x32 → cnn1d_2x16" in text and "kd ★" in text and "at ≈" in text
    assert "80.00 ± 1.00" in text and "+9.00 ± 1.00" in text and "0.47" in text and "ttest_rel" in text

    md = _invoke("leaderboard", "--format", "markdown")
    table_lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in table_lines[0].strip("|").split("|")]
    assert re.fullmatch(r"\|(---\|)+", table_lines[1]) and len(table_lines) == 2 + 4
    assert all(len(l.strip("|").split("|")) == len(header) for l in table_lines)
    assert header[:3] == ["method", "seeds", "test top-1 % (last)"]

    csv = pd.read_csv(io.StringIO(_invoke("leaderboard", "--format", "csv")))
    assert list(csv.method) == ["kd", "at", "fitnets", "vanilla"]
    assert csv.top1_mean.iloc[0] == pytest.approx(0.80) and csv.gap_closed.iloc[0] == pytest.approx(0.09 / 0.19)

    wrong = CliRunner().invoke(main, ["leaderboard", "--dataset", "mnist1d-typo"])
    assert wrong.exit_code == 1 and wrong.output.strip().splitlines() == [
        f"error: no finished student runs of dataset 'mnist1d-typo' in {store} "
        "(datasets recorded there: mnist1d)"]

    out = tmp_path / "board.html"
    _invoke("leaderboard", "--format", "html", "-o", str(out))
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html and "<table" in html
    imgs = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 3  # bars, validation curves, Pareto front
    import base64

    assert all(base64.b64decode(b).startswith(b"\x89PNG") for _, b in imgs)


def test_lockstep_train_time_is_marked_as_a_share(env):
    from kdbench.workflows.leaderboard import to_markdown, to_text
    from kdbench.workflows.tracking import Tracker

    uri = f"sqlite:///{env}/mlflow.db"
    fabricate(uri, acc={"vanilla": ACC["vanilla"]})
    fabricate(uri, acc={"kd": ACC["kd"], "at": ACC["at"]}, extra_tags={"lockstep": "2"})
    tables = aggregate(runs_frame(Tracker(uri).search("mnist1d", "attributes.status = 'FINISHED'")))
    text, md = to_text(tables), to_markdown(tables)
    marked = {line.split()[0] for line in text.splitlines() if line.rstrip().endswith("‡")}
    assert marked == {"kd", "at"}  # vanilla trained alone: its time is its own
    assert "11.0 ‡" in text and "‡ trained in lockstep" in text and "‡ trained in lockstep" in md
    alone = aggregate(runs_frame(Tracker(uri).search("mnist1d", "tags.method = 'vanilla'")))
    assert "‡" not in to_text(alone)  # no lockstep run, no marker and no legend line


def test_every_run_counts_however_many_pages_the_store_returns(store, monkeypatch):
    """MLflow returns one page of runs a call; a leaderboard (and a suite's resumption, and the
    reaper) of more runs than a page must still see them all, not silently the newest page."""
    from kdbench.workflows import claims
    from kdbench.workflows.tracking import Tracker

    client = MlflowClient(store)
    other = client.create_experiment("kdbench/other")  # a second kdbench experiment, seen without --dataset
    for name in ("team-a", "team-b", "team-c"):  # other tools' experiments in a shared store
        client.create_experiment(name)
    run = client.create_run(other, run_name="vanilla-s0")
    client.log_batch(run.info.run_id, tags=[RunTag("role", "student"), RunTag("dataset", "other")],
                     metrics=[Metric("test_top1", 0.5, 0, 0)])
    client.set_terminated(run.info.run_id)

    monkeypatch.setattr(claims, "SEARCH_PAGE", 5)  # 12 runs in mnist1d: three pages
    tracker = Tracker(store)
    runs = tracker.search("mnist1d", "attributes.status = 'FINISHED'")
    assert len(runs) == len({r.info.run_id for r in runs}) == 12
    assert len(tracker.search(None, "attributes.status = 'FINISHED'")) == 13  # both kdbench experiments
    newest = tracker.search("mnist1d", max_results=7)
    assert [r.info.run_id for r in newest] == [r.info.run_id for r in runs[:7]]
    monkeypatch.setattr(claims, "SEARCH_PAGE", 2)  # experiments in pages of 2 too
    assert len(tracker.search(None)) == 13

    (table,) = aggregate(runs_frame(runs)).values()
    assert dict(zip(table.method, table.runs)) == {"kd": 3, "at": 3, "fitnets": 3, "vanilla": 3}


def test_a_run_pushed_onto_the_next_page_comes_once(monkeypatch):
    from kdbench.workflows import claims
    from kdbench.workflows.claims import all_pages

    monkeypatch.setattr(claims, "SEARCH_PAGE", 2)

    class Page(list):
        def __init__(self, items, token):
            super().__init__(items)
            self.token = token

    pages = {None: Page(["d", "c"], "1"), "1": Page(["c", "b"], "2"), "2": Page(["a"], None)}  # "e" started: c moved

    def fetch(max_results, page_token):
        assert max_results <= 2
        return pages[page_token]

    assert all_pages(fetch, key=str) == ["d", "c", "b", "a"]
    assert all_pages(fetch, key=str, limit=3) == ["d", "c", "b"]


def test_histories_are_each_runs_own_curve_read_concurrently(store, monkeypatch):
    """The curves come from HISTORY_READERS threads at once (a leaderboard on a tracking server waits
    on one request per run): each run still gets its own points, in order, once."""
    import threading

    from kdbench.workflows import leaderboard
    from kdbench.workflows.tracking import Tracker

    tracker = Tracker(store)
    runs = tracker.search("mnist1d", "attributes.status = 'FINISHED'")
    ids = [run.info.run_id for run in runs]
    client = MlflowClient(store)
    empty = client.create_run(runs[0].info.experiment_id).info.run_id  # no val_top1 logged
    threads, reads = set(), []
    original = tracker.client.get_metric_history

    def spy(run_id, key):
        threads.add(threading.get_ident())
        reads.append(run_id)
        return original(run_id, key)

    monkeypatch.setattr(tracker.client, "get_metric_history", spy)
    got = leaderboard.histories(tracker, ids + [empty] + ids[:3])
    assert list(got) == ids + [empty] and sorted(reads) == sorted(ids + [empty])
    by_id = {run.info.run_id: run.data.metrics["test_top1"] for run in runs}
    for run_id in ids:
        assert got[run_id] == [(e, pytest.approx(by_id[run_id] * e / 3)) for e in (1, 2, 3)]
    assert got[empty] == [] and len(threads) > 1 and threading.get_ident() not in threads


def test_ctrl_c_while_histories_are_read_stops_the_queued_reads():
    """A Ctrl-C while the curves are read ends the reading within the reads under way: the queued
    ones (thousands on a big store) are cancelled, not waited for."""
    import os
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from kdbench.workflows import leaderboard

    started, at_ctrl_c = [], []

    def get_metric_history(run_id, key):
        started.append(run_id)
        if len(started) == 1:  # Ctrl-C once every read is queued and the main thread waits for them
            time.sleep(0.3)
            at_ctrl_c.append(len(started))
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)
        return []

    assert threading.current_thread() is threading.main_thread()
    tracker = SimpleNamespace(client=SimpleNamespace(get_metric_history=get_metric_history))
    with pytest.raises(KeyboardInterrupt):
        leaderboard.histories(tracker, [f"run{i}" for i in range(2000)])
    assert len(started) - at_ctrl_c[0] < 200, (at_ctrl_c, len(started))  # not the 2,000 − (reads before it)


def test_each_configuration_of_a_method_is_a_row_of_its_own(env):
    """Ad-hoc runs of one method with other hyperparameters, precision or teacher are not seeds of
    one row: the latest configuration keeps the method's name, each earlier one is named by what
    differs, and each row's mean and Δ vs vanilla are over its own seeds."""
    from mlflow.entities import Param

    from kdbench.workflows.tracking import Tracker

    uri = f"sqlite:///{env}/mlflow.db"
    client = fabricate(uri, {"vanilla": ACC["vanilla"]})
    exp_id = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    configs = [  # (hyperparameters, precision, per-seed top-1), oldest first
        ({"hp.T": "2.0", "hp.alpha": "0.9"}, "fp32", [0.60]),
        ({"hp.T": "4.0", "hp.alpha": "0.9"}, "bf16", [0.65, 0.66]),
        ({"hp.T": "4.0", "hp.alpha": "0.9"}, "fp32", [0.80, 0.81, 0.79]),
    ]
    for n, (hp, precision, values) in enumerate(configs):
        for seed, v in enumerate(values):
            run = client.create_run(exp_id, run_name=f"kd-s{seed}", start_time=1_000 * (n + 1) + seed)
            tags = {"role": "student", "dataset": "mnist1d", "method": "kd", "student": "cnn1d_2x16",
                    "teacher": "cnn1d_4x32", "seed": str(seed), "recipe_hash": "r1", "config_hash": f"kd{n}{seed}",
                    "precision": precision, "teacher_key": "5969a0ddff8ea296"}
            client.log_batch(run.info.run_id, tags=[RunTag(k, x) for k, x in tags.items()],
                             params=[Param(k, x) for k, x in hp.items()],
                             metrics=[Metric("test_top1", v, 0, 0), Metric("teacher_test_top1", TEACHER, 0, 0)])
            client.set_terminated(run.info.run_id)
    (table,) = aggregate(runs_frame(Tracker(uri).search("mnist1d"))).values()
    t = table.set_index("method")
    assert set(t.index) == {"kd", "kd [T=2.0, precision=fp32]", "kd [T=4.0, precision=bf16]", "vanilla"}
    assert list(t.runs) == [3 if m == "kd" else len(ACC["vanilla"]) if m == "vanilla" else 1 + ("bf16" in m)
                            for m in t.index]
    assert t.loc["kd", "top1_mean"] == pytest.approx(0.80)
    assert t.loc["kd", "delta_vs_vanilla"] == pytest.approx(0.80 - statistics.mean(ACC["vanilla"]))
    bf16 = "kd [T=4.0, precision=bf16]"
    assert t.loc[bf16, "top1_mean"] == pytest.approx(0.655)
    assert t.loc[bf16, "delta_vs_vanilla"] == pytest.approx(statistics.mean([0.65 - 0.70, 0.66 - 0.72]))
