"""CIFAR datasets from tiny archives in the official pickle format, the downloader against a local
HTTP server, image folders, and the TOML recipes. Nothing here touches the real network."""
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench.contracts import Recipe
from kdbench.core.splits import load_split
from kdbench.errors import KdbenchError
from kdbench_builtin.datasets import cifar, image_folder
from kdbench.recipes import load_recipe, names as recipe_names, student_lr

N_TRAIN, N_TEST = 20, 10


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KDBENCH_DATA_DIR", raising=False)

    import socket

    real = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"a test tried to reach the network ({host})")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def tiny_files(name: str, seed: int = 0) -> dict[str, bytes]:
    """The data files of a tiny CIFAR release (bytes keys, as the official py2 pickles load)."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    key = b"labels" if name == "cifar10" else b"fine_labels"

    def batch(n):
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: [int(v) for v in rng.integers(0, classes, n)],
            b"batch_label": b"tiny",
        }

    if name == "cifar10":
        files = {f"data_batch_{i}": _pickle(batch(N_TRAIN // 5)) for i in range(1, 6)}
        files["test_batch"] = _pickle(batch(N_TEST))
        files["batches.meta"] = _pickle({b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        train = batch(N_TRAIN)
        train[b"coarse_labels"] = [0] * N_TRAIN
        files = {"train": _pickle(train), "test": _pickle(batch(N_TEST))}
        files["meta"] = _pickle({b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return files


def use_tiny_checksums(monkeypatch, name, files):
    table = {
        part: [(f, hashlib.md5(files[f]).hexdigest()) for f, _ in entries]
        for part, entries in cifar.FILES[name].items()
    }
    monkeypatch.setitem(cifar.FILES, name, table)


def write_release(root: Path, name: str, files) -> Path:
    folder = root / cifar.ARCHIVES[name][2]
    folder.mkdir(parents=True)
    for fname, blob in files.items():
        (folder / fname).write_bytes(blob)
    return folder


def tar_gz(name: str, files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        sub = cifar.ARCHIVES[name][2]
        for fname, blob in files.items():
            info = tarfile.TarInfo(f"{sub}/{fname}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_tiny_release(tmp_path, monkeypatch, name):
    files = tiny_files(name)
    use_tiny_checksums(monkeypatch, name, files)
    write_release(tmp_path / "data", name, files)
    load = cifar.DATASETS[[d.name for d in cifar.DATASETS].index(name)].load
    x_tr, y_tr = load("train", data_dir=str(tmp_path / "data"))
    x_val, y_val = load("val", data_dir=str(tmp_path / "data"))
    x_te, y_te = load("test", data_dir=str(tmp_path / "data"))
    assert x_tr.dtype == torch.uint8 and x_tr.shape == (18, 3, 32, 32) and y_tr.dtype == torch.int64
    assert x_val.shape == (2, 3, 32, 32) and x_te.shape == (10, 3, 32, 32)
    # labels and pixels are those of the files, in order (test split: no carving)
    key = "labels" if name == "cifar10" else "fine_labels"
    test_blob = pickle.loads(files["test_batch" if name == "cifar10" else "test"], encoding="bytes")
    assert y_te.tolist() == test_blob[key.encode()]
    assert torch.equal(x_te.reshape(10, -1), torch.from_numpy(test_blob[b"data"]))
    # train and val partition the official train set, deterministically
    again = load("val", data_dir=str(tmp_path / "data"))
    assert torch.equal(again[0], x_val) and torch.equal(again[1], y_val)
    assert sorted(torch.cat([y_tr, y_val]).tolist()) == sorted(
        sum((pickle.loads(files[f], encoding="bytes")[key.encode()] for f, _ in cifar.FILES[name]["train"]), [])
    )


def test_cifar_cache_and_env_dir(tmp_path, monkeypatch):
    files = tiny_files("cifar100")
    use_tiny_checksums(monkeypatch, "cifar100", files)
    folder = write_release(tmp_path / "env-data", "cifar100", files)
    monkeypatch.setenv("KDBENCH_DATA_DIR", str(tmp_path / "env-data"))
    x, y = cifar.load("cifar100", "test")
    assert list((tmp_path / "cache" / "data").glob("cifar100-test-*.npz"))
    for f in folder.iterdir():
        f.unlink()  # served from the npz cache now
    x2, y2 = cifar.load("cifar100", "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_cifar_goes_through_the_core_loader(tmp_path, monkeypatch):
    files = tiny_files("cifar100")
    use_tiny_checksums(monkeypatch, "cifar100", files)
    write_release(tmp_path, "cifar100", files)
    ds = cifar.DATASETS[0]
    split = load_split(ds, "train", torch.device("cpu"), {"data_dir": str(tmp_path / "cifar-100-python")})
    x, _ = next(split.batches(4))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)


def test_cifar_missing_folder_names_the_download_command(tmp_path):
    with pytest.raises(KdbenchError) as info:
        cifar.load("cifar100", "train", data_dir=str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "kdbench data download cifar100" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert str(tmp_path / "nowhere") in msg


def test_cifar_corrupt_file_is_named(tmp_path, monkeypatch):
    files = tiny_files("cifar10")
    use_tiny_checksums(monkeypatch, "cifar10", files)
    folder = write_release(tmp_path, "cifar10", files)
    blob = bytearray((folder / "data_batch_3").read_bytes())
    blob[100] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(blob))
    with pytest.raises(KdbenchError) as info:
        cifar.load("cifar10", "train", data_dir=str(tmp_path))
    msg = str(info.value)
    assert "data_batch_3" in msg and "corrupt" in msg and "\n" not in msg
    (folder / "data_batch_3").unlink()
    with pytest.raises(KdbenchError, match="file 'data_batch_3' missing"):
        cifar.load("cifar10", "train", data_dir=str(tmp_path))


def test_cifar_unknown_option(tmp_path):
    with pytest.raises(KdbenchError, match="no option 'size'"):
        cifar.load("cifar100", "train", data_dir=str(tmp_path), size=64)


def test_cifar_dataset_declarations():
    by_name = {d.name: d for d in cifar.DATASETS}
    c100 = by_name["cifar100"]
    assert c100.num_classes == 100 and c100.input_shape == (3, 32, 32)
    # RepDistiller's dataset/cifar100.py and mdistiller's mdistiller/dataset/cifar100.py: Normalize(...)
    assert c100.mean == (0.5071, 0.4867, 0.4408) and c100.std == (0.2675, 0.2565, 0.2761)
    assert c100.augment.crop_pad == 4 and c100.augment.flip
    assert c100.recipe == load_recipe("cifar100-standard")
    assert (c100.default_teacher, c100.default_student) == ("resnet32x4", "resnet8x4")
    assert by_name["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert cifar.ARCHIVES["cifar100"][1] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert cifar.ARCHIVES["cifar10"][1] == "c58f30108f718f92721af3b95e74349a"


# --------------------------------------------------------------------------- download


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def serve_tiny_cifar100(monkeypatch, server) -> str:
    """Serve a tiny cifar100 archive and make its md5 (and its files') the expected ones."""
    www, base = server
    files = tiny_files("cifar100")
    archive = tar_gz("cifar100", files)
    (www / "cifar-100-python.tar.gz").write_bytes(archive)
    use_tiny_checksums(monkeypatch, "cifar100", files)
    url, _, sub = cifar.ARCHIVES["cifar100"]
    monkeypatch.setitem(cifar.ARCHIVES, "cifar100", (url, hashlib.md5(archive).hexdigest(), sub))
    return base


def test_fetch_end_to_end(tmp_path, monkeypatch, server):
    base = serve_tiny_cifar100(monkeypatch, server)
    dest = tmp_path / "data"
    folder = cifar.fetch("cifar100", dest, base_url=base)
    assert folder == dest / "cifar-100-python"
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-100-python"]  # no archive, no temp
    x, y = cifar.load("cifar100", "test", data_dir=str(dest))
    assert x.shape == (N_TEST, 3, 32, 32)


def test_fetch_wrong_md5_leaves_nothing(tmp_path, server):
    www, base = server
    (www / "cifar-100-python.tar.gz").write_bytes(tar_gz("cifar100", tiny_files("cifar100")))
    dest = tmp_path / "data"
    with pytest.raises(KdbenchError) as info:
        cifar.fetch("cifar100", dest, base_url=base)  # the official md5 cannot match
    msg = str(info.value)
    assert "corrupt" in msg and "eb9058c3a382ffc7106e4002c42a8d85" in msg and "\n" not in msg
    assert list(dest.iterdir()) == []


def test_fetch_unreachable_is_one_line(tmp_path, server):
    _, base = server
    with pytest.raises(KdbenchError, match="could not download"):
        cifar.fetch("cifar10", tmp_path / "d", base_url=base + "/missing")
    assert list((tmp_path / "d").iterdir()) == []


def test_extract_refuses_escaping_members(tmp_path):
    from kdbench.data import extract

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(KdbenchError, match="could not extract"):
        extract(tmp_path / "a.tar.gz", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- image folder


def write_images(root: Path, classes=("cat", "dog", "eel"), per_class=10, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def stack(source):
    """A streamed split (torch Dataset of (x, y) samples) as (x, y) tensors."""
    xs, ys = zip(*(source[i] for i in range(len(source))))
    return torch.stack(xs), torch.stack(ys)


def test_image_folder_flat_layout(tmp_path):
    write_images(tmp_path / "imgs")
    ds = image_folder.image_folder_dataset(tmp_path / "imgs", size=16)
    assert ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    splits = {s: ds.load(s) for s in ("train", "val", "test")}
    assert all(isinstance(v, torch.utils.data.Dataset) for v in splits.values())  # streamed, not decoded
    x_tr, y_tr = stack(splits["train"])
    x_te, _ = stack(splits["test"])
    assert x_tr.dtype == torch.uint8 and x_tr.shape == (24, 3, 16, 16)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (24, 3, 3)
    assert set(y_tr.tolist()) == {0, 1, 2}
    assert torch.equal(stack(ds.load("test"))[0], x_te)  # deterministic
    split = load_split(ds, "train", torch.device("cpu"), {})
    assert type(split).__name__ == "LoaderSplit" and len(split) == 24


def test_image_folder_split_layout_and_labels(tmp_path):
    from PIL import Image

    write_images(tmp_path / "d" / "train", classes=("b", "a"), per_class=5)
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "d" / "test" / "a" / "red.png")
    x, y = stack(image_folder.load("test", data_dir=tmp_path / "d", size=32))
    assert y.tolist() == [0]  # classes sorted: a=0, b=1
    assert x[0, 0].min() == 255 and x[0, 1].max() == 0
    x_tr, _ = stack(image_folder.load("train", data_dir=tmp_path / "d", size=8))
    assert x_tr.shape == (9, 3, 8, 8)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stray.png").write_bytes(b"")
    with pytest.raises(KdbenchError, match="no class sub-folders") as info:
        image_folder.load("train", data_dir=tmp_path / "empty")
    assert "\n" not in str(info.value)
    with pytest.raises(KdbenchError, match="pass --data-dir"):
        image_folder.load("train")
    with pytest.raises(KdbenchError, match="does not exist"):
        image_folder.image_folder_dataset(tmp_path / "nope")


def test_image_folder_is_always_registered_and_resolved_per_folder(tmp_path, monkeypatch):
    from kdbench.core import plugins

    monkeypatch.delenv("KDBENCH_IMAGE_FOLDER", raising=False)
    plugins.reset()
    try:
        registered = plugins.registry().datasets["image_folder"].obj
    finally:
        plugins.reset()
    write_images(tmp_path / "three", per_class=10)
    write_images(tmp_path / "two", classes=("x", "y"), per_class=10)
    three = registered.resolve(data_dir=str(tmp_path / "three"))
    two = registered.resolve(data_dir=str(tmp_path / "two"), size="64")
    assert (three.num_classes, three.input_shape) == (3, (3, 32, 32))
    assert (two.num_classes, two.input_shape) == (2, (3, 64, 64))
    assert three.version != two.version and len(three.load("test")) == 3


# --------------------------------------------------------------------------- recipes


def test_standard_recipe_has_the_published_values():
    r = load_recipe("cifar100-standard")
    assert isinstance(r, Recipe)
    assert (r.optimizer, r.momentum, r.lr, r.batch_size, r.epochs) == ("sgd", 0.9, 0.05, 64, 240)
    assert (r.schedule, r.milestones, r.gamma, r.weight_decay) == ("multistep", (150, 180, 210), 0.1, 5e-4)
    assert load_recipe("cifar100-standard", student="mobilenetv2").lr == 0.01
    assert load_recipe("cifar100-standard", student="resnet8x4").lr == 0.05
    assert student_lr("cifar100-standard") == {"mobilenetv2": 0.01, "shufflenetv1": 0.01, "shufflenetv2": 0.01}


def test_fast_recipe_scales_lr_with_batch():
    std, fast = load_recipe("cifar100-standard"), load_recipe("cifar100-fast")
    assert fast.schedule == "cosine" and 30 <= fast.epochs <= 60
    assert fast.lr == pytest.approx(std.lr * fast.batch_size / std.batch_size)
    for model, lr in student_lr("cifar100-fast").items():
        assert lr == pytest.approx(student_lr("cifar100-standard")[model] * fast.batch_size / std.batch_size)


def test_recipe_errors(tmp_path):
    assert {"cifar100-standard", "cifar100-fast"} <= set(recipe_names())
    with pytest.raises(KdbenchError, match="did you mean cifar100-standard"):
        load_recipe("cifar100-standart")
    bad = tmp_path / "bad.toml"
    bad.write_text("[recipe]\nepochs = 1\nbatch_size = 2\nlr = 0.1\nlearning_rate = 3\n")
    with pytest.raises(KdbenchError, match="unknown field 'learning_rate'"):
        load_recipe(str(bad))


def test_data_download_command_through_the_cli(tmp_path, monkeypatch, server):
    from click.testing import CliRunner

    from kdbench.core import plugins
    from kdbench.cli import main

    base = serve_tiny_cifar100(monkeypatch, server)
    plugins.reset()
    dest = tmp_path / "data"
    result = CliRunner().invoke(main, ["data", "download", "cifar100", "--data-dir", str(dest), "--base-url", base])
    assert result.exit_code == 0, result.output
    assert f"cifar100: downloaded and verified in {dest / 'cifar-100-python'}\n" in result.output
    x, y = cifar.load("cifar100", "train", data_dir=str(dest))
    assert x.dtype == torch.uint8 and len(x) == len(y) > 0
    embedded = CliRunner().invoke(main, ["data", "download", "mnist1d"])
    assert embedded.exit_code == 1
    assert embedded.output.strip() == "error: dataset 'mnist1d' has no download (it is embedded: nothing to download)"
