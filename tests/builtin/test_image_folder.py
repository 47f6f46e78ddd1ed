"""The built-in ``image_folder``: classes read from the folder when a run is planned, splits carved
as index lists, images decoded one by one (Pillow) and streamed by a DataLoader; bad input is one
line. Tiny PNG folders are written in tmp_path; nothing touches the network."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from kdbench.core import plugins
from kdbench.cli import main
from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.core.splits import DeviceSplit, LoaderSplit, load_split
from kdbench.data import carve_validation
from kdbench.errors import KdbenchError
from kdbench.core.plan import RunConfig, make_plan, resolve_dataset
from kdbench.testing import check_dataset
from kdbench_builtin.datasets import image_folder

CPU = torch.device("cpu")


def write_images(root: Path, classes=("cat", "dog", "eel"), per_class=8, size=(20, 12), seed=0):
    """``per_class`` random RGB PNGs of ``size`` (w, h) per class folder; returns their pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
            pixels[f"{c}/{i}.png"] = img
    return pixels


def decode(path: Path, size: int) -> torch.Tensor:
    """What a sample must be: Pillow RGB, bilinear to size x size, channels first."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def stacked(source) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(source[i] for i in range(len(source))))
    return torch.stack(xs), torch.stack(ys)


def names(source) -> list[str]:
    return [os.path.relpath(source.path(i), source.root) for i in range(len(source))]


def one_line_error(pattern, fn, *args, **kwargs) -> str:
    with pytest.raises(KdbenchError, match=pattern) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- decoding and labels


def test_pixels_and_labels_follow_the_files_and_sorted_class_names(tmp_path):
    root = tmp_path / "d"
    write_images(root / "train", classes=("b", "a"), per_class=5)
    (root / "test" / "a").mkdir(parents=True)
    (root / "test" / "b").mkdir(parents=True)
    Image.new("RGB", (50, 20), (255, 0, 0)).save(root / "test" / "a" / "red.png")
    Image.new("L", (9, 9), 128).save(root / "test" / "b" / "grey.png")  # grayscale -> RGB
    Image.new("RGBA", (16, 16), (0, 0, 255, 10)).save(root / "test" / "b" / "blue.png")  # alpha dropped
    ds = image_folder.resolve(data_dir=str(root), size=16)
    assert ds.num_classes == 2 and ds.input_shape == (3, 16, 16)
    test = ds.load("test")
    assert names(test) == ["test/a/red.png", "test/b/blue.png", "test/b/grey.png"]
    x, y = stacked(test)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 16, 16) and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 1]  # classes sorted: a = 0, b = 1 (the train folders were written b first)
    assert torch.equal(x[0], torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))
    assert torch.equal(x[1], torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))
    assert torch.equal(x[2], torch.full((3, 16, 16), 128, dtype=torch.uint8))
    # a random, non-square train image is resized exactly as Pillow's bilinear resize does
    train = ds.load("train")
    assert torch.equal(train[0][0], decode(Path(train.path(0)), 16))
    assert train.targets.tolist() == [int(train[i][1]) for i in range(len(train))]


def test_flat_layout_split_sizes_are_exact_disjoint_and_match_carving_the_tensors(tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    (tmp_path / "imgs" / "cat" / "._0.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".thumbs").mkdir()  # hidden folder: not a class
    ds = image_folder.resolve(data_dir=str(tmp_path / "imgs"), size="8")
    assert ds.num_classes == 3 and ds.input_shape == (3, 8, 8)
    splits = {s: ds.load(s) for s in ("train", "val", "test")}
    # 24 images: test = round(2.4) = 2 (seed 1), val = round(2.2) = 2 of the other 22 (seed 0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 20, "val": 2, "test": 2}
    files = {s: names(v) for s, v in splits.items()}
    assert sorted(sum(files.values(), [])) == sorted(f"{c}/{i}.png" for c in ("cat", "dog", "eel") for i in range(8))
    assert not set(files["train"]) & set(files["val"]) and not set(files["train"]) & set(files["test"])
    # the same samples as decoding every image and carving the tensors (the former in-memory path)
    every = [(c, i) for c in ("cat", "dog", "eel") for i in range(8)]
    x = torch.stack([decode(tmp_path / "imgs" / c / f"{i}.png", 8) for c, i in every])
    y = torch.tensor([("cat", "dog", "eel").index(c) for c, _ in every])
    rest, test = carve_validation(x, y, fraction=0.1, seed=1)
    train, val = carve_validation(*rest, fraction=0.1, seed=0)
    for split, (xs, ys) in {"train": train, "val": val, "test": test}.items():
        got = stacked(splits[split])
        assert torch.equal(got[0], xs) and torch.equal(got[1], ys), split
    # deterministic: a second resolve lists the same files in the same order
    again = image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=8)
    assert all(names(again.load(s)) == files[s] for s in files)


def test_split_layout_carves_val_from_train_unless_there_is_a_val_folder(tmp_path):
    root = tmp_path / "d"
    write_images(root / "train", classes=("x", "y"), per_class=10)
    write_images(root / "test", classes=("x",), per_class=3, seed=1)
    ds = image_folder.resolve(data_dir=str(root), size=8)
    sizes = {s: len(ds.load(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 2, "test": 3}  # val = 10 % of 20 train images, seed 0
    idx = torch.arange(20)
    (keep, _), (carved, _) = carve_validation(idx, idx, fraction=0.1, seed=0)
    listed = [f"train/{c}/{i}.png" for c in ("x", "y") for i in range(10)]
    assert names(ds.load("val")) == [listed[i] for i in carved.tolist()]
    assert names(ds.load("train")) == [listed[i] for i in keep.tolist()]
    assert ds.load("test").targets.tolist() == [0, 0, 0]
    write_images(root / "val", classes=("y",), per_class=4, seed=2)
    ds = image_folder.resolve(data_dir=str(root), size=8)
    assert {s: len(ds.load(s)) for s in ("train", "val", "test")} == {"train": 20, "val": 4, "test": 3}
    assert ds.load("val").targets.tolist() == [1, 1, 1, 1]


# --------------------------------------------------------------------------- resolve, options, version


def test_resolve_reads_the_folder_and_version_follows_its_contents(tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    entry = plugins.registry().datasets["image_folder"]  # registered with no environment variable
    registered = entry.obj
    assert registered.resolve is not None and "--data-dir" in registered.description
    ds = resolve_dataset(registered, {"data_dir": str(tmp_path / "imgs"), "size": "64"})
    assert (ds.name, ds.num_classes, ds.input_shape, ds.resolve) == ("image_folder", 3, (3, 64, 64), None)
    assert (ds.default_teacher, ds.default_student) == ("resnet34", "resnet18")
    assert ds.augment == Augment(crop_pad=8, flip=True) and ds.mean == image_folder.IMAGENET_MEAN
    version = ds.version
    assert version == image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=64).version
    assert version != image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=32).version
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "dog" / "new.png")
    added = image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=64)
    assert added.version != version and len(added.load("train")) + len(added.load("val")) + len(added.load("test")) == 25
    stat = os.stat(tmp_path / "imgs" / "dog" / "new.png")
    os.utime(tmp_path / "imgs" / "dog" / "new.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=64).version != added.version
    # below 32 pixels no built-in pair builds: no defaults, and planning says to pass the models
    small = image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=16)
    assert small.default_teacher is None and small.default_student is None
    config = RunConfig(method="kd", dataset="image_folder", data_options={"data_dir": str(tmp_path / "imgs"), "size": "16"})
    one_line_error("names no default student; pass --student", make_plan, config, plugins.registry())


def test_bad_options_are_one_line_errors(tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    d = str(tmp_path / "imgs")
    reg = plugins.registry()
    plan = lambda **opts: make_plan(RunConfig(method="kd", dataset="image_folder", teacher="resnet8",  # noqa: E731
                                              student="resnet8", data_options=opts), reg)
    assert plan(data_dir=d, size="32").dataset_obj.num_classes == 3
    assert "--data-dir DIR" in one_line_error(r"needs a folder of class sub-folders: pass --data-dir", plan)
    assert "data_dir, size" in one_line_error(r"has no option 'colour' \(it takes: data_dir, size\)",
                                              plan, data_dir=d, colour="rgb")
    one_line_error(r"size must be >= 8, got 7", plan, data_dir=d, size="7")
    one_line_error(r"size must be a whole number of pixels, got 'big'", plan, data_dir=d, size="big")
    one_line_error(r"size must be a whole number of pixels, got '32.5'", plan, data_dir=d, size="32.5")
    one_line_error(r"image folder .*nope does not exist", plan, data_dir=str(tmp_path / "nope"))
    ds = image_folder.resolve(data_dir=d, size=32)
    one_line_error(r"is 32x32, not size=64", ds.load, "train", data_dir=d, size="64")
    one_line_error(r"reads .*imgs, not .*other", ds.load, "train", data_dir=str(tmp_path / "other"))
    one_line_error(r"has no split 'extra'", ds.load, "extra")
    assert len(ds.load("val", data_dir=d, size="32")) == 2  # the planning options come again: accepted


def test_bad_folders_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "stray.png").write_bytes(b"")
    one_line_error(r"has no class sub-folders \(expected .*/CLASS/IMAGE.png", image_folder.resolve,
                   data_dir=str(tmp_path / "empty"))
    write_images(tmp_path / "d" / "train", classes=("a", "b"))
    write_images(tmp_path / "d" / "test", classes=("a", "zebra"))
    one_line_error(r"test has class 'zebra', which the train split lacks", image_folder.resolve,
                   data_dir=str(tmp_path / "d"))
    write_images(tmp_path / "imagenet" / "train", classes=("a", "b"))
    write_images(tmp_path / "imagenet" / "val", classes=("a", "b"))
    one_line_error(r"has train/ with class sub-folders but no test/", image_folder.resolve,
                   data_dir=str(tmp_path / "imagenet"))
    write_images(tmp_path / "hollow", classes=("a", "b"))
    (tmp_path / "hollow" / "c").mkdir()
    one_line_error(r"hollow/c holds no images", image_folder.resolve, data_dir=str(tmp_path / "hollow"))
    write_images(tmp_path / "few", classes=("a", "b"), per_class=2)
    one_line_error(r"split 'test' would hold no images \(10% of 4 images rounds to none\)",
                   image_folder.resolve, data_dir=str(tmp_path / "few"))


def test_an_unreadable_image_fails_when_read_naming_the_file_in_one_line(tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    bad = tmp_path / "imgs" / "dog" / "3.png"
    bad.write_bytes(b"not a png")
    ds = image_folder.resolve(data_dir=str(tmp_path / "imgs"), size=8)  # listing opens no image
    split = next(s for s in ("train", "val", "test") if "dog/3.png" in names(ds.load(s)))
    source = ds.load(split)
    i = names(source).index("dog/3.png")
    assert one_line_error(r"could not be read", source.__getitem__, i).startswith(f"image {bad} could not be read")
    # read by a DataLoader worker: torch re-raises it in the main process, still one line
    loader = LoaderSplit(source, CPU, None, None, workers=1)
    message = one_line_error(r"could not be read", lambda: [b for b in loader.batches(64)])
    assert message.startswith(f"image {bad} could not be read")


# --------------------------------------------------------------------------- the DataLoader path


def test_loader_path_over_the_folder_draws_exactly_the_device_paths_batches(tmp_path):
    write_images(tmp_path / "imgs", per_class=12, size=(10, 14))
    opts = {"data_dir": str(tmp_path / "imgs"), "size": "8"}
    ds = image_folder.resolve(**opts)
    streamed = load_split(ds, "train", CPU, opts)
    assert isinstance(streamed, LoaderSplit) and len(streamed) == 29  # 36 - 4 test - 3 val
    x, y = stacked(ds.load("train"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ds.mean, ds.std))
    resident = DeviceSplit(x, y, mean, std)
    for workers in (0, 2):
        streamed = LoaderSplit(ds.load("train"), CPU, mean, std, workers=workers)
        a = list(resident.shuffled(8, torch.Generator().manual_seed(3), ds.augment))
        b = list(streamed.shuffled(8, torch.Generator().manual_seed(3), ds.augment))
        assert len(a) == len(b) == 3  # 29 // 8, the partial batch dropped on both
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb)
        evals = [torch.cat([xb for xb, _ in s.batches(16)]) for s in (resident, streamed)]
        torch.testing.assert_close(evals[0], evals[1])
        torch.testing.assert_close(evals[1], (x.float() / 255 - mean) / std)


def test_plugin_helper_registers_a_fixed_folder_under_its_own_name(tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    recipe = Recipe(epochs=3, batch_size=4, lr=0.1)
    ds = image_folder.image_folder_dataset(tmp_path / "imgs", size=32, name="my_photos", recipe=recipe)
    assert isinstance(ds, Dataset) and ds.resolve is None
    assert (ds.name, ds.num_classes, ds.input_shape, ds.recipe) == ("my_photos", 3, (3, 32, 32), recipe)
    assert len(ds.load("train")) == 20
    one_line_error(r"dataset 'my_photos' has no option 'foo' \(it takes: data_dir, size\)", ds.load, "train", foo=1)
    one_line_error(r"image folder .*nope does not exist", image_folder.image_folder_dataset, tmp_path / "nope")


def test_conformance_kit_and_plugin_check_take_the_folder(env, tmp_path):
    write_images(tmp_path / "imgs", per_class=8)
    check_dataset("image_folder", options={"data_dir": str(tmp_path / "imgs"), "size": "32"})
    result = CliRunner().invoke(main, ["plugin", "check", "dataset", "image_folder", "--data-dir",
                                       str(tmp_path / "imgs"), "--data-option", "size=64"])
    assert result.exit_code == 0 and "conforms" in result.output, result.output
    result = CliRunner().invoke(main, ["plugin", "check", "dataset", "image_folder"])
    assert result.exit_code == 1 and "pass --data-dir" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- end to end


def test_run_on_an_image_folder_through_the_cli(env, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", per_class=8)
    # the teacher trains with the dataset's recipe: a short one keeps this test quick
    monkeypatch.setattr(image_folder, "RECIPE", Recipe(epochs=1, batch_size=8, lr=0.05, schedule="constant"))
    result = CliRunner().invoke(main, [
        "run", "--dataset", "image_folder", "--data-dir", str(tmp_path / "imgs"), "--data-option", "size=32",
        "--teacher", "resnet8", "--student", "resnet8", "--epochs", "1", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/image_folder")
    found = client.search_runs([exp.experiment_id], max_results=10)
    (student,) = [r for r in found if r.data.tags.get("role") == "student"]
    (teacher,) = [r for r in found if r.data.tags.get("role") == "teacher"]
    params, m = student.data.params, student.data.metrics
    assert params["data.data_dir"] == str(tmp_path / "imgs") and params["data.size"] == "32"
    assert params["recipe.epochs"] == "1" and student.data.tags["dataset"] == "image_folder"
    assert m["params_student"] == m["params_teacher"] == 77_587  # resnet8 with 3 classes
    assert teacher.data.params["recipe.batch_size"] == "8"  # trained with the dataset's recipe
    for top1 in (m["test_top1"], teacher.data.metrics["test_top1"]):
        assert top1 in (0.0, 0.5, 1.0)  # 2 test images (10 % of 24)
