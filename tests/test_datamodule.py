"""Reading CIFAR-10 from every supported layout, the decode cache, and the DataModule's loaders."""

from __future__ import annotations

import math
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import fake_images, make_image_folder, make_python_archive, make_tar_gz
from PIL import Image
from torchvision.datasets import utils as tv_utils

from base.errors import UserError
from datamodules import (
    CLASSES,
    MEAN,
    STD,
    CIFAR10DataModule,
    check_data_dir,
    describe_source,
    load_split,
)
from datamodules import sources
from datamodules.augment import Augmentation, TrainBatchBuilder
from datamodules.cifar10 import TEST_ORDER_SEED, eval_transform, holdout_split

N_TRAIN, N_TEST = 4, 3  # images per class


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never touch the network, and never write into the developer's real cache.
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "tree", N_TRAIN, N_TEST)


def expected(split: str, per_class: int) -> Arrays:
    """What load_split must return for a fake image folder: channels-first, ordered by class."""
    images, labels = fake_images(per_class * 10, seed=0 if split == "train" else 1)
    order = np.argsort(labels, kind="stable")
    return torch.from_numpy(images[order]).permute(0, 3, 1, 2), torch.from_numpy(labels[order])


Arrays = tuple[torch.Tensor, torch.Tensor]


def assert_same(actual: Arrays, wanted: Arrays) -> None:
    assert torch.equal(actual[0], wanted[0])
    assert torch.equal(actual[1], wanted[1])


# --- formats -------------------------------------------------------------------------------


def test_image_folder_yields_the_written_images_and_labels(tree: Path, cache: Path) -> None:
    for split, per_class in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = load_split(tree, split, cache_dir=cache)
        assert images.dtype == torch.uint8 and images.shape == (per_class * 10, 3, 32, 32)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64
        assert labels.bincount().tolist() == [per_class] * 10
        assert_same((images, labels), expected(split, per_class))


def test_all_formats_yield_the_same_arrays(tmp_path: Path, tree: Path, cache: Path) -> None:
    archive = make_tar_gz(tree)
    python_root = make_python_archive(tmp_path / "py", N_TRAIN * 10, N_TEST * 10)
    for split in ("train", "test"):
        from_folder = load_split(tree, split, cache_dir=cache)
        assert_same(load_split(archive, split, cache_dir=cache), from_folder)
        # The python archive keeps the official interleaved order; the folders sort by class.
        images, labels = load_split(python_root, split, cache_dir=cache)
        assert labels.tolist() == [i % 10 for i in range(len(labels))]
        order = torch.argsort(labels, stable=True)
        assert_same((images[order], labels[order]), from_folder)


def test_nested_layouts_are_detected(tmp_path: Path, tree: Path, cache: Path) -> None:
    wanted = load_split(tree, "test", cache_dir=cache)

    outer = tmp_path / "extracted"
    shutil.copytree(tree, outer / "cifar10")
    assert_same(load_split(outer, "test", cache_dir=cache), wanted)
    assert describe_source(outer) == f"image-folder tree {(outer / 'cifar10').resolve()}"

    with_top = make_tar_gz(tree, tmp_path / "top.tgz", top_folder="cifar10")
    assert_same(load_split(with_top, "test", cache_dir=cache), wanted)

    holder = tmp_path / "holder"
    holder.mkdir()
    moved = make_tar_gz(tree, holder / "cifar10.tar.gz")
    assert_same(load_split(holder, "test", cache_dir=cache), wanted)
    assert describe_source(holder) == f"image-folder archive {moved.resolve()}"

    python_root = make_python_archive(tmp_path / "py", 10, N_TEST * 10)
    batches = python_root / "cifar-10-batches-py"
    assert describe_source(python_root) == f"CIFAR-10 python archive {batches.resolve()}"
    assert torch.equal(load_split(batches, "test")[1], load_split(python_root, "test")[1])


def test_describe_source_names_missing_data(tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in describe_source(tmp_path / "nope")


# --- user errors ---------------------------------------------------------------------------


def test_missing_data_without_download(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (tmp_path / "nope", empty):
        with pytest.raises(UserError, match=f"no CIFAR-10 data at {missing}"):
            load_split(missing, "train")
        with pytest.raises(UserError, match=str(missing)):
            check_data_dir(missing, download=False)
        check_data_dir(missing, download=True)


def test_unrecognised_contents(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=f"no CIFAR-10 data found in {tmp_path}"):
        check_data_dir(tmp_path, download=True)
    with pytest.raises(UserError, match="notes.txt is not a CIFAR-10 source"):
        load_split(tmp_path / "notes.txt", "train")


def test_missing_class_folder(tree: Path, cache: Path) -> None:
    shutil.rmtree(tree / "train" / "cat")
    with pytest.raises(UserError, match=f"missing class folder\\(s\\) cat in {tree / 'train'}"):
        load_split(tree, "train", cache_dir=cache)


def test_misnamed_class_folder(tree: Path, cache: Path) -> None:
    (tree / "test" / "cat").rename(tree / "test" / "kitten")
    with pytest.raises(UserError, match="unexpected folder\\(s\\) kitten"):
        load_split(tree, "test", cache_dir=cache)


def test_root_one_level_too_deep(tree: Path) -> None:
    with pytest.raises(UserError, match=f"one level too deep.*{tree.resolve()}"):
        load_split(tree / "train", "train")


def test_image_of_the_wrong_size(tree: Path, cache: Path) -> None:
    bad = tree / "train" / "dog" / "big.png"
    Image.new("RGB", (64, 48)).save(bad)
    with pytest.raises(UserError, match=f"image {bad} is 64x48"):
        load_split(tree, "train", cache_dir=cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_image_is_named(tree: Path, cache: Path, damage: str) -> None:
    bad = tree / "train" / "dog" / "0001.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cannot decode image {bad}"):
        load_split(tree, "train", cache_dir=cache)


def test_corrupted_image_inside_an_archive_is_named(tree: Path, cache: Path) -> None:
    (tree / "test" / "frog" / "0002.png").write_bytes(b"junk")
    archive = make_tar_gz(tree)
    with pytest.raises(UserError, match=f"cannot decode image {archive}:test/frog/0002.png"):
        load_split(archive, "test", cache_dir=cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_archive(tree: Path, cache: Path, damage: str) -> None:
    archive = make_tar_gz(tree)
    data = archive.read_bytes()
    archive.write_bytes(b"\x00" * 1000 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cannot read archive {archive}"):
        load_split(archive, "train", cache_dir=cache)
    if damage == "garbage":
        with pytest.raises(UserError, match=f"cannot read archive {archive}"):
            check_data_dir(archive, download=False)


def test_official_tarball_asks_to_be_extracted(tmp_path: Path, cache: Path) -> None:
    python_root = make_python_archive(tmp_path / "py", 10, 10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(python_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(UserError, match="official python archive.*extract it"):
        load_split(archive, "test", cache_dir=cache)


def test_python_archive_errors(tmp_path: Path) -> None:
    batches = make_python_archive(tmp_path, 50, 10) / "cifar-10-batches-py"
    (batches / "data_batch_3").unlink()
    with pytest.raises(UserError, match=f"missing CIFAR-10 batch file {batches / 'data_batch_3'}"):
        check_data_dir(tmp_path, download=True)
    with pytest.raises(UserError, match=f"missing CIFAR-10 batch file {batches / 'data_batch_3'}"):
        load_split(tmp_path, "train")
    (batches / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"corrupted CIFAR-10 batch file {batches / 'test_batch'}"):
        load_split(tmp_path, "test")


class _Payload:
    """A pickle that would create a folder when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.mkdir, (str(self.marker),))


def test_python_archive_refuses_foreign_pickles(tmp_path: Path) -> None:
    batches = make_python_archive(tmp_path / "py", 10, 10) / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    with pytest.raises(UserError, match="corrupted CIFAR-10 batch file"):
        load_split(batches, "test")
    assert not marker.exists()


# --- download ------------------------------------------------------------------------------


def test_download_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    # First through torchvision's real download code, stopped at urlopen by the autouse fixture.
    message = f"no CIFAR-10 at {data_dir}, and downloading it there failed \\(no network\\?\\)"
    with pytest.raises(UserError, match=message):
        load_split(data_dir, "train", download=True)
    assert not data_dir.exists()  # the failed attempt leaves nothing behind

    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fail)
    with pytest.raises(UserError, match="pass --data-dir pointing at a local copy"):
        load_split(data_dir, "test", download=True)
    assert list(data_dir.glob("*.tar.gz")) == []


def test_download_fills_an_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(url: str, root: str, **kwargs: object) -> None:
        make_python_archive(Path(root), 20, 10)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    images, labels = load_split(tmp_path / "data", "test", download=True)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))


# --- decode cache --------------------------------------------------------------------------


def test_cache_is_used_the_second_time(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_split(tree, "train", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(sources, "_decode_image", no_decoding)
    assert_same(load_split(tree, "train", cache_dir=cache), first)


def test_corrupted_cache_is_rebuilt(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_split(tree, "test", cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    calls = []
    decode = sources._decode_image
    monkeypatch.setattr(sources, "_decode_image", lambda *a: calls.append(1) or decode(*a))
    assert_same(load_split(tree, "test", cache_dir=cache), first)
    assert len(calls) == len(first[1])
    with np.load(cache_file) as npz:
        assert npz["x"].shape == (len(first[1]), 32, 32, 3)


def test_cache_follows_changed_files(tree: Path, cache: Path) -> None:
    load_split(tree, "test", cache_dir=cache)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tree / "test" / "airplane" / "0000.png")
    images, _ = load_split(tree, "test", cache_dir=cache)
    assert images[0, :, 0, 0].tolist() == [1, 2, 3]


def test_failed_cache_write_leaves_nothing_behind(
    tree: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed_mid_write(file: object, **arrays: object) -> None:
        file.write(b"PK partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        load_split(tree, "test", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_default_cache_dir_honours_xdg(tree: Path, tmp_path: Path) -> None:
    load_split(tree, "test")
    assert len(list((tmp_path / "xdg" / "cifar10-lightning").glob("*.npz"))) == 1


# --- DataModule ----------------------------------------------------------------------------


def datamodule(tree: Path, cache: Path, **kwargs: object) -> CIFAR10DataModule:
    options = dict(batch_size=8, eval_batch_size=7, val_size=10, cache_dir=cache, download=False)
    options.update(kwargs)
    return CIFAR10DataModule(data_dir=tree, **options)  # type: ignore[arg-type]


def test_holdout_split_is_seeded_and_disjoint() -> None:
    train, val = holdout_split(100, 10, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    torch.manual_seed(123)  # the split must not depend on the global RNG
    again_train, again_val = holdout_split(100, 10, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, holdout_split(100, 10, seed=1)[1])


def test_validation_split_in_the_datamodule(tree: Path, cache: Path) -> None:
    def split(seed: int, **kwargs: object) -> CIFAR10DataModule:
        dm = datamodule(tree, cache, seed=seed, **kwargs)
        dm.setup("fit")
        return dm

    dm = split(0)
    assert len(dm.val_set) == 10 and len(dm.train_set) == N_TRAIN * 10 - 10
    assert dm.test_set is None  # fitting never loads the test split
    val_rows = {bytes(image.numpy()) for image in dm.val_set.images}
    assert val_rows.isdisjoint(bytes(image.numpy()) for image in dm.train_set.images)
    assert torch.equal(split(0).val_set.images, dm.val_set.images)
    assert not torch.equal(split(1).val_set.images, dm.val_set.images)

    limited = split(0, train_limit=5)
    assert torch.equal(limited.train_set.images, dm.train_set.images[:5])
    assert torch.equal(limited.val_set.images, dm.val_set.images)

    no_val = split(0, val_size=0)
    assert len(no_val.train_set) == N_TRAIN * 10 and no_val.val_dataloader() == []


def test_val_size_must_leave_training_images(tree: Path, cache: Path) -> None:
    dm = datamodule(tree, cache, val_size=N_TRAIN * 10)
    with pytest.raises(UserError, match="val_size 40 leaves no training images"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"eval_batch_size": 0},
        {"val_size": -1},
        {"workers": -1},
        {"train_limit": 0},
    ],
)
def test_invalid_arguments(tree: Path, cache: Path, bad: dict) -> None:
    (name,) = bad
    with pytest.raises(UserError, match=name):
        datamodule(tree, cache, **bad)


def test_prepare_data_checks_the_folder(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match="no CIFAR-10 data at"):
        datamodule(tmp_path / "nope", cache).prepare_data()


def test_test_loader_covers_every_image_once(tree: Path, cache: Path) -> None:
    dm = datamodule(tree, cache)
    dm.setup("test")
    loader = dm.test_dataloader()
    batches = list(loader)
    assert N_TEST * 10 % 7 != 0 and len(batches) == math.ceil(N_TEST * 10 / 7)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    raw_images, raw_labels = expected("test", N_TEST)
    # In a fixed shuffled order, so that the first batches of a limited test hold every class.
    order = torch.randperm(len(raw_labels), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
    assert torch.equal(labels, raw_labels[order])
    assert len(set(labels[:7].tolist())) >= 4 and not torch.equal(labels, raw_labels)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    normalised = (raw_images[order].float() / 255 - mean) / std
    torch.testing.assert_close(images, normalised)


def test_train_loader_batches(tree: Path, cache: Path) -> None:
    dm = datamodule(tree, cache)
    dm.setup("fit")
    assert dm.classes == CLASSES and dm.num_classes == 10
    loader = dm.train_dataloader()
    n_train = N_TRAIN * 10 - 10
    assert len(loader) == math.ceil(n_train / 8)  # the last, partial batch is kept
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(y) for _, y in loader) == n_train


def test_train_augmentation_stays_normalised() -> None:
    image = torch.from_numpy(fake_images(1)[0][0]).permute(2, 0, 1).contiguous()
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    low, high = (0 - mean) / std, (1 - mean) / std
    make = TrainBatchBuilder(image.expand(8, 3, 32, 32).contiguous(), torch.zeros(8, dtype=torch.long),
                             augmentation=Augmentation(padding="reflect", cutout=8), seed=0, mean=MEAN, std=STD)
    outputs = make.batch(make.plan(0), 0, 8)[0]
    for out in outputs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    assert any(not torch.equal(out, eval_transform()(image)) for out in outputs)


def test_eval_transform_is_deterministic() -> None:
    image = torch.from_numpy(fake_images(1)[0][0]).permute(2, 0, 1).contiguous()
    transform = eval_transform()
    assert torch.equal(transform(image), transform(image))


# --- the real copy -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_archive_test_split(cache: Path, real_archive: Path) -> None:
    """The real archive (--cifar10-data PATH, $CIFAR10_DATA or beside the checkout; conftest.real_archive)."""
    images, labels = load_split(real_archive, "test", cache_dir=cache)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [1000] * 10
