"""Helpers for dataset plugins (public API): where to cache files, how to download and verify an
archive, how to carve a validation split.

Downloads leave nothing half-done: an archive is streamed to ``NAME.part`` and renamed only once its
md5 matches; it is extracted into a temporary folder next to the destination and its top-level
entries are moved into place only when extraction succeeded.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from kdbench.errors import KdbenchError

CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$KDBENCH_CACHE_DIR``, else ``~/.cache/kdbench``; created on first use."""
    root = os.environ.get("KDBENCH_CACHE_DIR") or Path.home() / ".cache" / "kdbench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def carve_validation(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.1, seed: int = 0):
    """Split (x, y) into (train, val) with a fixed seed: ``((x_tr, y_tr), (x_val, y_val))``."""
    n = len(y)
    n_val = int(round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train], y[train]), (x[val], y[val])


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = CHUNK) -> str:
    """Hex digest of a file (``hashlib`` algorithm name), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex md5 of a file, read in chunks."""
    return file_digest(path, "md5", chunk)


def fetch_url(url: str, path: Path, progress: Callable[[int, int | None], None] | None = None,
              timeout: float = 60.0) -> str:
    """Stream ``url`` to ``path``; return the md5 of what was written."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            while block := response.read(CHUNK):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise KdbenchError(f"could not download {url}: {reason}") from None
    return digest.hexdigest()


def extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a tar(.gz) archive into ``dest``; returns the top-level paths put there.

    Members are extracted with tarfile's ``data`` filter (no absolute paths, no escaping links)
    into a temporary folder inside ``dest``; existing top-level entries of the same name are
    replaced only after the whole archive extracted."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".kdbench-extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise KdbenchError(f"could not extract {archive}: {exc}") from None
        placed = []
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            entry.rename(target)
            placed.append(target)
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(url: str, dest: str | Path, md5: str | None, *, extract_archive: bool = True,
             keep_archive: bool = False,
             progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download ``url`` into the folder ``dest``, check its ``md5``, and extract it there.

    An archive already in ``dest`` with the right md5 is not downloaded again. A wrong md5 is a
    :class:`KdbenchError` naming both sums; the bad download is deleted and nothing is extracted.
    Returns ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.request.url2pathname(url.rstrip("/").rsplit("/", 1)[-1])).name or "download"
    archive = dest / name
    if archive.exists() and md5 is not None and md5sum(archive) == md5:
        got = md5
    else:
        part = dest / (name + ".part")
        got = fetch_url(url, part, progress)
        if md5 is not None and got != md5:
            part.unlink(missing_ok=True)
            raise KdbenchError(
                f"download of {url} is corrupt: md5 {got}, expected {md5}; nothing was extracted "
                "(try again, or fetch the file by hand and put it in " + str(dest) + ")"
            )
        part.replace(archive)
    if extract_archive:
        extract(archive, dest)
        if not keep_archive:
            archive.unlink(missing_ok=True)
    return dest
