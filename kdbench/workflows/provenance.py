"""Where a run came from: the tags every teacher and student run carries (dataset, seed, versions,
device, git commit, recipe hash) and the recipe hash itself."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import torch

from kdbench import __version__
from kdbench.core.plan import Plan


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def recipe_hash(plan: Plan) -> str:
    return hashlib.sha256(repr(sorted(plan.recipe.as_dict().items())).encode()).hexdigest()[:12]


def base_tags(plan: Plan, device: torch.device) -> dict:
    tags = {
        "dataset": plan.dataset_obj.name,
        "seed": plan.config.seed,
        "kdbench_version": __version__,
        "torch_version": torch.__version__,
        "device": device_name(device),
        "plugin.dataset": plan.dataset.source,
        "recipe_hash": recipe_hash(plan),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return {**tags, **plan.config.tags}
