"""Checkpoint files as users bring them: tutorial training dicts, exported safetensors, TorchScript.

Each is either read as the weights it holds or refused in one line that says what the file is.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from fakedata import make_tar_gz
from robustness import assert_one_line_error

from base.errors import UserError
from datamodules import CLASSES
from models import build_model
from run.checkpoints import build_backbone, load_checkpoint
from run.checkpoints import load_any_checkpoint
from run.exporting import export_metadata, export_safetensors, export_torchscript

CPU = ["--accelerator", "cpu", "--workers", "0", "--eval-batch-size", "50"]

# The TorchScript export is loaded on purpose; PyTorch 2.10+ warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.\\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vgg16").eval()


def _tutorial_dict(model: torch.nn.Module, key: str) -> dict:
    """What a tutorial's training loop torch.saves, the weights under ``key`` (PyTorch's recipe "Saving
    and loading a general checkpoint": epoch, model and optimiser state dicts, loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 3, key: model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "loss": torch.tensor(0.42), "note": "plain values load under weights_only too"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, model) -> dict[str, Path]:
    """The same vgg16 weights in every layout a user may hand over, and some that hold no weights."""
    root = tmp_path_factory.mktemp("formats")
    found = {}
    for key in ("model_state_dict", "state_dict", "model"):
        found[key] = root / f"tutorial_{key}.pt"
        torch.save(_tutorial_dict(model, key), found[key])
    found["bare"] = root / "bare.pt"
    torch.save(model.state_dict(), found["bare"])
    contents = load_checkpoint(found["bare"])
    for fmt, exporter in (("safetensors", export_safetensors), ("torchscript", export_torchscript)):
        found[fmt] = root / f"vgg16.{'pt' if fmt == 'torchscript' else fmt}"
        with found[fmt].open("wb") as file:
            exporter(model, file, export_metadata(contents, list(CLASSES)))
    found["no_weights"] = root / "progress.pt"
    torch.save({"epoch": 3, "optimizer_state_dict": {}, "loss": 0.42, "lr": 0.1, "seed": 1, "notes": "x"},
               found["no_weights"])
    # Another project's Lightning checkpoint: its "state_dict" is a LightningModule's, not a course model's.
    found["other_lightning"] = root / "other_lightning.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"lr": 0.1},
                "pytorch-lightning_version": "2.5.0"}, found["other_lightning"])
    return found


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_tutorial_training_dicts_load_as_course_state_dicts(files, model, key):
    """{"epoch": ..., "model_state_dict": ..., "optimizer_state_dict": ...} as test.py and predict.py load it."""
    for loader in (load_checkpoint, load_any_checkpoint):
        contents = loader(files[key])
        assert (contents.kind, contents.model_name, contents.num_classes) == ("state_dict", "vgg16", 10)
        assert contents.epoch is None and contents.global_step is None  # no place in a run's curves
    rebuilt = build_backbone(contents).eval()
    batch = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(batch), model(batch))


def test_train_weights_accepts_a_tutorial_dict(files):
    """train.py --weights: run.life.resolve peeks at the network, run.build loads the weights."""
    assert load_checkpoint(files["model_state_dict"], expected_model="vgg16", peek=True).model_name == "vgg16"
    backbone = build_backbone(load_checkpoint(files["model_state_dict"], expected_model="vgg16"), 10)
    assert isinstance(backbone, torch.nn.Module)
    with pytest.raises(UserError, match="holds a vgg16 network, not resnet50"):
        load_checkpoint(files["model_state_dict"], expected_model="resnet50", peek=True)


def test_train_weights_takes_an_exported_safetensors(files, tmp_path):
    """train.py --weights model.safetensors (what export.py writes): the network comes from the file."""
    from cli.train import parse_run_config

    config = parse_run_config(["--weights", str(files["safetensors"]), "--accelerator", "cpu",
                               "--data-dir", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "runs")])
    assert config.model == "vgg16" and config.weights == files["safetensors"]


def test_a_run_from_weights_takes_its_dropout_from_the_flags_and_its_structure_from_the_file(model, tmp_path):
    """A ResNet's identity_shortcut shows in its weights, so a run from them takes it from the file;
    a VGG's dropout holds no weight, so it is the run's own, like label smoothing, and the network
    built is the one recorded."""
    from torch import nn

    from cli.train import parse_run_config
    from base.datasets import CIFAR10
    from run.build import build_module
    from run.life.start import plan_start

    bare, exported = tmp_path / "bare.pt", tmp_path / "no-dropout.safetensors"  # the latter: of a run with --dropout 0
    torch.save(model.state_dict(), bare)
    with exported.open("wb") as file:
        export_safetensors(model, file, {**export_metadata(load_checkpoint(bare), list(CLASSES)),
                                         "model_options": json.dumps({"dropout": 0.0})})
    shortcut = tmp_path / "identity.pt"
    torch.save(build_model("resnet50", identity_shortcut=True).state_dict(), shortcut)
    common = ["--accelerator", "cpu", "--data-dir", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "runs")]
    for flags, dropout in (([], 0.5), (["--dropout", "0.2"], 0.2)):
        config = parse_run_config(["--weights", str(exported), *flags, *common])
        assert config.model == "vgg16" and config.dropout == dropout
        module = build_module(config, CIFAR10, plan_start(config))
        assert [m.p for m in module.backbone.classifier if isinstance(m, nn.Dropout)] == [dropout, dropout]
        assert module.hparams["network"]["dropout"] == dropout
    config = parse_run_config(["--weights", str(shortcut), "--no-identity-shortcut", *common])
    assert config.model == "resnet50" and config.identity_shortcut is True
    with pytest.raises(UserError, match="^--dropout applies to vgg16, vgg16_bn only, not resnet50$"):
        parse_run_config(["--weights", str(shortcut), "--dropout", "0.2", *common])


@pytest.mark.slow
def test_train_weights_runs_from_a_tutorial_dict(cli, tiny_data, files, tmp_path):
    """train.py --weights with a tutorial dict, one batch end to end."""
    result = cli("train", "--weights", str(files["model_state_dict"]), "--data-dir", str(tiny_data), *CPU,
                 "--batch-size", "20", "--val-size", "20", "--fast-dev-run", "1", "--output-dir", str(tmp_path / "runs"))
    assert result.code == 0, result.err


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("no_weights", ["holds a dict with keys epoch, optimizer_state_dict, loss, lr, seed, ...",
                        '"model_state_dict", "state_dict", "model"', "torch.save(model.state_dict())"]),
        ("other_lightning", ["is a Lightning checkpoint of another program", "not of train.py"]),
        ("torchscript", ["is a TorchScript file (as export.py writes), not a checkpoint",
                         "pass the .ckpt it was exported from"]),
    ],
)
@pytest.mark.parametrize("script", ["test", "predict", "export", "train"])
def test_files_without_weights_say_what_they_hold(cli, tiny_data, files, tmp_path, script, kind, fragments):
    """A dict of training progress without weights, another project's Lightning checkpoint, a TorchScript export."""
    path = str(files[kind])
    args = {
        "test": ["--ckpt", path, "--data-dir", str(tiny_data), *CPU],
        "predict": ["--ckpt", path, str(next((tiny_data / "test" / "cat").iterdir())), "--accelerator", "cpu"],
        "export": ["--ckpt", path, "--format", "safetensors", "--output", str(tmp_path / "out.safetensors")],
        "train": ["--weights", path, "--data-dir", str(tiny_data), *CPU, "--output-dir", str(tmp_path / "runs")],
    }[script]
    assert_one_line_error(cli(script, *args), *fragments)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "runs").exists()


def test_a_truncated_checkpoint_is_explained_in_whole_words(cli, tiny_data, files, tmp_path):
    """torch's long reason for a damaged file is cut at the end of a sentence, not mid-word."""
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(files["bare"].read_bytes()[: 1 << 20])
    result = cli("test", "--ckpt", str(truncated), "--data-dir", str(tiny_data), *CPU)
    assert_one_line_error(result, "not a readable PyTorch checkpoint (truncated or corrupted?)")
    assert result.err.rstrip().endswith("failed finding central directory."), result.err


def test_long_reasons_are_cut_at_a_word():
    from run.checkpoints import _short_reason

    reason = _short_reason(RuntimeError("word " * 60))
    assert reason.endswith("word...") and len(reason) <= 124
    assert _short_reason(RuntimeError("First sentence. " + "x" * 200)) == "First sentence."
    assert _short_reason(RuntimeError("x" * 200)) == "x" * 120 + "..."
    assert _short_reason(EOFError()) == "EOFError"


def _test_results(cli, tiny_data, path: Path, *more: str) -> dict:
    output = path.with_suffix(".json")
    result = cli("test", "--ckpt", str(path), "--data-dir", str(tiny_data), *CPU, "--json", str(output), *more)
    assert result.code == 0, result.err
    return json.loads(output.read_text())


def test_test_py_takes_an_exported_safetensors(cli, tiny_data, files):
    """test.py --ckpt model.safetensors gives the results of the weights it was exported from."""
    exported = _test_results(cli, tiny_data, files["safetensors"], "--model", "vgg16")
    original = _test_results(cli, tiny_data, files["bare"])
    assert exported["checkpoint_kind"] == "safetensors" and exported["model"] == "vgg16"
    assert exported["images"] == original["images"] == 50
    assert exported["accuracy"] == pytest.approx(original["accuracy"])
    assert exported["per_class_accuracy"] == pytest.approx(original["per_class_accuracy"])
    wrong = cli("test", "--ckpt", str(files["safetensors"]), "--model", "resnet50", "--data-dir", str(tiny_data), *CPU)
    assert_one_line_error(wrong, "holds a vgg16 network, not resnet50")


def test_log_to_run_refuses_an_exported_safetensors(cli, tiny_data, files, tmp_path):
    """test.py --log-to-run with a .safetensors exported beside a run's best.ckpt: no training step to log at."""
    checkpoints = tmp_path / "runs" / "vgg16" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / "config.yaml").write_text(f"data_dir: {tiny_data}\nmodel: vgg16\n")
    exported = checkpoints / "best.safetensors"
    exported.write_bytes(files["safetensors"].read_bytes())
    result = cli("test", "--ckpt", str(exported), "--log-to-run", *CPU)
    assert_one_line_error(result, f"--log-to-run: {exported} is not a checkpoint written by train.py",
                          "leave out --log-to-run")
    assert not list(checkpoints.parent.glob("events.*"))


# --- damaged images inside the data ------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_damaged_image_is_named_without_python_internals(cli, tiny_data, tmp_path, packed, damage):
    """A damaged image file in a folder tree or a .tar.gz: the file (or member) is named, no object repr."""
    tree = tmp_path / "cifar10"
    shutil.copytree(tiny_data, tree)
    bad = tree / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40] if damage == "truncated" else b"GIF89a but not really\n")
    data_dir = make_tar_gz(tree) if packed else tree
    name = f"{data_dir}:train/dog/0001.png" if packed else str(bad)
    result = cli("train", "--data-dir", str(data_dir), *CPU, "--val-size", "20", "--output-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, f"cannot decode image {name} (", "): replace or remove the file")
    assert " object at 0x" not in result.err and "<_io." not in result.err


def test_an_image_that_fails_while_decoding_is_named(tmp_path):
    """A PNG whose header is fine but whose pixel data is cut off (Pillow fails in load, not open)."""
    from datamodules.sources import _decode_image

    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 64).convert("RGB").save(buffer, format="PNG")
    cut = buffer.getvalue()[:-200]
    with pytest.raises(UserError) as error:
        _decode_image(io.BytesIO(cut), "data.tar:train/cat/7.png")
    message = str(error.value)
    assert message.startswith("cannot decode image data.tar:train/cat/7.png (") and "0x" not in message
    assert len(message.splitlines()) == 1
