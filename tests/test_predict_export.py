"""predict.py on everyday image files, and export.py's formats giving the checkpoint's own logits."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from robustness import assert_one_line_error, record_files

from run import exporting
from run.checkpoints import build_backbone, load_checkpoint
from base.errors import UserError
from run.checkpoints import read_safetensors
from run.inference import load_image, load_images, predict_probabilities, to_model_input
from datamodules import CLASSES
from fakedata import fake_images

# One optimiser step and one validation batch: enough for a real Lightning checkpoint with
# non-default BatchNorm statistics, in a few seconds on 2 cores.
TINY_RUN = ["--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1", "--limit-test-batches", "1",
            "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "20",
            "--eval-batch-size", "20", "--log-every-n-steps", "1"]
ATOL = 1e-4

# The tests load TorchScript files on purpose; PyTorch 2.10+ warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """best.ckpt of a tiny vgg16 run and of a tiny resnet50 run, written by train.py."""
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    found = {}
    for model in ("vgg16", "resnet50"):
        with pytest.raises(SystemExit) as exit_info:
            sys.exit(load_script("train").main(["--model", model, "--data-dir", str(tiny_data), "--output-dir", str(output),
                                                *TINY_RUN]))
        assert exit_info.value.code == 0
        found[model] = output / model / "version_0" / "checkpoints" / "best.ckpt"
    yield found
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Pictures as users have them: odd sizes, alpha, grayscale, palette, a subfolder, hidden junk."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA").save(root / "rgba_50x40.png")
    Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8), "L").save(root / "gray_200x300.jpg")
    Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(root / "tiny_9x7.bmp")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("P").save(root / "palette.webp")
    (root / "more").mkdir()
    Image.fromarray(fake_images(1)[0][0]).save(root / "more" / "cifar_like.png")
    (root / "notes.txt").write_text("not an image, and not named like one: ignored in a folder\n")
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "._rgba_50x40.png").write_bytes(b"macOS resource fork, not a picture")
    return root


PHOTO_NAMES = ["gray_200x300.jpg", "more/cifar_like.png", "palette.webp", "rgba_50x40.png", "tiny_9x7.bmp"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# --- preprocessing ---------------------------------------------------------------------------

def test_any_picture_becomes_a_centre_cropped_32x32_rgb_image(tmp_path):
    """Odd sizes and transparency: centre crop, white background."""
    # Wide picture: a red centre square between blue side bands that the crop must drop.
    wide = np.zeros((48, 96, 3), dtype=np.uint8)
    wide[:, :, 2] = 255
    wide[:, 24:72] = (255, 0, 0)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png")
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert (image[0] == 255).all() and (image[2] == 0).all()

    # Fully transparent pixels show the white background, not the black stored under them.
    Image.new("RGBA", (20, 30), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    """Phone photos are classified upright."""
    # Stored 64 wide x 32 high, red on top and blue below; orientation 6 displays it rotated 90
    # degrees clockwise, so upright it is red on the right, blue on the left.
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:16] = (255, 0, 0)
    stored[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg").int()
    left, right = image[:, 16, 2], image[:, 16, 29]
    assert left[2] > 200 and left[0] < 60, left
    assert right[0] > 200 and right[2] < 60, right


# --- predict.py ------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_json_lines_for_a_folder(cli, checkpoints, photos):
    """JSON Lines for a folder: one object per image, top-k sorted."""
    result = cli("predict", "--ckpt", str(checkpoints["vgg16"]), str(photos), "--json", "--top-k", "3")
    assert result.code == 0, result.err
    records = json_lines(result.out)
    assert [Path(r["file"]).relative_to(photos).as_posix() for r in records] == PHOTO_NAMES
    for record in records:
        assert set(record) == {"file", "class", "probability", "top_k"}
        top = record["top_k"]
        assert len(top) == 3 and all(t["class"] in CLASSES for t in top)
        assert top[0] == {"class": record["class"], "probability": record["probability"]}
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert 0.0 < sum(t["probability"] for t in top) <= 1.0 + 1e-5


@pytest.mark.slow
def test_predictions_are_the_checkpoints_probabilities(cli, checkpoints, photos):
    """predict.py reports the network's own probabilities, whatever the batch size."""
    files = [photos / name for name in PHOTO_NAMES]
    result = cli("predict", "--ckpt", str(checkpoints["resnet50"]), *map(str, files), "--json", "--top-k", "10",
                 "--batch-size", "2")
    assert result.code == 0, result.err
    model = build_backbone(load_checkpoint(checkpoints["resnet50"]))
    images, kept = load_images(files)
    expected = predict_probabilities(model, images)
    assert kept == files
    for record, probabilities in zip(json_lines(result.out), expected):
        got = torch.zeros(10)
        for entry in record["top_k"]:
            got[CLASSES.index(entry["class"])] = entry["probability"]
        torch.testing.assert_close(got, probabilities, atol=1e-5, rtol=0)


def test_predict_table(cli, checkpoints, photos, monkeypatch):
    """The table names each file, its class and the top-k."""
    monkeypatch.setenv("COLUMNS", "250")  # rich would fold the long temporary paths otherwise
    result = cli("predict", "--ckpt", str(checkpoints["vgg16"]), str(photos / "rgba_50x40.png"),
                 str(photos / "more"), "--top-k", "2")
    assert result.code == 0, result.err
    assert "vgg16 (10 classes)" in result.out and "top 2" in result.out
    assert "rgba_50x40.png" in result.out and "cifar_like.png" in result.out and "gray_200x300" not in result.out
    assert result.out.count(" %") == 2 * 3  # probability plus 2 top-k entries for each of 2 images


def test_unreadable_images_are_skipped_with_a_warning_and_exit_1(cli, checkpoints, photos, tmp_path):
    """Unreadable images among readable ones (skipped, exit 1), or alone (exit 2)."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(photos / "gray_200x300.jpg").read_bytes()[:50])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = cli("predict", "--ckpt", str(checkpoints["vgg16"]), str(broken), str(photos / "tiny_9x7.bmp"),
                 str(text), "--json")
    assert result.code == 1
    assert [Path(r["file"]).name for r in json_lines(result.out)] == ["tiny_9x7.bmp"]
    warnings = result.err.strip().splitlines()
    assert len(warnings) == 2 and all("warning: cannot read image" in line for line in warnings)
    assert str(broken) in warnings[0] and str(text) in warnings[1]

    result = cli("predict", "--ckpt", str(checkpoints["vgg16"]), str(broken))
    assert result.code == 2 and "none of the 1 image(s) could be read" in result.err.strip().splitlines()[-1]


def test_predict_refuses_bad_input(cli, checkpoints, photos, tmp_path):
    """predict.py given missing paths, empty folders, bad --top-k or a bad checkpoint."""
    ckpt = str(checkpoints["vgg16"])
    image = str(photos / "tiny_9x7.bmp")
    assert_one_line_error(cli("predict", "--ckpt", ckpt, image, str(tmp_path / "missing.png")),
                          "no such file or folder", "missing.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    assert_one_line_error(cli("predict", "--ckpt", ckpt, str(tmp_path / "empty")), "no images in folder")
    assert_one_line_error(cli("predict", "--ckpt", ckpt, image, "--top-k", "11"), "--top-k 11", "has 10 classes")
    assert_one_line_error(cli("predict", "--ckpt", ckpt, image, "--top-k", "0"), "--top-k: must be a positive integer")
    assert_one_line_error(cli("predict", "--ckpt", str(tmp_path / "nope.ckpt"), image), "checkpoint not found")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoints["vgg16"].read_bytes()[: 1 << 20])
    assert_one_line_error(cli("predict", "--ckpt", str(truncated), image), "not a readable PyTorch checkpoint")


# --- export.py -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Five normalised CIFAR-like images, the input every exported model is checked on."""
    images, _ = fake_images(5, seed=3)
    return to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


@pytest.fixture(scope="module")
def reference_logits(checkpoints, batch) -> dict[str, torch.Tensor]:
    """What each checkpoint's own network answers on ``batch``."""
    with torch.inference_mode():
        return {name: build_backbone(load_checkpoint(path)).eval()(batch) for name, path in checkpoints.items()}


def exported_logits(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        assert session.get_modelmeta().custom_metadata_map["class_names"] == json.dumps(list(CLASSES))
        # The batch axis is dynamic: one image at a time gives the same logits as all at once.
        single = np.concatenate([session.run(None, {"images": image[None].numpy()})[0] for image in images])
        together = session.run(None, {"images": images.numpy()})[0]
        np.testing.assert_allclose(single, together, atol=ATOL)
        return torch.from_numpy(together)
    if fmt == "torchscript":
        extra = {"metadata.json": ""}
        scripted = torch.jit.load(str(path), _extra_files=extra)
        assert not scripted.training
        assert json.loads(extra["metadata.json"])["num_classes"] == "10"
        with torch.inference_mode():
            return scripted(images)
    model = build_backbone(read_safetensors(path)).eval()
    with torch.inference_mode():
        return model(images)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
@pytest.mark.parametrize("model", ["vgg16", "resnet50"])
def test_exported_model_gives_the_checkpoints_logits(cli, checkpoints, batch, reference_logits, tmp_path, model, fmt):
    """Each format and network answers with the checkpoint's logits."""
    output = tmp_path / f"{model}.{fmt}"
    result = cli("export", "--ckpt", str(checkpoints[model]), "--format", fmt, "--output", str(output))
    assert result.code == 0, result.err
    assert f"exported to {output}" in result.out
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # no temporary file left behind
    torch.testing.assert_close(exported_logits(fmt, output, batch), reference_logits[model], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_safetensors_export_keeps_everything_needed_to_rebuild(cli, checkpoints, photos, tmp_path):
    """A safetensors export rebuilds the network and feeds predict.py."""
    output = tmp_path / "resnet.safetensors"
    assert cli("export", "--ckpt", str(checkpoints["resnet50"]), "--format", "safetensors",
               "--output", str(output)).code == 0
    contents = read_safetensors(output)
    assert (contents.model_name, contents.num_classes, contents.model_options) == ("resnet50", 10, {})
    assert contents.hparams["class_names"] == list(CLASSES)
    # predict.py takes the exported file as it takes the checkpoint, with the same answers.
    image = str(photos / "rgba_50x40.png")
    from_export = cli("predict", "--ckpt", str(output), image, "--json")
    from_checkpoint = cli("predict", "--ckpt", str(checkpoints["resnet50"]), image, "--json")
    assert from_export.code == 0 and from_export.out == from_checkpoint.out


@pytest.mark.slow
def test_export_writes_beside_the_checkpoint_and_never_overwrites_silently(cli, checkpoints, tmp_path):
    """Default output path; existing files and the checkpoint itself are never overwritten silently."""
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(checkpoints["vgg16"].read_bytes())
    default = tmp_path / "best.torchscript.pt"
    assert cli("export", "--ckpt", str(ckpt), "--format", "torchscript").code == 0
    assert default.is_file()
    default.write_bytes(b"someone's file")
    assert_one_line_error(cli("export", "--ckpt", str(ckpt), "--format", "torchscript"), "already exists", "--force")
    kept = default.read_bytes() == b"someone's file"
    record_files("an existing file export.py was pointed at without --force", 1, int(not kept))
    assert kept
    assert cli("export", "--ckpt", str(ckpt), "--format", "torchscript", "--force").code == 0
    assert not torch.jit.load(str(default)).training
    assert_one_line_error(cli("export", "--ckpt", str(ckpt), "--format", "safetensors", "--output", str(ckpt),
                              "--force"), "is the checkpoint being exported")
    kept = ckpt.read_bytes() == checkpoints["vgg16"].read_bytes()
    record_files("the checkpoint given as its own --output, with --force", 1, int(not kept))
    assert kept


def test_export_refuses_bad_input(cli, tmp_path):
    """export.py given a missing or damaged checkpoint, or an unknown format."""
    assert_one_line_error(cli("export", "--ckpt", str(tmp_path / "nope.ckpt"), "--format", "onnx"),
                          "checkpoint not found")
    assert_one_line_error(cli("export", "--ckpt", "x.ckpt", "--format", "tflite"), "invalid choice: 'tflite'")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_one_line_error(cli("export", "--ckpt", str(junk), "--format", "onnx"), "not a readable safetensors file")


def test_a_failed_export_leaves_neither_a_half_file_nor_a_temporary_one(cli, checkpoints, tmp_path, monkeypatch):
    """An export that fails half-way through writing."""
    def crash_half_way(model, file, metadata):
        file.write(b"half of a model")
        raise UserError("no space left on device")

    monkeypatch.setitem(exporting.EXPORTERS, "safetensors", crash_half_way)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous export")
    assert_one_line_error(cli("export", "--ckpt", str(checkpoints["vgg16"]), "--format", "safetensors",
                              "--output", str(target), "--force"), "no space left on device")
    intact = [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and target.read_bytes() == b"previous export"
    record_files("the existing export, after a failed --force export over it", 1, int(not intact))
    assert intact
