"""Inputs people really bring: data trees with sub-folders and links, YAML 1.1
surprises, checkpoints measured with --tta flip, names with rich markup, mistyped flags, course
state dicts that PyTorch loads, and the supply chain of the install."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICK_VGG, ROOT
from fakedata import fake_images, make_image_folder
from PIL import Image
from robustness import assert_one_line_error, record_files

from base.errors import UserError
from datamodules import CLASSES, load_split
from models import build_model
from run.checkpoints import build_backbone, load_any_checkpoint, load_checkpoint, read_safetensors
from run.config import read_config
from run.paths import find_images

TINY_RUN = ["--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1", "--limit-test-batches", "1",
            "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "20",
            "--eval-batch-size", "20", "--log-every-n-steps", "1"]
ATOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _save_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def _count(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=len(CLASSES)).tolist()


# --- 2. every image is used or named; a cache never outlives its files ---------------------------


def test_images_in_sub_folders_and_behind_links_are_used(tmp_path):
    """Sub-folders of a class folder, a class folder that is a link, a sub-folder that is a link."""
    tree = make_image_folder(tmp_path / "tree", 2, 1)
    _save_png(tree / "train" / "cat" / "2024" / "a.png", (1, 2, 3))
    _save_png(tree / "train" / "cat" / "2024" / "deeper" / "b.png", (4, 5, 6))
    elsewhere = tmp_path / "elsewhere"
    shutil.move(tree / "train" / "dog", elsewhere / "dog")
    (tree / "train" / "dog").symlink_to(elsewhere / "dog", target_is_directory=True)
    _save_png(tmp_path / "more-birds" / "c.png", (7, 8, 9))
    (tree / "train" / "bird" / "more").symlink_to(tmp_path / "more-birds", target_is_directory=True)
    (tree / "train" / "bird" / "loop").symlink_to(tree / "train" / "bird", target_is_directory=True)
    images, labels = load_split(tree, "train", cache_dir=tmp_path / "cache")
    counts = _count(labels)
    assert counts[CLASSES.index("cat")] == 4 and counts[CLASSES.index("dog")] == 2
    assert counts[CLASSES.index("bird")] == 3 and sum(counts) == 23  # 20 + a, b, c; the loop adds nothing
    colours = {tuple(image[:, 0, 0].tolist()) for image in images}
    assert {(1, 2, 3), (4, 5, 6), (7, 8, 9)} <= colours


def test_files_left_out_are_named_in_one_line(tmp_path, caplog):
    """A README beside the class folders and notes in one: one warning naming them, cached or not."""
    tree = make_image_folder(tmp_path / "tree", 1, 1)
    (tree / "train" / "README.txt").write_text("about this data\n")
    (tree / "train" / "cat" / "notes.txt").write_text("cats\n")
    _save_png(tree / "train" / "stray.png", (9, 9, 9))
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datamodules.sources"):
            _, labels = load_split(tree, "train", cache_dir=tmp_path / "cache")
        assert len(labels) == 10, attempt
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1, (attempt, warnings)
        assert "3 file(s)" in warnings[0] and "README.txt" in warnings[0] and "cat/notes.txt" in warnings[0]
        assert "stray.png" in warnings[0]


def _tar_with_hard_links(tree: Path, archive: Path, top: str | None = "cifar10") -> None:
    """``tar czf`` of ``tree`` as GNU tar writes it: a file's second name is a hard-link member."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=top or ".", recursive=True)


def test_an_archive_gives_the_images_of_the_same_tree_hard_links_and_links_included(tmp_path):
    """Hard-linked members (within a class, across splits), links to files and folders inside the archive."""
    tree = make_image_folder(tmp_path / "tree", 2, 1)
    train, test = tree / "train", tree / "test"
    os.link(train / "cat" / "0000.png", train / "cat" / "0000-again.png")  # a hard link in the same class
    os.link(test / "ship" / "0000.png", train / "ship" / "from-test.png")  # the target is in the other split
    (train / "frog" / "also.png").symlink_to("0001.png")  # a relative link to a file
    _save_png(tree / "extra" / "horses" / "h.png", (10, 20, 30))
    (train / "horse" / "more").symlink_to("../../extra/horses", target_is_directory=True)  # a link to a folder
    (train / "deer" / "later.png").symlink_to("../truck/0001.png")  # its target comes later in the archive
    from_tree = load_split(tree, "train", cache_dir=tmp_path / "cache-tree")
    for top in ("cifar10", None):
        archive = tmp_path / f"packed-{top}.tar.gz"
        _tar_with_hard_links(tree, archive, top)
        with tarfile.open(archive) as tar:
            assert sum(member.islnk() for member in tar.getmembers()) >= 2  # hard links really are members
            assert sum(member.issym() for member in tar.getmembers()) == 3
        from_archive = load_split(archive, "train", cache_dir=tmp_path / f"cache-{top}")
        assert len(from_archive[1]) == len(from_tree[1]) == 25
        assert torch.equal(from_archive[0], from_tree[0]) and torch.equal(from_archive[1], from_tree[1])


def test_an_archive_link_out_of_the_archive_is_named(tmp_path):
    """A link whose target is not in the archive is refused naming it, not dropped."""
    tree = make_image_folder(tmp_path / "tree", 1, 1)
    (tree / "train" / "cat" / "outside.png").symlink_to(tmp_path / "nowhere.png")
    archive = tmp_path / "packed.tar.gz"
    _tar_with_hard_links(tree, archive)
    with pytest.raises(UserError, match=r"outside\.png is a symbolic link to .*nowhere\.png, outside the archive"):
        load_split(archive, "train", cache_dir=tmp_path / "cache")
    (tree / "train" / "cat" / "outside.png").unlink()
    (tree / "train" / "cat" / "gone.png").symlink_to("missing.png")
    _tar_with_hard_links(tree, archive)
    with pytest.raises(UserError, match=r"gone\.png is a link to .*missing\.png, which the archive does not hold"):
        load_split(archive, "train", cache_dir=tmp_path / "cache")


def test_a_cache_never_outlives_the_files_it_came_from(tmp_path):
    """An image fixed in place in a class folder that is a link, keeping its size and time: read again."""
    tree = make_image_folder(tmp_path / "tree", 1, 1)
    real = tmp_path / "real-cats"
    shutil.move(tree / "train" / "cat", real)
    (tree / "train" / "cat").symlink_to(real, target_is_directory=True)
    image = real / "fix-me.bmp"  # a BMP of 32x32 RGB has one size whatever its pixels
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    cache = tmp_path / "cache"

    def colours() -> set[tuple[int, ...]]:
        images, _ = load_split(tree, "train", cache_dir=cache)
        return {tuple(image[:, 0, 0].tolist()) for image in images}

    assert (10, 20, 30) in colours()
    stat = image.stat()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or rsync -t leave it
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    after = colours()
    assert (200, 100, 50) in after and (10, 20, 30) not in after
    caches = sorted(path.name for path in cache.iterdir() if path.name.endswith(".npz"))
    # The cache of the files as they were is gone; the one of the files as they are is there.
    record_files("decode caches of a data tree after an image was fixed in place", 1, int(len(caches) != 1))
    assert len(caches) == 1 and "-train-" in caches[0], caches


def test_predict_looks_through_linked_sub_folders_and_names_broken_links(cli, tmp_path):
    """predict.py on a folder whose sub-folder is a link (used) and with a broken link (named, exit 1)."""
    pictures = tmp_path / "pictures"
    _save_png(pictures / "a.png", (200, 10, 10))
    _save_png(tmp_path / "holiday" / "b.png", (10, 200, 10))
    (pictures / "holiday").symlink_to(tmp_path / "holiday", target_is_directory=True)
    assert [path.name for path in find_images([pictures])] == ["a.png", "b.png"]
    (pictures / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    ckpt = tmp_path / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), ckpt)
    result = cli("predict", "--ckpt", str(ckpt), str(pictures), "--json", "--accelerator", "cpu")
    assert result.code == 1, result.err
    assert sorted(Path(record["file"]).name for record in map(json.loads, result.out.splitlines())) == ["a.png", "b.png"]
    warnings = result.err.strip().splitlines()
    assert len(warnings) == 1 and "gone.jpg" in warnings[0], warnings
    # A file not named like an image (an iPhone's .heic) is named too, and one named explicitly is tried.
    (pictures / "holiday" / "c.heic").write_bytes(b"not decodable here")
    (pictures / "gone.jpg").unlink()
    result = cli("predict", "--ckpt", str(ckpt), str(pictures), "--json", "--accelerator", "cpu")
    assert result.code == 0 and len(result.out.splitlines()) == 2, result.err
    warnings = result.err.strip().splitlines()
    assert len(warnings) == 1 and "left out 1 file(s)" in warnings[0] and "c.heic" in warnings[0], warnings


# --- 3. YAML that means what it says ------------------------------------------------------------


def _config(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_numbers_mean_what_they_say(tmp_path):
    """run_name: 0123 stays "0123", seed: 010 is 10 (not octal 8), 1.10 stays "1.10", 1e-3 is 0.001."""
    from cli.train import parse_run_config

    path = _config(tmp_path, "run_name: 0123\nseed: 010\nlr: 1e-3\nweight_decay: 5.0e-4\nchannels_last: false\n")
    config = parse_run_config(["--config", str(path), "--accelerator", "cpu"])
    assert (config.run_name, config.seed, config.lr, config.weight_decay) == ("0123", 10, 0.001, 5e-4)
    config = parse_run_config(["--config", str(_config(tmp_path, "run_name: 1.10\n")), "--accelerator", "cpu"])
    assert config.run_name == "1.10"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("model: vgg16\nseed: 12:30\n", ["line 2", "--seed", "'12:30'"]),  # YAML 1.1 base 60 would be 750
        ("lr: 0.1\nepochs: 3\nlr: 0.01\n", ["line 3", "'lr' is given twice (first on line 1)"]),
        ("batch-size: 10\nbatch_size: 20\n", ["line 2", "'batch_size' is the option 'batch-size' again"]),
        ("nesterov: yes\n", ["line 1", "nesterov must be true or false, got 'yes'"]),
        ("epcohs: 3\n", ["line 1", "unknown option 'epcohs' (did you mean epochs?)"]),
        ("- vgg16\n- 30\n", ["line 1", "must be a mapping", "holds a list"]),
        ("python train.py --epochs 3\n", ["line 1", "must be a mapping", "single value"]),
        ("model: vgg16\n\tepochs: 3\n", ["line 2", "not valid YAML"]),
        ("model: vgg16\n---\nepochs: 3\n", ["line 2", "not valid YAML", "single document"]),
    ],
    ids=["base-60", "duplicate", "two-spellings", "yes", "typo", "list", "shell", "tab", "two-documents"],
)
def test_yaml_that_would_mean_something_else_is_refused_with_its_line(cli, tmp_path, text, fragments):
    """Base 60, a key given twice, yes/no, a typo, not a mapping: one line naming the line."""
    path = _config(tmp_path, text)
    assert_one_line_error(cli("train", "--config", str(path), *QUICK_VGG), str(path), *fragments)


def test_a_file_that_is_not_yaml_at_all_is_refused_with_its_line(cli, tmp_path):
    """A checkpoint or picture passed as --config, a file with control characters."""
    picture = tmp_path / "photo.yaml"
    Image.new("RGB", (8, 8)).save(picture, format="PNG")
    assert_one_line_error(cli("train", "--config", str(picture), *QUICK_VGG), "line 1", "not a YAML text file")
    control = _config(tmp_path, "model: vgg16\nepochs: 3\x07\n", "bell.yaml")
    assert_one_line_error(cli("train", "--config", str(control), *QUICK_VGG), "line 2", "control character")


def test_a_run_folders_config_is_read_the_same_way(cli, tmp_path):
    """A run's config.yaml with a key twice: test.py, which reads its data_dir, refuses it naming the line."""
    run = tmp_path / "runs" / "vgg16" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vgg16\ndata_dir: /data/a\nseed: 0\ndata_dir: /data/b\n")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save(build_model("vgg16").state_dict(), ckpt)
    assert_one_line_error(cli("test", "--ckpt", str(ckpt), "--accelerator", "cpu"),
                          "config.yaml: line 4", "'data_dir' is given twice")
    # What safe_dump writes reads back as written: strings that look like numbers stay strings.
    from run.config import write_config

    values = {"run_name": "0123", "tag": "1e3", "time": "12:30", "yes": "yes", "lr": 1e-5, "seed": 10, "null": None}
    write_config(values, run / "config.yaml")
    assert read_config(run / "config.yaml") == values


# --- 6. what was measured is what is deployed ------------------------------------------------


@pytest.fixture(scope="module", params=["flip", "flip-translate"])
def flip_checkpoint(request, tmp_path_factory, tiny_data) -> Path:
    """best.ckpt of a one-step vgg16 run trained with --tta flip, or flip-translate (with Cutout and
    reflected shifts, which the checkpoint and config.yaml record)."""
    from conftest import load_script

    tta = request.param
    output = tmp_path_factory.mktemp("flip-runs")
    augment = ["--cutout", "8", "--translate-padding", "reflect", "--translate", "2"] if tta == "flip-translate" else []
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main(["--model", "vgg16", "--tta", tta, *augment, "--data-dir", str(tiny_data),
                                            "--output-dir", str(output), *TINY_RUN]))
    assert exit_info.value.code == 0
    run = output / "vgg16" / "version_0"
    best = run / "checkpoints" / "best.ckpt"
    recorded = torch.load(best, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]["augmentation"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    if augment:
        assert recorded == {"translate": 2, "padding": "reflect", "cutout": 8}
        assert (config["translate"], config["translate_padding"], config["cutout"]) == (2, "reflect", 8)
    else:
        assert recorded == {"translate": 4, "padding": "zeros", "cutout": 0}
    yield best
    shutil.rmtree(output, ignore_errors=True)


def _flip_logits(ckpt: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits the checkpoint's run validated and tested with: ImageClassifier's own flip TTA."""
    from lit_modules import ImageClassifier

    contents = load_checkpoint(ckpt)
    tta = contents.hparams["tta"]
    assert tta in ("flip", "flip-translate")
    from base.schema import NetworkOptions

    network = NetworkOptions(model=contents.model_name, tta=tta, **contents.model_options)
    module = ImageClassifier(network, backbone=build_backbone(contents)).eval()
    with torch.inference_mode():
        return module._eval_logits(images)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Three CIFAR-like pictures (not mirror-symmetric) and their model input."""
    from run.inference import load_images

    root = tmp_path_factory.mktemp("pictures")
    images, _ = fake_images(3, seed=5)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i}.png")
    batch, _ = load_images(sorted(root.iterdir()))
    return root, batch


@pytest.mark.slow
def test_predict_scores_with_the_checkpoints_tta_unless_told(cli, flip_checkpoint, pictures):
    """A --tta flip checkpoint predicts with the mean logits of image and mirror; --tta none overrides."""
    root, batch = pictures
    tta = load_checkpoint(flip_checkpoint).hparams["tta"]
    expected = _flip_logits(flip_checkpoint, batch).softmax(dim=1)
    plain = build_backbone(load_checkpoint(flip_checkpoint)).eval()
    with torch.inference_mode():
        unflipped = plain(batch).softmax(dim=1)
    assert not torch.allclose(expected, unflipped, atol=1e-4)  # the test can tell them apart
    for flags, wanted in (([], expected), (["--tta", "none"], unflipped), (["--tta", tta], expected)):
        result = cli("predict", "--ckpt", str(flip_checkpoint), str(root), "--json", "--top-k", "10",
                     "--accelerator", "cpu", *flags)
        assert result.code == 0, result.err
        for record, probabilities in zip(map(json.loads, result.out.splitlines()), wanted):
            got = torch.zeros(10)
            for entry in record["top_k"]:
                got[CLASSES.index(entry["class"])] = entry["probability"]
            torch.testing.assert_close(got, probabilities, atol=1e-5, rtol=0)
    table = cli("predict", "--ckpt", str(flip_checkpoint), str(root), "--accelerator", "cpu")
    assert table.code == 0 and f"test-time augmentation: {tta}" in table.out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_of_a_flip_checkpoint_answers_what_its_run_measured(cli, flip_checkpoint, pictures, tmp_path, fmt):
    """ONNX and TorchScript graphs average image and mirror; safetensors records flip for predict and test."""
    _, batch = pictures
    tta = load_checkpoint(flip_checkpoint).hparams["tta"]
    expected = _flip_logits(flip_checkpoint, batch)
    output = tmp_path / f"model.{fmt}"
    result = cli("export", "--ckpt", str(flip_checkpoint), "--format", fmt, "--output", str(output))
    assert result.code == 0, result.err
    assert len(result.out.strip().splitlines()) == 1 and f"test-time augmentation {tta} " in result.out
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["tta"] == tta
        got = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    elif fmt == "torchscript":
        extra = {"metadata.json": ""}
        scripted = torch.jit.load(str(output), _extra_files=extra)
        assert json.loads(extra["metadata.json"])["tta"] == tta
        with torch.inference_mode():
            got = scripted(batch)
    else:
        contents = read_safetensors(output)
        assert contents.hparams["tta"] == tta
        from run.inference import checkpoint_tta, predict_probabilities, with_tta

        got = predict_probabilities(with_tta(build_backbone(contents), checkpoint_tta(contents)), batch).log()
        expected = expected.log_softmax(dim=1)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # --tta none exports the plain network, and says nothing about a flip.
    plain = tmp_path / f"plain.{fmt}"
    result = cli("export", "--ckpt", str(flip_checkpoint), "--format", fmt, "--output", str(plain), "--tta", "none")
    assert result.code == 0 and "test-time augmentation" not in result.out


# --- 8. names shown as they are; "did you mean" ----------------------------------------------


def test_names_with_rich_markup_are_printed_as_they_are(cli, tmp_path, monkeypatch, capsys):
    """[draft] cat.png, :cat: and [bold] in file and class names, in predict.py's and test.py's tables."""
    monkeypatch.setenv("COLUMNS", "250")
    pictures = tmp_path / "[draft] pictures"
    for name in ("[draft] cat.png", "[red]x[/red] :smile:.png"):
        _save_png(pictures / name, (100, 100, 100))
    ckpt = tmp_path / "[v2] vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), ckpt)
    result = cli("predict", "--ckpt", str(ckpt), str(pictures), "--accelerator", "cpu")
    assert result.code == 0, result.err
    assert "[draft] cat.png" in result.out and "[red]x[/red] :smile:.png" in result.out
    assert f"from {ckpt}" in result.out  # the title's path too
    from cli.test import print_results

    capsys.readouterr()
    names = ["[bold]cat[/bold]", ":dog:"] + [f"c{i}" for i in range(8)]
    print_results({"model": "vgg16", "images": 10, "test_set_images": 10, "accuracy": 0.5, "top5_accuracy": 0.9,
                   "per_class_accuracy": dict.fromkeys(names, 0.5), "checkpoint": "[run] best.ckpt",
                   "checkpoint_kind": "lightning", "tta": "none", "data": "image-folder tree /data/[x]"})
    out = capsys.readouterr().out
    assert "[bold]cat[/bold]" in out and ":dog:" in out and "[run] best.ckpt" in out and "/data/[x]" in out


@pytest.mark.parametrize(
    ("script", "args", "hint"),
    [
        ("train", ["--epcohs", "3"], "did you mean --epochs?"),
        ("train", ["--batch_size", "3"], "did you mean --batch-size?"),
        ("train", ["--model", "vgg61"], "did you mean vgg16?"),
        ("test", ["--ckpt", "x.ckpt", "--ttta", "flip"], "did you mean --tta?"),
        ("predict", ["--ckpt", "x.ckpt", "--topk", "3", "a.png"], "did you mean --top-k?"),
        ("export", ["--ckpt", "x.ckpt", "--frmat", "onnx"], "did you mean --format?"),
    ],
    ids=["train", "train-underscore", "train-choice", "test", "predict", "export"],
)
def test_mistyped_flags_get_a_did_you_mean(cli, script, args, hint):
    """A mistyped flag or choice: the one-line error suggests the right one, in all four commands."""
    assert_one_line_error(cli(script, *args), hint)


def test_a_mistyped_class_name_gets_a_did_you_mean(cli, tmp_path):
    """predict.py --explain-class catt: the classes are listed, the likely one first."""
    _save_png(tmp_path / "a.png", (1, 2, 3))
    ckpt = tmp_path / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), ckpt)
    result = cli("predict", "--ckpt", str(ckpt), str(tmp_path / "a.png"), "--explain", str(tmp_path / "out"),
                 "--explain-class", "catt", "--accelerator", "cpu")
    assert_one_line_error(result, "not a class", "(did you mean cat?)")


# --- 9. course checkpoints that PyTorch itself loads -------------------------------------------


def _old_pytorch(state_dict: dict) -> dict:
    """``state_dict`` as PyTorch before 0.4.1 saved it: no BatchNorm batch counters, version-1 metadata."""
    metadata = getattr(state_dict, "_metadata", {})
    old = type(state_dict)((k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    old._metadata = type(metadata)((path, {**version, "version": 1}) for path, version in metadata.items())
    return old


@pytest.mark.parametrize("model_name", ["vgg16", "vgg16_bn", "resnet50"])
def test_state_dicts_of_older_pytorch_load(cli, tmp_path, model_name):
    """No num_batches_tracked: PyTorch's load_state_dict(strict=True) takes it, and so do test.py's loaders."""
    trained = build_model(model_name)
    old = _old_pytorch(trained.state_dict())
    assert len(old) < len(trained.state_dict())
    path = tmp_path / f"{model_name}_old.pt"
    torch.save(old, path)
    build_model(model_name).load_state_dict(torch.load(path, weights_only=True), strict=True)  # PyTorch itself
    backbone = build_backbone(load_checkpoint(path))
    for key, value in trained.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(backbone.state_dict()[key], value), key


@pytest.mark.parametrize("wrap", ["bare", "model_state_dict", "averaged"])
def test_a_state_dict_of_our_own_module_loads(tmp_path, wrap):
    """torch.save(ImageClassifier(...).state_dict()): keys under backbone., bare or in a tutorial dict;
    and an AveragedModel's (EMA/SWA) state dict of the network, which PyTorch loads into one."""
    from torch.optim.swa_utils import AveragedModel

    from lit_modules import ImageClassifier

    module = ImageClassifier("resnet50")
    state = module.state_dict()
    if wrap == "averaged":
        state = AveragedModel(module.backbone).state_dict()  # n_averaged, module.*
        AveragedModel(build_model("resnet50")).load_state_dict(state)  # PyTorch itself
    path = tmp_path / "module.pt"
    torch.save({"epoch": 3, "model_state_dict": state} if wrap == "model_state_dict" else state, path)
    contents = load_any_checkpoint(path, expected_model="resnet50")
    assert (contents.model_name, contents.num_classes) == ("resnet50", 10)
    backbone = build_backbone(contents)
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_real_mismatches_in_such_files_are_still_refused(cli, tiny_data, tmp_path):
    """A module state dict with a missing weight, and one mixing prefixed and bare keys: one line each."""
    from lit_modules import ImageClassifier

    state = ImageClassifier("vgg16").state_dict()
    del state["backbone.features.2.weight"]
    missing = tmp_path / "missing.pt"
    torch.save(state, missing)
    assert_one_line_error(cli("test", "--ckpt", str(missing), "--accelerator", "cpu", "--data-dir", str(tiny_data)),
                          "missing 1 key (features.2.weight)")
    mixed_state = dict(build_model("vgg16").state_dict())
    mixed_state["backbone.extra"] = torch.zeros(1)
    mixed = tmp_path / "mixed.pt"
    torch.save(mixed_state, mixed)
    with pytest.raises(UserError, match=r"unexpected 1 key \(backbone\.extra\)"):
        build_backbone(load_checkpoint(mixed))


# --- 10. supply chain -------------------------------------------------------------------------


def _pins(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)", head)
        assert match, f"not pinned with ==: {head!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        pins[name] = (match.group(3), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_the_install_excludes_compromised_lightning_and_a_hash_locked_set_is_given():
    """pyproject's floor excludes 2.6.2/2.6.3 (GHSA-w37p-236h-pfx3) and < 2.6.6; requirements.lock pins and hashes all."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    requirements += [Requirement(text) for extra in project["optional-dependencies"].values() for text in extra]
    lightning = next(r for r in requirements if r.name == "lightning")
    assert not any(lightning.specifier.contains(v) for v in ("2.6.0", "2.6.2", "2.6.3", "2.6.5"))
    assert lightning.specifier.contains("2.6.6")
    pins = _pins((ROOT / "requirements.lock").read_text())
    assert pins["lightning"][0] == "2.6.6" and pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"
    assert all(hashes for _, hashes in pins.values()), [name for name, (_, h) in pins.items() if not h]
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "cifar10-lightning":  # [dev] names [export] of this project
            continue
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(Version(pins[name][0]), prereleases=True), (name, pins[name][0])
