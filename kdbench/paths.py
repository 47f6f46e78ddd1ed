"""Where kdbench keeps files: the cache (teachers, generated datasets) and the tracking store."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KDBENCH_CACHE_DIR``, else ``~/.cache/kdbench``; created on first use."""
    root = os.environ.get("KDBENCH_CACHE_DIR") or Path.home() / ".cache" / "kdbench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
