"""Claims across machines: on a PostgreSQL store the claim lock is a PostgreSQL advisory lock (held
by one session at a time, whatever machine it is on); sqlite and file stores keep the file lock."""
import os
import threading
import time
from pathlib import Path

import pytest

from kdbench.workflows import claims

PG_URL_FILE = Path(os.environ.get("KDBENCH_PG_URL_FILE", "/tmp/kdbench-postgres.url"))


def test_which_lock(monkeypatch):
    monkeypatch.delenv("KDBENCH_LOCK_URL", raising=False)
    assert claims.lock_database("postgresql://u:p@h/db") == "postgresql://u:p@h/db"
    assert claims.lock_database("sqlite:///mlflow.db") is None
    assert claims.lock_database("http://127.0.0.1:5000") is None
    monkeypatch.setenv("KDBENCH_LOCK_URL", "postgresql://u:p@h/db")  # a server backed by PostgreSQL
    assert claims.lock_database("http://127.0.0.1:5000") == "postgresql://u:p@h/db"


def test_advisory_lock_serialises_sessions(tmp_path):
    if not PG_URL_FILE.exists():
        pytest.skip(f"no PostgreSQL URL in {PG_URL_FILE} (start it: bash .ci/services.d/postgres.sh start)")
    url = PG_URL_FILE.read_text().strip()
    events = []

    def hold(name: str) -> None:
        with claims.store_lock(url, tmp_path):
            events.append((name, "in", time.monotonic()))
            time.sleep(0.3)
            events.append((name, "out", time.monotonic()))

    threads = [threading.Thread(target=hold, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # each holder leaves before the next enters: in, out, in, out, ...
    assert [kind for _, kind, _ in events] == ["in", "out"] * 3
    assert [name for name, _, _ in events[::2]] == [name for name, _, _ in events[1::2]]
    assert not list(tmp_path.iterdir())  # no file lock was used
