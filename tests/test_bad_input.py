"""Every bad input gets one clear line on stderr, exit code 2, no traceback, and no lost file."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from models import build_model

QUICK = ["--accelerator", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint files of every kind a user may hand us, good and bad."""
    root = tmp_path_factory.mktemp("ckpts")
    vgg = root / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), vgg)
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(vgg.read_bytes()[: 1 << 20])
    empty = root / "empty.ckpt"
    empty.touch()
    foreign = root / "notes.ckpt"
    foreign.write_text("this is not a checkpoint\n")
    tensors_of_something_else = root / "other.pt"
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(3)}, tensors_of_something_else)
    hundred = root / "vgg16_100.pt"
    torch.save(build_model("vgg16", num_classes=100).state_dict(), hundred)
    not_finite = root / "nan.pt"
    state = build_model("vgg16").state_dict()
    state["classifier.5.bias"] = torch.full_like(state["classifier.5.bias"], float("nan"))
    torch.save(state, not_finite)
    return {
        "vgg": vgg,
        "truncated": truncated,
        "empty": empty,
        "foreign": foreign,
        "other": tensors_of_something_else,
        "hundred": hundred,
        "nan": not_finite,
        "missing": root / "does-not-exist.ckpt",
        "directory": root,
    }


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "error:" in lines[0] and "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "vgg19"], "invalid choice: 'vgg19'"),
        (["--accelerator", "tpu"], "invalid choice: 'tpu'"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--batch-size", "-3"], "--batch-size: must be a positive integer"),
        (["--batch-size", "ten"], "expected a positive integer"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--lr", "-1"], "--lr: must be a positive number"),
        (["--limit-train-batches", "1.5"], "a fraction must be in (0, 1]"),
        (["--devices", "two"], "--devices 'two'"),
        (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
        (["--identity-shortcut"], "--identity-shortcut applies to resnet50 only"),
    ],
)
def test_train_refuses_bad_flags(cli, tiny_data, args, fragment):
    assert_one_line_error(cli("train", "--data-dir", str(tiny_data), *QUICK, *args), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_requested_where_there_is_none(cli, tiny_data):
    result = cli("train", "--data-dir", str(tiny_data), "--accelerator", "gpu")
    assert_one_line_error(result, "no CUDA GPU is available", "--accelerator cpu")


def test_bad_config_files_name_the_file_and_the_key(cli, tiny_data, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: vgg16\nbatchsize: 100\n")
    assert_one_line_error(cli("train", "--config", str(unknown), *QUICK), str(unknown), "unknown option 'batchsize'")
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("batch_size: 0\n")
    assert_one_line_error(cli("train", "--config", str(bad_value), *QUICK), str(bad_value), "--batch-size")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [vgg16\n")
    assert_one_line_error(cli("train", "--config", str(broken), *QUICK), "not valid YAML")


@pytest.mark.parametrize("script", ["train", "test"])
def test_missing_data(cli, checkpoints, tmp_path, script):
    args = ["--ckpt", str(checkpoints["vgg"])] if script == "test" else []
    result = cli(script, *args, "--data-dir", str(tmp_path / "cifar.tar.gz"), *QUICK)
    assert_one_line_error(result, "archive not found")
    # A missing folder is where the official archive would be downloaded; offline that fails clearly.
    runs = ["--output-dir", str(tmp_path / "runs")] if script == "train" else []
    result = cli(script, *args, "--data-dir", str(tmp_path / "nothing-here"), *QUICK, *runs)
    assert_one_line_error(result, "could not download CIFAR-10", "--data-dir")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "checkpoint not found"),
        ("directory", "is a directory"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("foreign", "not a readable PyTorch checkpoint"),
        ("other", "does not hold a VGG16 or ResNet50 state dict"),
        ("hundred", "100-class output layer"),
        ("nan", "NaN or infinite"),
    ],
)
@pytest.mark.parametrize("script", ["train", "test"])
def test_bad_checkpoints(cli, tiny_data, checkpoints, tmp_path, script, kind, fragment):
    flag = "--ckpt" if script == "test" else "--weights"
    result = cli(script, flag, str(checkpoints[kind]), "--data-dir", str(tiny_data), *QUICK,
                 *(["--output-dir", str(tmp_path / "runs")] if script == "train" else []))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_the_other_architecture(cli, tiny_data, checkpoints):
    result = cli("test", "--ckpt", str(checkpoints["vgg"]), "--model", "resnet50", "--data-dir", str(tiny_data), *QUICK)
    assert_one_line_error(result, "holds a vgg16 network, not resnet50")


@pytest.mark.parametrize("script", ["train", "test"])
def test_malicious_pickle_is_refused_and_runs_nothing(cli, tiny_data, tmp_path, script):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as handle:
        pickle.dump({"state_dict": Payload(marker)}, handle)
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil_zip.ckpt")
    for path in (evil, tmp_path / "evil_zip.ckpt"):
        flag = "--ckpt" if script == "test" else "--weights"
        result = cli(script, flag, str(path), "--data-dir", str(tiny_data), *QUICK)
        assert_one_line_error(result, "refusing to load")
    assert not marker.exists()


def test_resume_last_without_any_run_says_so(cli, tiny_data, tmp_path):
    result = cli("train", "--resume", "last", "--output-dir", str(tmp_path / "runs"), "--data-dir", str(tiny_data))
    assert_one_line_error(result, "--resume last: no runs with a checkpoints/last.ckpt")


def test_a_failed_test_leaves_an_existing_json_report_untouched(cli, tiny_data, checkpoints, tmp_path):
    report = tmp_path / "result.json"
    report.write_text('{"accuracy": 0.9}\n')
    result = cli("test", "--ckpt", str(checkpoints["truncated"]), "--data-dir", str(tiny_data), "--json", str(report))
    assert result.code == 2
    assert report.read_text() == '{"accuracy": 0.9}\n'
