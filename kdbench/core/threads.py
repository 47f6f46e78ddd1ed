"""CPU threads per training process: a fair share of the cores, kept fair while others start and stop.

Two training processes that each take every core (torch's default) slow each other down 50–100×
on a small machine: their OpenMP threads spin against each other. So every training process
registers itself in ``<cache>/processes/<pid>`` and takes ``cores // live processes`` threads; a
process re-reads the registry between epochs (:func:`rebalance`) and gives threads back or takes
them when others start or end. Entries of processes that died (``kill -9``) are ignored and
removed. An explicit thread count (``--threads N`` or ``KDBENCH_THREADS``) is kept as given
(at most the cores), and the process still counts for the others.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.data import cache_dir
from kdbench.errors import KdbenchError

ENV = "KDBENCH_THREADS"


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def registry() -> Path:
    path = cache_dir() / "processes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def live_processes() -> int:
    """Registered training processes that are still alive (stale entries are removed)."""
    count = 0
    for entry in registry().iterdir():
        if not entry.name.isdigit():
            continue
        if _alive(int(entry.name)):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return count


@dataclass
class ThreadShare:
    """This process's claim on the cores: ``explicit`` threads (None = fair share) and the count set now."""

    explicit: int | None
    threads: int
    entry: Path


def requested(threads: int | None) -> int | None:
    """The explicit thread count: ``threads`` if given, else ``$KDBENCH_THREADS``, else None (fair share)."""
    if threads is None and os.environ.get(ENV, "").strip():
        raw = os.environ[ENV].strip()
        if not raw.isdigit():
            raise KdbenchError(f"{ENV}={raw!r} is not a whole number; set it to a thread count such as 1 or unset it")
        threads = int(raw)
    if threads is not None and threads < 1:
        raise KdbenchError(f"--threads must be at least 1, got {threads}")
    return threads


def take_share(threads: int | None = None) -> ThreadShare:
    """Register this process and set torch's intra-op threads: the explicit count (capped at the
    cores), else ``cores // live training processes`` (at least 1). Released at exit."""
    explicit = requested(threads)
    entry = registry() / str(os.getpid())
    entry.touch()
    atexit.register(entry.unlink, missing_ok=True)
    share = ThreadShare(explicit=explicit, threads=0, entry=entry)
    rebalance(share)
    return share


def fair_share() -> int:
    return max(1, cores() // max(1, live_processes()))


def rebalance(share: ThreadShare) -> int:
    """Set the share again (between epochs): the fair share moves as training processes come and go."""
    wanted = min(share.explicit, cores()) if share.explicit is not None else fair_share()
    if wanted != share.threads or torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
        share.threads = wanted
    return wanted


def release(share: ThreadShare) -> None:
    share.entry.unlink(missing_ok=True)
