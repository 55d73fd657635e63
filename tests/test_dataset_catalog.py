"""A data set is one catalog entry: ``datamodules.datasets.register(Dataset(...))`` makes it a
``--dataset`` choice that train.py, test.py and predict.py find, read, check and name from the
entry alone.

The entry here, ``tiny5``, is a python archive in torchvision's format (the CIFAR-10 one) with 5
classes of its own and no torchvision downloader. Its archive is built in tmp folders as the
official batches are pickled (protocol 2, bytes keys; ``b"data"`` uint8 N x 3072 channel-major
rows, ``b"labels"``; ``batches.meta`` with ``b"label_names"``). Nothing is downloaded.
"""
from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from robustness import assert_one_line_error

from base.datasets import DatasetInfo
from base.errors import UserError
from datamodules import datasets
from datamodules.datasets import CATALOG, Dataset, PythonArchive

TINY5_CLASSES = ("acorn", "brook", "cliff", "dune", "ember")
TINY5_PYTHON = PythonArchive(
    folder="tiny5-py",
    batches={"train": ("data_batch_1",), "test": ("test_batch",)},
    label_key="labels",
    meta="batches.meta",
    names_key="label_names",
)  # torchvision=None: it cannot be downloaded
TINY5 = Dataset(
    name="tiny5",
    title="Tiny5",
    info=DatasetInfo("tiny5", TINY5_CLASSES, mean=(0.5, 0.45, 0.4), std=(0.25, 0.24, 0.26)),
    python=TINY5_PYTHON,
    reads_folders=False,
)
# One epoch of one optimiser step and one validation batch; the final test sees all 20 test images.
TINY = ["--model", "vgg16", "--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1",
        "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "20",
        "--eval-batch-size", "20", "--log-every-n-steps", "1"]


@pytest.fixture
def tiny5() -> Iterator[Dataset]:
    """``tiny5`` in the catalog for one test. The catalog is a live view, so the modules imported
    before (the flag parsers read ``tuple(CATALOG)`` when built) see it; removed at the end."""
    datasets.register(TINY5)
    try:
        yield TINY5
    finally:
        datasets.unregister(TINY5.name)


def tiny5_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 N,32,32,3) with labels cycling 0..4, each class its own colour plus noise."""
    rng = np.random.default_rng(seed)
    palette = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)], dtype=np.float64)
    labels = np.arange(n, dtype=np.int64) % len(TINY5_CLASSES)
    noise = rng.normal(0.0, 20.0, size=(n, 32, 32, 3))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).round().astype(np.uint8), labels


def make_tiny5_python(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """``root/tiny5-py/{data_batch_1,test_batch,batches.meta}``, pickled as torchvision's archives are."""
    folder = root / TINY5_PYTHON.folder
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = tiny5_images(n, seed)
        batch = {
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"labels": [int(label) for label in labels],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, -1),
            b"filenames": [f"img_{i:04d}.png".encode() for i in range(n)],
        }
        with (folder / TINY5_PYTHON.batches[split][0]).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    with (folder / TINY5_PYTHON.meta).open("wb") as f:
        pickle.dump({b"label_names": [name.encode() for name in TINY5_CLASSES], b"num_vis": 3072}, f, protocol=2)
    return root


# --- the catalog itself -----------------------------------------------------------------------


def test_register_refuses_a_taken_name_and_unregister_keeps_the_built_in_ones():
    with pytest.raises(ValueError, match="'cifar10' is already in the catalog"):
        datasets.register(Dataset("cifar10", "Another", None, None, reads_folders=True))
    for name in ("cifar10", "cifar100", "imagefolder"):
        with pytest.raises(ValueError, match="built in and cannot be removed"):
            datasets.unregister(name)
    assert tuple(CATALOG) == ("cifar10", "cifar100", "imagefolder")
    # Entries that could not be read are refused when registered, not when a user first runs one.
    with pytest.raises(ValueError, match="python folder 'cifar-100-python' is cifar100's"):
        datasets.register(Dataset("c100_again", "C", DatasetInfo("c100_again", ("a", "b"), (0.5,) * 3, (0.2,) * 3),
                                  datasets.CIFAR100_PYTHON, reads_folders=False))
    with pytest.raises(ValueError, match="its info is named 'tiny5'"):
        datasets.register(Dataset("other", "Other", TINY5.info, None, reads_folders=True))
    assert "c100_again" not in CATALOG and "other" not in CATALOG


def test_a_registered_data_set_is_a_choice_and_unregistered_is_gone(tiny5):
    from cli.flags import catalog_choices

    assert catalog_choices("datasets")[-1] == "tiny5"
    assert datasets.dataset("tiny5") is tiny5 and not tiny5.downloadable
    assert datasets.python_archives()[-1] is TINY5_PYTHON
    datasets.unregister("tiny5")
    assert "tiny5" not in catalog_choices("datasets")
    datasets.register(tiny5)  # the fixture removes it again


def test_a_missing_archive_without_a_downloader_is_one_line_and_nothing_is_downloaded(cli, tiny5, tmp_path, monkeypatch):
    from datamodules import sources
    from datamodules.layout import check_data_dir

    fetched = []
    monkeypatch.setattr(sources.tv_utils, "download_and_extract_archive", lambda *a, **k: fetched.append(a))
    expected = "a folder holding tiny5-py (torchvision's python format: data_batch_1, test_batch and batches.meta)"
    # train.py: --data-dir missing, and a folder holding only CIFAR-10's archive (downloaded beside, for CIFAR-100).
    beside = tmp_path / "beside"
    (beside / "cifar-10-batches-py").mkdir(parents=True)
    for data_dir in (tmp_path / "nowhere", beside):
        result = cli("train", "--dataset", "tiny5", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs"),
                     *TINY)
        assert_one_line_error(result, f"no Tiny5 data at {data_dir}", expected)
        assert "enable downloading" not in result.err
    # The readers, given download=True, refuse the same way before fetching anything.
    with pytest.raises(UserError, match="no Tiny5 data at .*tiny5-py"):
        check_data_dir(tmp_path / "nowhere", download=True, dataset="tiny5")
    with pytest.raises(UserError, match="no Tiny5 data at .*tiny5-py"):
        sources.read_split(tmp_path / "nowhere", "train", download=True, dataset="tiny5")
    assert fetched == [] and not (tmp_path / "nowhere").exists() and not (tmp_path / "runs").exists()
    # A damaged copy says to copy it again, not to download it.
    root = make_tiny5_python(tmp_path / "data", 10, 5)
    (root / "tiny5-py" / "test_batch").unlink()
    with pytest.raises(UserError, match=r"missing Tiny5 batch file .*test_batch: copy a complete tiny5-py folder there$"):
        check_data_dir(root, download=True, dataset="tiny5")


def test_a_registered_archive_is_found_read_and_told_apart(tiny5, tmp_path):
    from datamodules import sources
    from datamodules.layout import describe_source, detect

    root = make_tiny5_python(tmp_path / "data", 10, 5)
    train = sources.read_split(root, "train", dataset="tiny5")
    assert train.classes == TINY5_CLASSES and train.images.shape == (10, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 2, 3, 4] * 2
    assert detect(root / "tiny5-py", "tiny5").path.name == "tiny5-py"
    assert describe_source(root) == f"Tiny5 python archive {(root / 'tiny5-py').resolve()}"
    with pytest.raises(UserError, match="Tiny5's python archive, which --dataset cifar10 does not read: pass --dataset tiny5"):
        detect(root / "tiny5-py", "cifar10")
    assert detect(root, "cifar10") is None  # only another data set's archive there: CIFAR-10 is downloaded beside it
    # Its meta file must list its classes in their order, since the labels index them.
    with (root / "tiny5-py" / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [name.encode() for name in reversed(TINY5_CLASSES)]}, f, protocol=2)
    with pytest.raises(UserError, match="corrupted Tiny5 batch file .*not Tiny5's 5 classes in their order"):
        sources.read_split(root, "test", dataset="tiny5")


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_registered_data_set_trains_tests_and_predicts(cli, tiny5, tmp_path):
    root = make_tiny5_python(tmp_path / "data", 60, 20)
    runs = tmp_path / "runs"
    trained = cli("train", "--dataset", "tiny5", "--data-dir", str(root), "--output-dir", str(runs),
                  "--cache-dir", str(tmp_path / "cache"), *TINY)
    assert trained.code == 0, trained.err
    best = runs / "vgg16" / "version_0" / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["dataset"]
    assert DatasetInfo.from_dict(saved) == tiny5.info

    results = tmp_path / "test.json"
    tested = cli("test", "--ckpt", str(best), "--accelerator", "cpu", "--workers", "0", "--json", str(results))
    assert tested.code == 0, tested.err
    assert all(name in tested.out for name in TINY5_CLASSES), tested.out
    report = json.loads(results.read_text())
    assert report["dataset"] == "tiny5" and list(report["per_class_accuracy"]) == list(TINY5_CLASSES)

    picture = tmp_path / "picture.png"
    Image.fromarray(tiny5_images(3, 2)[0][2]).save(picture)
    predicted = cli("predict", "--ckpt", str(best), "--accelerator", "cpu", "--json", str(picture))
    assert predicted.code == 0, predicted.err
    assert json.loads(predicted.out)["class"] in TINY5_CLASSES
    shutil.rmtree(runs, ignore_errors=True)  # checkpoints are large; pytest would keep them
