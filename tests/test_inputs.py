"""Inputs people really bring: odd batch sizes, preemption mid-epoch, odd file names and image modes."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import CPU, QUICK_VGG
from fakedata import make_image_folder
from PIL import Image
from robustness import assert_one_line_error, record_runs

from datamodules import CLASSES, load_split
from datamodules.sources import to_rgb
from models import build_model
from run.inference import load_image


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data_path", "augment"),
    [("device", []), ("loader", []), ("device", ["--cutout", "8", "--translate-padding", "reflect"]),
     # Worker processes build the batches: they are the same ones, so the resume is exact too.
     ("loader", ["--cutout", "8", "--translate-padding", "reflect", "--workers", "2"])],
    ids=["device", "loader", "device-cutout", "loader-workers-cutout"],
)
def test_stop_anywhere_then_resume_equals_the_uninterrupted_run(cli, tiny_data, tmp_path, data_path, augment, sigterm_at):
    """100 images, batch 10, SIGTERM at step 3 of epoch 1, --resume last: the same weights as 2 epochs straight."""
    recipe = [*QUICK_VGG, "--data-dir", str(tiny_data), "--data-path", data_path, "--train-limit", "100",
              "--batch-size", "10", "--epochs", "2", *augment]
    data_path = f"{data_path}{' with ' + ' '.join(augment) if augment else ''}"
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", *recipe, "--output-dir", str(straight)).code == 0
    sigterm_at(step=3)
    stopped = cli("train", *recipe, "--output-dir", str(split))
    assert stopped.code == 143, stopped.err
    assert ckpt(split / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 3
    sigterm_at()
    resumed = cli("train", *recipe, "--output-dir", str(split), "--resume", "last")
    assert resumed.code == 0, resumed.err
    a = ckpt(straight / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    b = ckpt(split / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    same = a["global_step"] == b["global_step"] == 20 and all(
        torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    record_runs(f"SIGTERM at step 3 of 10, then --resume last ({data_path} path): equal to the uninterrupted run", 1, int(not same))
    assert same
    # The resumed epoch's line counts only what it trained, over the time it took.
    line = next(line for line in resumed.out.splitlines() if line.startswith("epoch 1/2"))
    rate, seconds = [part for part in line.split(" | ") if not part.startswith("run eta")][-2:]
    assert float(rate.split()[0].replace(",", "")) > 0 and float(seconds.split()[0]) < 120


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--train-limit", "21", "--batch-size", "10"],  # a last batch of one image
        ["--train-limit", "4", "--batch-size", "1"],  # every batch of one image
    ],
    ids=["last-batch-of-one", "batch-size-1"],
)
def test_batches_of_one_image_train(cli, tiny_data, tmp_path, flags):
    """A batch of one image (VGG16's BatchNorm1d cannot take batch statistics of one) trains, and checkpoints."""
    result = cli("train", *QUICK_VGG, *flags, "--data-dir", str(tiny_data), "--epochs", "1", "--data-path", "device",
                 "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    assert (tmp_path / "vgg16" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def _modes() -> dict[str, Image.Image]:
    """One 32x32 image of every mode Pillow opens, each holding a mid-grey (or colour) value."""
    rgb = Image.new("RGB", (32, 32), (200, 100, 50))
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    return {
        "1": Image.new("1", (32, 32), 1),
        "L": Image.new("L", (32, 32), 128),
        "LA": Image.new("LA", (32, 32), (128, 255)),
        "P": rgb.convert("P"),
        "RGB": rgb,
        "RGBA": Image.new("RGBA", (32, 32), (200, 100, 50, 255)),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": grey16,
        "I": Image.fromarray(np.full((32, 32), 32768, dtype=np.int32)),
        "F": Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)),
        "F-wide": Image.fromarray(np.linspace(-3, 5, 1024, dtype=np.float32).reshape(32, 32)),
    }


def test_every_image_mode_becomes_8_bit_rgb_by_its_real_range():
    """16-bit grey at half scale is mid-grey, not white; floats in [0, 1] scale; transparency goes on white."""
    images = _modes()
    as_array = {name: np.asarray(to_rgb(image)) for name, image in images.items()}
    assert all(array.dtype == np.uint8 and array.shape == (32, 32, 3) for array in as_array.values())
    for name in ("I;16", "I", "F"):
        assert abs(int(as_array[name][0, 0, 0]) - 128) <= 1, (name, as_array[name][0, 0])
    assert as_array["L"][0, 0].tolist() == [128] * 3 and as_array["1"][0, 0].tolist() == [255] * 3
    assert as_array["RGBA"][0, 0].tolist() == [200, 100, 50]
    assert as_array["F-wide"].min() == 0 and as_array["F-wide"].max() == 255
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_predict_and_training_data_read_every_mode_alike(tmp_path, mode):
    """A file of each mode: predict.py's loader and the training data's decoder agree, and 16-bit is not white."""
    image = _modes()[mode]
    suffix = ".tiff" if mode in ("CMYK", "I", "F") else ".png"
    path = tmp_path / f"picture{suffix}"
    image.save(path)
    predicted = load_image(path)  # 3,32,32 uint8, already 32x32: no resampling
    assert predicted.dtype == torch.uint8
    if mode in ("I;16", "I", "F"):
        assert abs(int(predicted[0, 0, 0]) - 128) <= 1
    tree = tmp_path / "tree"
    make_image_folder(tree, 1, 1)
    target = tree / "train" / CLASSES[0] / f"zz-{mode.replace(';', '')}{suffix}"
    image.save(target)
    images, labels = load_split(tree, "train", cache_dir=tmp_path / "cache", download=False)
    decoded = torch.from_numpy(np.array(to_rgb(Image.open(target)))).permute(2, 0, 1)
    assert any(torch.equal(decoded, img) for img in images)


def test_non_utf8_and_unusual_file_names_neither_crash_nor_print_wrongly(cli, tmp_path):
    """Names as unzip leaves Windows archives (bytes that are not UTF-8), with spaces, brackets, unicode."""
    tree = tmp_path / "tree"
    make_image_folder(tree, 2, 1)
    folder = os.fsencode(tree / "train" / CLASSES[1])
    Image.new("RGB", (32, 32), (1, 2, 3)).save(os.fsdecode(folder + b"/caf\xe9 [1] \xff.png"))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tree / "train" / CLASSES[2] / "ünï cödé (2).png")
    images, _ = load_split(tree, "train", cache_dir=tmp_path / "cache", download=False)
    assert len(images) == 22
    # A broken file with such a name: the one-line error shows the bytes escaped, not a crash.
    with open(os.fsdecode(folder + b"/bad \xe9.png"), "wb") as broken:
        broken.write(b"not an image")
    result = cli("train", *CPU, "--data-dir", str(tree), "--output-dir", str(tmp_path / "runs"), "--fast-dev-run", "1")
    assert_one_line_error(result, "bad \\xe9.png")
    predicted = cli("predict", "--ckpt", str(tmp_path / "none.ckpt"), os.fsdecode(folder + b"/caf\xe9 [1] \xff.png"))
    assert predicted.code == 2  # the checkpoint is missing; the name itself did not crash anything


@pytest.mark.slow
def test_a_limited_test_is_a_fair_sample_of_class_sorted_data(cli, tmp_path):
    """A model that answers "airplane" to everything: 10 % on the full test, and about that on 2 batches, not 100 %."""
    data = make_image_folder(tmp_path / "data", 1, 60)  # 600 test images, stored class by class
    model = build_model("vgg16")
    with torch.no_grad():
        last = model.classifier[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([10.0] + [0.0] * 9))
    ckpt_path = tmp_path / "airplane.pt"
    torch.save(model.state_dict(), ckpt_path)
    common = ["--ckpt", str(ckpt_path), "--data-dir", str(data), "--eval-batch-size", "100", *CPU]
    full = cli("test", *common, "--json", str(tmp_path / "full.json"))
    limited = cli("test", *common, "--limit-test-batches", "2", "--json", str(tmp_path / "limited.json"))
    assert full.code == 0 and limited.code == 0, full.err + limited.err
    full_result, limited_result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "limited"))
    assert full_result["accuracy"] == pytest.approx(0.1) and full_result["images"] == 600
    assert limited_result["images"] == 200 and "200 test images (of 600" in limited.out
    assert abs(limited_result["accuracy"] - full_result["accuracy"]) < 0.05


def test_a_data_tree_without_test_split_is_refused_before_training(cli, tmp_path):
    """train/ but no test/: found before any training, no run folder left behind."""
    tree = make_image_folder(tmp_path / "data", 4, 1)
    for path in sorted((tree / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tree / "test").rmdir()
    result = cli("train", *QUICK_VGG, "--data-dir", str(tree), "--output-dir", str(tmp_path / "runs"), "--epochs", "1")
    assert_one_line_error(result, "missing folder", "test")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["disk-full", "results-json-is-a-folder", "output-dir-read-only"])
def test_outputs_that_cannot_be_written_are_refused_before_training(cli, tiny_data, tmp_path, monkeypatch, case):
    """A disk too small for the run's checkpoints, --results-json naming a folder, an output folder without write permission."""
    output, extra = tmp_path / "runs", []
    if case == "disk-full":
        import shutil
        from collections import namedtuple

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50 * 2**20, 50 * 2**20))
        fragment = "GiB free"
    elif case == "results-json-is-a-folder":
        (tmp_path / "out").mkdir()
        extra, fragment = ["--results-json", str(tmp_path / "out")], "is a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        output.mkdir()
        output.chmod(0o500)
        fragment = "no permission to write"
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "1", *extra)
    assert_one_line_error(result, fragment)
    assert not (output / "vgg16").exists()


def test_ctrl_c_inside_a_protected_block_raises_interrupted_with_its_message():
    """Lightning would turn Ctrl-C during a test into a silent exit 1; inside ctrl_c_raises it says what was kept."""
    from base.errors import Interrupted, ctrl_c_raises

    # The handler it found is put back: Python's default, or SIG_IGN where the suite was started in
    # the background (a shell ignores SIGINT for background jobs).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="the run is saved"):
        with ctrl_c_raises("stopped by Ctrl-C during the final test; the run is saved"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("script", ["train", "test"])
def test_a_picture_given_as_checkpoint_is_named_for_what_it_is(cli, tiny_data, tmp_path, script):
    """A JPEG passed to --resume / --ckpt: not 'pickled code', not a traceback."""
    fake = tmp_path / "photo.ckpt"
    Image.new("RGB", (8, 8)).save(fake, format="JPEG")
    flag = ["--resume", str(fake)] if script == "train" else ["--ckpt", str(fake)]
    result = cli(script, *flag, "--data-dir", str(tiny_data), "--accelerator", "cpu")
    assert_one_line_error(result, "is not a PyTorch checkpoint file")
