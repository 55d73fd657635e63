"""Data sets as a seam (--dataset): CIFAR-100's python format, image-folder trees of any N classes,
their class names and statistics from the data to the checkpoint and back out of it.

Data is built in the real on-disk formats in tmp folders: PNG trees, and CIFAR-100's pickles as
torchvision's archive holds them (dicts with bytes keys, ``b"data"`` uint8 N x 3072 channel-major
rows, ``b"fine_labels"``, ``b"coarse_labels"``, ``b"filenames"``; ``meta`` with
``b"fine_label_names"``). Nothing is downloaded.
"""
from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from robustness import assert_one_line_error

from base.datasets import CIFAR10, CIFAR100, DatasetInfo
from base.errors import UserError
from datamodules import CIFAR10DataModule, ImageDataModule, read_split
from datamodules import sources
from datamodules.layout import CLASSES, check_data_dir, detect, folder_classes
from fakedata import make_image_folder

# One optimiser step, one validation batch: a real checkpoint in seconds. The final test of
# train.py and test.py itself see every test image (per-class values of every class).
TINY = ["--model", "resnet50", "--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1",
        "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "20",
        "--eval-batch-size", "50", "--log-every-n-steps", "1"]
TWENTY = tuple(f"kind_{i:02d}" for i in range(20))


# --- writers of the real formats ------------------------------------------------------------


def class_images(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each of ``n_classes`` (uint8 N,32,32,3; labels N), each class its own
    colour plus noise, labels cycling 0, 1, ..., like the official batches."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(40, 216, size=(n_classes, 3)).astype(np.float64)
    labels = np.arange(n_classes * per_class, dtype=np.int64) % n_classes
    noise = rng.normal(0.0, 20.0, size=(len(labels), 32, 32, 3))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).round().astype(np.uint8), labels


def make_class_tree(root: Path, classes: tuple[str, ...], train: int, test: int, test_classes=None) -> Path:
    """``root/{train,test}/<class>/NNNN.png``; ``test_classes`` (default: ``classes``) for test/."""
    for split, per_class, names, seed in (("train", train, classes, 0), ("test", test, test_classes or classes, 1)):
        images, labels = class_images(len(names), per_class, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i // len(names):04d}.png")
    return root


def make_cifar100_python(root: Path, n_train: int, n_test: int, names: tuple[str, ...] = CIFAR100.classes) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` pickled as the official archive is (protocol 2, bytes keys)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = class_images(100, -(-n // 100), seed)
        images, labels = images[:n], labels[:n]
        entry = {
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(label) for label in labels],
            b"coarse_labels": [int(label) // 5 for label in labels],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, -1),
        }
        with (folder / split).open("wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {b"fine_label_names": [name.encode() for name in names],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


# --- DatasetInfo ----------------------------------------------------------------------------


def test_dataset_info_round_trips_through_plain_values():
    """to_dict holds lists of str and float only: YAML and JSON give back the same DatasetInfo."""
    for info in (CIFAR10, CIFAR100, DatasetInfo("imagefolder", ("b", "a"), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))):
        plain = info.to_dict()
        assert all(isinstance(name, str) for name in plain["classes"])
        assert all(type(value) is float for value in plain["mean"] + plain["std"])
        assert DatasetInfo.from_dict(yaml.safe_load(yaml.safe_dump(plain))) == info
        assert DatasetInfo.from_dict(json.loads(json.dumps(plain))) == info
    assert CIFAR10.classes == CLASSES and CIFAR10.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR100.num_classes == 100 and list(CIFAR100.classes) == sorted(CIFAR100.classes)
    assert CIFAR100.classes[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100.classes[-1] == "worm"
    for bad in ({"name": "x", "classes": ["a"], "mean": [0, 0, 0], "std": [1, 1, 1]},
                {"name": "x", "classes": ["a", "a"], "mean": [0, 0, 0], "std": [1, 1, 1]},
                {"name": "x", "classes": ["a", "b"], "mean": [0, 0], "std": [1, 1, 1]},
                {"name": "x", "classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 0, 1]},
                {"name": "x", "classes": "ab", "mean": [0, 0, 0], "std": [1, 1, 1]},
                {"name": "x", "classes": ["a", "b"]}):
        with pytest.raises(ValueError):
            DatasetInfo.from_dict(bad)


# --- image-folder trees -----------------------------------------------------------------------


def test_folder_classes_are_sorted_and_cifar10_names_keep_their_order(tmp_path):
    """Sorted as torchvision's ImageFolder sorts them; CIFAR-10's ten names keep CIFAR-10's order."""
    mixed = make_class_tree(tmp_path / "mixed", ("zebra", "apple", "Mango"), 1, 1)
    assert folder_classes(mixed, "imagefolder") == ("Mango", "apple", "zebra")
    data = read_split(mixed, "train", dataset="imagefolder", cache_dir=tmp_path / "cache")
    assert data.classes == ("Mango", "apple", "zebra") and data.labels.tolist() == [0, 1, 2]
    cifar = make_image_folder(tmp_path / "cifar", 1, 1)
    assert folder_classes(cifar, "imagefolder") == CLASSES  # CIFAR-10's order, not sorted (cat < bird is false)
    assert read_split(cifar, "test", dataset="imagefolder", cache_dir=tmp_path / "cache").classes == CLASSES
    assert read_split(cifar, "test", dataset="cifar10", cache_dir=tmp_path / "cache").classes == CLASSES


@pytest.mark.parametrize("packed", [False, True], ids=["tree", "archive"])
def test_splits_with_different_classes_are_refused_in_one_line(tmp_path, packed):
    """train/ with a, b, c and test/ with a, b, d: one line naming the missing and the extra class."""
    tree = make_class_tree(tmp_path / "tree", ("a", "b", "c"), 1, 1, test_classes=("a", "b", "d"))
    where = tree
    if packed:
        where = tmp_path / "tree.tar.gz"
        with tarfile.open(where, "w:gz") as tar:
            for split in ("train", "test"):
                tar.add(tree / split, arcname=split)
    with pytest.raises(UserError) as error:
        check_data_dir(where, download=False, dataset="imagefolder")
        read_split(where, "train", dataset="imagefolder", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and "test/ lacks c" in message and "test/ has d, which train/ lacks" in message


def test_a_tree_needs_two_classes_and_an_archive_is_read_like_its_tree(tmp_path):
    """One class folder is refused; a .tar.gz of a 3-class tree gives the same arrays as the tree."""
    one = make_class_tree(tmp_path / "one", ("only",), 1, 1)
    with pytest.raises(UserError, match="at least 2 class folders in train/, found only only"):
        check_data_dir(one, download=False, dataset="imagefolder")
    tree = make_class_tree(tmp_path / "three", ("c", "a", "b"), 2, 1)
    archive = tmp_path / "three.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=f"top/{split}")
    for split in ("train", "test"):
        a = read_split(tree, split, dataset="imagefolder", cache_dir=tmp_path / "cache")
        b = read_split(archive, split, dataset="imagefolder", cache_dir=tmp_path / "cache")
        assert a.classes == b.classes == ("a", "b", "c")
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_measured_mean_and_std_of_a_known_image_set(tmp_path):
    """Per channel over every pixel: red half 0 half 255 (mean .5, std .5), green all 51 (mean .2,
    std 0, kept above 0), blue 0..255 in every row (mean .5, std of the uniform levels)."""
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    images[:, :16, :, 0] = 255
    images[..., 1] = 51
    images[..., 2] = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    for split in ("train", "test"):
        for i, image in enumerate(images):
            folder = tmp_path / "known" / split / ("dark" if i % 2 else "light")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    mean, std = sources.measure_stats(torch.from_numpy(images).permute(0, 3, 1, 2))
    levels = np.arange(256) / 255
    assert mean == pytest.approx((0.5, 0.2, levels.mean()), abs=1e-12)
    assert std == pytest.approx((0.5, 0.0, levels.std()), abs=1e-12)
    dm = ImageDataModule(tmp_path / "known", dataset="imagefolder", val_size=1, cache_dir=tmp_path / "cache",
                         download=False, workers=0)
    info = dm.dataset_info  # measured on the training split before setup
    assert info.name == "imagefolder" and info.classes == ("dark", "light")
    assert info.mean == pytest.approx((0.5, 0.2, levels.mean()))
    assert info.std[0] == pytest.approx(0.5) and info.std[1] == pytest.approx(1 / 255)  # a flat channel's floor
    dm.setup("fit")
    held_out = next(iter(dm.val_dataloader()))[0][0]  # the one validation image, normalised
    raw = dm.val_set.images[0].float() / 255
    assert torch.allclose(held_out, (raw - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(info.std).view(3, 1, 1),
                          atol=1e-4)


def test_both_data_paths_normalise_with_the_data_sets_statistics(tmp_path):
    """CIFAR-100's mean and std on the device batches and in the loader alike."""
    root = make_cifar100_python(tmp_path / "c100", 200, 100)
    for data_path in ("device", "loader"):
        dm = CIFAR10DataModule(root, dataset="cifar100", data_path=data_path, val_size=50, batch_size=200,
                               eval_batch_size=100, download=False, workers=0)
        dm.setup("test")
        images, _ = next(iter(dm.test_dataloader()))
        raw = dm.test_set.images.float() / 255
        mean, std = torch.tensor(CIFAR100.mean).view(1, 3, 1, 1), torch.tensor(CIFAR100.std).view(1, 3, 1, 1)
        assert torch.allclose(images.float(), (raw - mean) / std, atol=1e-5), data_path


# --- CIFAR-100's python format ---------------------------------------------------------------


def test_cifar100_reader_gives_fine_labels_and_the_official_names(tmp_path):
    root = make_cifar100_python(tmp_path / "data", 300, 100)
    train = read_split(root, "train", dataset="cifar100")
    test = read_split(root, "test", dataset="cifar100")
    assert train.classes == test.classes == CIFAR100.classes
    expected_images, expected_labels = class_images(100, 3, 0)
    assert train.labels.tolist() == expected_labels.tolist()
    assert torch.equal(train.images, torch.from_numpy(expected_images).permute(0, 3, 1, 2))
    assert test.images.shape == (100, 3, 32, 32) and sorted(test.labels.tolist()) == list(range(100))
    assert sources.detect(root, "cifar100").path.name == "cifar-100-python"
    dm = CIFAR10DataModule(root, dataset="cifar100", download=False)
    assert dm.dataset_info == CIFAR100 and dm.num_classes == 100  # known without reading anything


def test_cifar100_archive_problems_are_one_line_each(tmp_path):
    """Names in meta that are not CIFAR-100's, a missing file, and the wrong --dataset for a layout."""
    wrong = make_cifar100_python(tmp_path / "wrong", 100, 100, names=tuple(reversed(CIFAR100.classes)))
    with pytest.raises(UserError, match="corrupted CIFAR-100 batch file .*meta .*not CIFAR-100's 100 classes"):
        read_split(wrong, "train", dataset="cifar100")
    gone = make_cifar100_python(tmp_path / "gone", 100, 100)
    (gone / "cifar-100-python" / "test").unlink()
    with pytest.raises(UserError, match="missing CIFAR-100 batch file .*re-extract cifar-100-python.tar.gz"):
        check_data_dir(gone, download=True, dataset="cifar100")
    with pytest.raises(UserError, match="CIFAR-100's python archive, which --dataset cifar10 does not read: pass --dataset cifar100"):
        check_data_dir(gone / "cifar-100-python", download=True, dataset="cifar10")
    tree = make_class_tree(tmp_path / "tree", ("a", "b"), 1, 1)
    with pytest.raises(UserError, match="image-folder tree; --dataset cifar100 reads .*pass --dataset imagefolder"):
        check_data_dir(tree, download=True, dataset="cifar100")
    with pytest.raises(UserError, match="no image-folder data at"):
        check_data_dir(tmp_path / "nothing", download=True, dataset="imagefolder")
    # data/ holding CIFAR-10 only is where CIFAR-100 is downloaded beside it, as torchvision does.
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"")
    assert detect(tmp_path / "data", "cifar100") is None
    assert detect(gone, None).python.folder == "cifar-100-python"


def test_the_decode_cache_never_mixes_data_sets(tmp_path):
    """The same CIFAR-10-named tree read as cifar10 and as imagefolder, and a tree whose class folders
    changed, get caches of their own."""
    tree = make_image_folder(tmp_path / "tree", 1, 1)
    cache = tmp_path / "cache"
    read_split(tree, "train", dataset="cifar10", cache_dir=cache)
    read_split(tree, "train", dataset="imagefolder", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    source = detect(tree, "imagefolder")
    listing = sources._list_folder(tree, "train", CLASSES, "imagefolder")
    keys = {sources._cache_key(source, "train", listing, dataset, classes)
            for dataset, classes in (("cifar10", CLASSES), ("imagefolder", CLASSES), ("imagefolder", CLASSES[::-1]))}
    assert len(keys) == 3
    # A cache holds its class names, and one of other names is not taken for this data.
    cache_file = next(cache.glob("*.npz"))
    assert sources._read_cache(cache_file, CLASSES) is not None
    assert sources._read_cache(cache_file, TWENTY) is None


# --- checkpoints without a data set record ---------------------------------------------------


def test_checkpoints_without_a_data_set_record_read_as_cifar10(tmp_path):
    from run.checkpoints import CheckpointContents, checkpoint_dataset, records_dataset

    def contents(num_classes: int, hparams: dict) -> CheckpointContents:
        return CheckpointContents(tmp_path / "x.ckpt", "lightning", "vgg16", num_classes, {}, {}, hparams)

    assert checkpoint_dataset(contents(10, {})) == CIFAR10  # a course state dict
    renamed = checkpoint_dataset(contents(10, {"class_names": [f"c{i}" for i in range(10)]}))
    assert renamed.classes[0] == "c0" and (renamed.mean, renamed.std) == (CIFAR10.mean, CIFAR10.std)
    assert checkpoint_dataset(contents(3, {})).classes == ("class 0", "class 1", "class 2")
    recorded = contents(100, {"dataset": CIFAR100.to_dict()})
    assert records_dataset(recorded) and checkpoint_dataset(recorded) == CIFAR100
    with pytest.raises(UserError, match="records a data set of 100 classes for a 10-class network"):
        checkpoint_dataset(contents(10, {"dataset": CIFAR100.to_dict()}))


# --- dashboards of many classes --------------------------------------------------------------


def test_a_100_class_confusion_matrix_is_a_bounded_heat_map(tmp_path):
    """No per-cell numbers, every 5th class labelled, a picture no larger than about 1100 x 950."""
    from callbacks.dashboards import confusion_matrix_figure, figure_to_array

    matrix = torch.eye(100, dtype=torch.long) * 7 + torch.randint(0, 2, (100, 100), generator=torch.Generator().manual_seed(0))
    figure = confusion_matrix_figure(matrix, CIFAR100.classes, "test")
    axes = figure.axes[0]
    assert not axes.texts
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert len(labels) == 20 and labels[0] == "0 apple" and labels[1] == "5 bed"
    picture = figure_to_array(figure)
    assert picture.shape[0] <= 1000 and picture.shape[1] <= 1200
    small = confusion_matrix_figure(torch.eye(10, dtype=torch.long), CLASSES, "test")
    assert len(small.axes[0].texts) == 10  # ten classes keep their numbers


# --- end to end: train, test, predict, export ------------------------------------------------


def _end_to_end(cli, tmp_path: Path, data: Path, dataset: str, classes: tuple[str, ...],
                pictures: list[Path], trained_mean=None) -> Path:
    """train.py on ``data`` as ``dataset``, then test.py, predict.py and export.py on its best.ckpt,
    each giving ``classes``; returns best.ckpt (the caller removes the runs: checkpoints are large)."""
    runs = tmp_path / "runs"
    result = cli("train", "--dataset", dataset, "--data-dir", str(data), "--output-dir", str(runs),
                 "--cache-dir", str(tmp_path / "cache"), *TINY)
    assert result.code == 0, result.err
    best = runs / "resnet50" / "version_0" / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["dataset"]
    info = DatasetInfo.from_dict(saved)
    assert info.name == dataset and info.classes == classes
    if trained_mean is not None:
        assert info.mean == pytest.approx(trained_mean)

    results = tmp_path / "test.json"
    result = cli("test", "--ckpt", str(best), "--accelerator", "cpu", "--workers", "0", "--json", str(results))
    assert result.code == 0, result.err
    tested = json.loads(results.read_text())
    assert list(tested["per_class_accuracy"]) == list(classes)
    assert tested["dataset"] == dataset

    result = cli("predict", "--ckpt", str(best), "--accelerator", "cpu", "--json", "--top-k", "3", *map(str, pictures))
    assert result.code == 0, result.err
    records = [json.loads(line) for line in result.out.splitlines()]
    assert len(records) == len(pictures)
    assert all(record["class"] in classes and all(t["class"] in classes for t in record["top_k"]) for record in records)

    exported = tmp_path / "model.safetensors"
    result = cli("export", "--ckpt", str(best), "--format", "safetensors", "--output", str(exported))
    assert result.code == 0, result.err
    from safetensors import safe_open

    with safe_open(exported, framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["class_names"]) == list(classes)
    assert DatasetInfo.from_dict(json.loads(metadata["dataset"])) == info
    assert json.loads(metadata["mean"]) == pytest.approx(list(info.mean))
    result = cli("predict", "--ckpt", str(exported), "--accelerator", "cpu", "--json", str(pictures[0]))
    assert result.code == 0 and json.loads(result.out)["class"] in classes, result.err
    return best


@pytest.mark.slow
def test_a_20_class_image_folder_trains_tests_predicts_and_exports(cli, tmp_path):
    tree = make_class_tree(tmp_path / "twenty", TWENTY[::-1], 4, 2)  # folders made in reverse: sorted on reading
    train = read_split(tree, "train", dataset="imagefolder", cache_dir=tmp_path / "cache")
    mean, _ = sources.measure_stats(train.images)
    pictures = [tree / "test" / TWENTY[3] / "0000.png", tree / "test" / TWENTY[17] / "0001.png"]
    best = _end_to_end(cli, tmp_path, tree, "imagefolder", TWENTY, pictures, trained_mean=mean)
    # The checkpoint's classes against a test set of other classes: one line, before any testing.
    other = make_class_tree(tmp_path / "other", TWENTY[:19] + ("stranger",), 1, 1)
    assert_one_line_error(cli("test", "--ckpt", str(best), "--data-dir", str(other), "--accelerator", "cpu",
                              "--workers", "0", "--cache-dir", str(tmp_path / "cache")),
                          "does not have the classes the checkpoint was trained on", "without kind_19", "with stranger")
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # checkpoints are large; pytest would keep them


@pytest.mark.slow
def test_a_cifar100_python_archive_trains_tests_predicts_and_exports(cli, tmp_path):
    root = make_cifar100_python(tmp_path / "data", 300, 100)
    images, _ = class_images(100, 1, 1)
    pictures = []
    for i in (0, 42):
        pictures.append(tmp_path / f"picture_{i}.png")
        Image.fromarray(images[i]).save(pictures[-1])
    _end_to_end(cli, tmp_path, root, "cifar100", CIFAR100.classes, pictures, trained_mean=CIFAR100.mean)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
