"""Every bad input gets one clear line on stderr, exit code 2, no traceback, and no lost file."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from fakedata import make_python_archive, make_tar_gz
from PIL import Image
from robustness import assert_one_line_error, record_files

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
    hollow = root / "meta.pt"
    torch.save({key: value.to("meta") for key, value in build_model("vgg16").state_dict().items()}, hollow)
    return {
        "vgg": vgg,
        "truncated": truncated,
        "empty": empty,
        "foreign": foreign,
        "other": tensors_of_something_else,
        "hundred": hundred,
        "nan": not_finite,
        "meta": hollow,
        "missing": root / "does-not-exist.ckpt",
        "directory": root,
    }


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "vgg19"], "invalid choice: 'vgg19'"),
        (["--accelerator", "tpu"], "invalid choice: 'tpu'"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--batch-size", "-3"], "--batch-size: must be a positive integer"),
        (["--batch-size", "ten"], "expected a positive integer"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--lr", "-1"], "--lr: must be a positive (finite) number"),
        (["--lr", "inf"], "--lr: must be a positive (finite) number"),
        (["--label-smoothing", "1.5"], "--label-smoothing: must be at least 0 and below 1"),
        (["--label-smoothing", "-0.1"], "--label-smoothing: must be at least 0 and below 1"),
        (["--momentum", "2"], "--momentum: must be at least 0 and below 1"),
        (["--weight-decay=-1e-4"], "--weight-decay: must be >= 0"),
        (["--gradient-clip-val", "0"], "--gradient-clip-val: must be a positive (finite) number"),
        (["--strategy", "fsdp"], "invalid choice: 'fsdp'"),
        (["--limit-train-batches", "1.5"], "a fraction must be in (0, 1]"),
        (["--devices", "two"], "--devices 'two'"),
        (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
        (["--identity-shortcut"], "--identity-shortcut applies to resnet50 only"),
        (["--dropout", "1"], "--dropout: must be at least 0 and below 1"),
        (["--dropout", "-0.5"], "--dropout: must be at least 0 and below 1"),
        (["--model", "resnet50", "--dropout", "0"], "--dropout applies to vgg16, vgg16_bn only, not resnet50"),
    ],
)
def test_train_refuses_bad_flags(cli, tiny_data, args, fragment):
    """Bad flag values."""
    assert_one_line_error(cli("train", "--data-dir", str(tiny_data), *QUICK, *args), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_requested_where_there_is_none(cli, tiny_data):
    """A GPU requested on a machine without one."""
    result = cli("train", "--data-dir", str(tiny_data), "--accelerator", "gpu")
    assert_one_line_error(result, "no CUDA GPU is available", "--accelerator cpu")


def test_bad_config_files_name_the_file_and_the_key(cli, tiny_data, tmp_path):
    """Config files with unknown keys, bad values or broken YAML."""
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
    """Missing data set (archive path typo, empty folder while offline)."""
    args = ["--ckpt", str(checkpoints["vgg"])] if script == "test" else []
    result = cli(script, *args, "--data-dir", str(tmp_path / "cifar.tar.gz"), *QUICK)
    assert_one_line_error(result, "archive not found")
    # A missing folder is where the official archive would be downloaded; offline that fails clearly.
    runs = ["--output-dir", str(tmp_path / "runs")] if script == "train" else []
    result = cli(script, *args, "--data-dir", str(tmp_path / "nothing-here"), *QUICK, *runs)
    assert_one_line_error(result, "no CIFAR-10 at", "downloading it there failed", "--data-dir")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nothing-here").exists()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "checkpoint not found"),
        ("directory", "is a directory"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("foreign", "is not a PyTorch checkpoint file"),
        ("other", "does not hold a state dict of vgg16, vgg16_bn"),
        ("hundred", "100-class output layer"),
        ("nan", "NaN or infinite"),
        ("meta", "without values (saved from the meta device"),
    ],
)
@pytest.mark.parametrize("script", ["train", "test"])
def test_bad_checkpoints(cli, tiny_data, checkpoints, tmp_path, script, kind, fragment):
    """Missing, empty, truncated, foreign, mismatched, non-finite or hollow checkpoints."""
    flag = "--ckpt" if script == "test" else "--weights"
    result = cli(script, flag, str(checkpoints[kind]), "--data-dir", str(tiny_data), *QUICK,
                 *(["--output-dir", str(tmp_path / "runs")] if script == "train" else []))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_the_other_architecture(cli, tiny_data, checkpoints):
    """A checkpoint of the other network than --model."""
    result = cli("test", "--ckpt", str(checkpoints["vgg"]), "--model", "resnet50", "--data-dir", str(tiny_data), *QUICK)
    assert_one_line_error(result, "holds a vgg16 network, not resnet50")


@pytest.mark.parametrize("script", ["train", "test"])
def test_malicious_pickle_is_refused_and_runs_nothing(cli, tiny_data, tmp_path, script):
    """Checkpoints carrying pickled code (refused, and the code never runs)."""
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
    """--resume last with no run to resume."""
    result = cli("train", "--resume", "last", "--output-dir", str(tmp_path / "runs"), "--data-dir", str(tiny_data))
    assert_one_line_error(result, "--resume last: no runs under")


def test_a_failed_test_leaves_an_existing_json_report_untouched(cli, tiny_data, checkpoints, tmp_path):
    """A failed test.py run with --json pointing at an existing report."""
    report = tmp_path / "result.json"
    report.write_text('{"accuracy": 0.9}\n')
    result = cli("test", "--ckpt", str(checkpoints["truncated"]), "--data-dir", str(tiny_data), *QUICK,
                 "--json", str(report))
    assert_one_line_error(result, "not a readable PyTorch checkpoint")
    intact = report.read_text() == '{"accuracy": 0.9}\n'
    record_files("the existing --json report", 1, int(not intact))
    assert intact


def _damage_data(kind: str, tiny: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A --data-dir with the problem ``kind`` (built from a copy of ``tiny``) and the message it must get."""
    root = root / kind.replace(" ", "-")  # names the case in the command that the report shows
    tree = root / "cifar10"
    shutil.copytree(tiny, tree)
    if kind == "one level too deep":
        return tree / "train", f"one level too deep: pass --data-dir pointing at its parent {tree.resolve()}"
    if kind == "two levels too deep":
        return tree / "train" / "cat", f"two levels too deep: pass --data-dir pointing at {tree.resolve()}"
    if kind == "two levels too shallow":
        holder = root / "holder"
        (holder / "downloads").mkdir(parents=True)
        shutil.move(tree, holder / "downloads" / "cifar10")
        return holder, f"{holder / 'downloads' / 'cifar10'} holds some: pass --data-dir"
    if kind == "not a data set":
        notes = root / "notes.txt"
        notes.write_text("hello\n")
        return notes, f"{notes} is not a CIFAR-10 source"
    if kind in ("truncated archive", "garbage archive"):
        archive = make_tar_gz(tree)
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) // 2] if kind == "truncated archive" else b"\x00" * 1000)
        return archive, f"cannot read archive {archive}"
    if kind == "missing class folder":
        shutil.rmtree(tree / "train" / "cat")
        return tree, f"missing class folder(s) cat in {tree / 'train'}"
    if kind == "misnamed class folder":
        (tree / "train" / "cat").rename(tree / "train" / "kitten")
        return tree, f"unexpected folder(s) kitten in {tree / 'train'}"
    if kind == "undecodable image":
        bad = tree / "train" / "dog" / "0001.png"
        bad.write_bytes(bad.read_bytes()[:40])
        return tree, f"cannot decode image {bad}"
    if kind == "image of the wrong size":
        big = tree / "train" / "dog" / "big.png"
        Image.new("RGB", (64, 48)).save(big)
        return tree, f"image {big} is 64x48"
    if kind == "unreadable image":
        locked = tree / "train" / "frog" / "0003.png"
        read_bytes = Path.read_bytes

        # chmod 000 does not stop root, who runs the tests in some containers; refuse the read instead.
        def refuse(path: Path) -> bytes:
            if path == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
        return tree, f"cannot read image {locked} (Permission denied)"
    python = make_python_archive(root / "python", 50, 20) / "cifar-10-batches-py"
    if kind == "missing batch file":
        (python / "data_batch_3").unlink()
        return python.parent, f"missing CIFAR-10 batch file {python / 'data_batch_3'}"
    if kind == "corrupted batch file":
        (python / "data_batch_2").write_bytes(b"garbage")
        return python.parent, f"corrupted CIFAR-10 batch file {python / 'data_batch_2'}"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "one level too deep",
        "two levels too deep",
        "two levels too shallow",
        "not a data set",
        "truncated archive",
        "garbage archive",
        "missing class folder",
        "misnamed class folder",
        "undecodable image",
        "image of the wrong size",
        "unreadable image",
        "missing batch file",
        "corrupted batch file",
    ],
)
def test_bad_data_is_named(cli, tiny_data, tmp_path, monkeypatch, kind):
    """Damaged or misplaced data: the message names the file or folder and the fix."""
    data_dir, fragment = _damage_data(kind, tiny_data, tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    result = cli("train", "--data-dir", str(data_dir), *QUICK, "--val-size", "20", "--output-dir", str(runs))
    assert_one_line_error(result, fragment)
