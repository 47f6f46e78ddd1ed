"""The public dataset helpers of kdbench.data (for dataset plugins)."""
import hashlib

import torch

from kdbench.data import cache_dir, carve_validation, file_digest, md5sum


def test_carve_validation_is_a_fixed_disjoint_split():
    x, y = torch.arange(100).float()[:, None], torch.arange(100)
    (xt, yt), (xv, yv) = carve_validation(x, y, 0.1, seed=0)
    assert len(yv) == 10 and len(yt) == 90
    assert set(yv.tolist()).isdisjoint(yt.tolist())
    (_, _), (_, yv2) = carve_validation(x, y, 0.1, seed=0)
    assert torch.equal(yv, yv2)


def test_file_digest_reads_in_chunks_like_hashlib(tmp_path):
    blob = bytes(range(256)) * 41  # not a multiple of the chunk size below
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert file_digest(path) == hashlib.sha256(blob).hexdigest()
    assert file_digest(path, "sha1", chunk=100) == hashlib.sha1(blob).hexdigest()
    assert md5sum(path, chunk=7) == hashlib.md5(blob).hexdigest()


def test_cache_dir_follows_the_environment_and_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here" and (tmp_path / "here").is_dir()
