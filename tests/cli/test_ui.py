"""`kdbench ui` for real: start it, load the MLflow UI in headless Chromium, check the experiment
and a leaderboard run appear, keep a screenshot. Skips only when no browser binary is installed
(.ci/services.d/chromium.sh installs Debian's chromium)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
REPO = Path(__file__).resolve().parents[2]


def _chromium(*args, timeout=120):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(browser is None, reason="no headless browser (chromium) installed; "
                    "run .ci/services.d/chromium.sh (apt-get install chromium) to enable this test")
def test_ui_shows_experiment_and_leaderboard_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("kdbench/mnist1d")
    run = client.create_run(exp_id, run_name="kd-cnn1d_2x16-s0")
    client.log_batch(run.info.run_id, tags=[RunTag("leaderboard", "embedded"), RunTag("role", "student"),
                                            RunTag("method", "kd")])
    client.log_metric(run.info.run_id, "test_top1", 0.8)
    client.set_terminated(run.info.run_id)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from kdbench.cli import main; main()", "ui", "--tracking-uri", uri],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        url, lines, deadline = None, [], time.time() + 180
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"MLflow UI: (http://[\d.]+:\d+)", line)
            url = m.group(1) if m else None
        assert url, "kdbench ui printed no URL:\n" + "".join(lines[-30:])

        page = f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning"  # the runs table
        shot = tmp_path / "mlflow-ui.png"
        # the UI is a JS app: let it run (virtual time), then dump the DOM and take a screenshot
        dom = _chromium("--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-2000:]
        _chromium("--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw",
                  "--window-size=1400,900", f"--screenshot={shot}", page)
        print(f"\nMLflow UI screenshot: {shot}")
        (tmp_path / "mlflow-ui.html").write_text(dom.stdout)
        assert shot.is_file() and shot.stat().st_size > 10_000
        assert "kdbench/mnist1d" in dom.stdout, "experiment name not in the rendered page"
        assert "kd-cnn1d_2x16-s0" in dom.stdout, "the run is not in the rendered page"

        # the REST API behind the page, fetched by the browser: the leaderboard tag filter works
        filt = "tags.leaderboard = 'embedded'"
        api = _chromium("--dump-dom", f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=10")
        assert "kdbench/mnist1d" in api.stdout
        found = client.search_runs([exp_id], filter_string=filt)
        assert [r.info.run_id for r in found] == [run.info.run_id]
        json.dumps(found[0].data.tags)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
