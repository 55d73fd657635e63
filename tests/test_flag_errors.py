"""Every mistake in a command's flags is refused before torch loads (the < 1 s start-up target).

Each case runs the real script in a fresh process (tests/import_probe.py) and checks the answer
is one clear line with exit code 2, and that neither torch nor Lightning was imported for it:
only the imports cost seconds, so this is the start-up target checked without timing anything
(benchmarks/startup.py times it).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CliResult
from robustness import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
ZIP_HEAD = b"PK\x03\x04"  # how torch.save's files start: enough for every check before torch loads


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A run folder (config.yaml + checkpoints/last.ckpt), a loose checkpoint, an image, a text file."""
    root = tmp_path_factory.mktemp("flags")
    run = root / "runs" / "vgg16" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    saved = {"model": "vgg16", "epochs": 3, "batch_size": 100, "lr": 0.001, "optimizer": "adam", "scheduler": "step",
             "accelerator": "cpu", "devices": 1, "precision": "32-true", "data_dir": str(root / "data")}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "checkpoints" / "last.ckpt").write_bytes(ZIP_HEAD + bytes(60))
    (root / "loose.ckpt").write_bytes(ZIP_HEAD + bytes(60))
    (root / "loose.onnx").write_bytes(b"exists")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "bad.yaml").write_text("epochs: 0\n")
    (root / "empty").mkdir()
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff")  # never decoded: every case stops before
    return root


# (command, arguments, a fragment of the expected message); "{p}" is the fixture's folder.
CASES = [
    ("train", ["--model", "vgg17"], "invalid choice"),
    ("train", ["--epochs", "0"], "positive integer"),
    ("train", ["--strategy", "nonsense"], "--strategy"),
    ("train", ["--config", "{p}/bad.yaml"], "positive integer"),
    ("train", ["--config", "{p}/missing.yaml"], "config file not found"),
    ("train", ["--identity-shortcut", "--model", "vgg16"], "resnet50 only"),
    ("train", ["--run-name", "a/b"], "--run-name"),
    ("train", ["--devices", "0,1"], "GPU indices"),
    ("train", ["--precision", "16-mixed"], "needs a GPU"),
    ("train", ["--devices", "x"], "--devices"),
    ("train", ["--output-dir", "{p}/notes.txt/runs"], "is a file"),
    ("train", ["--results-json", "{p}/empty"], "is a folder"),
    ("train", ["--data-dir", "{p}/cifar10-jpeg.tar.gz"], "archive not found"),
    ("train", ["--data-dir", "{p}/notes.txt"], "not a CIFAR-10 source"),
    ("train", ["--data-dir", "{p}/cifar10-jpeg.tar.gzz"], "file not found"),
    ("train", ["--data-dir", "{p}/cifar10.zip"], "file not found"),
    ("train", ["--data-dir", "{p}/runs"], "no CIFAR-10 data found"),
    ("train", ["--weights", "{p}/missing.ckpt"], "checkpoint not found"),
    ("train", ["--weights", "{p}/notes.txt"], "not a PyTorch checkpoint"),
    ("train", ["--weights", "{p}/empty.ckpt"], "empty"),
    ("train", ["--resume", "{p}/missing.ckpt"], "checkpoint not found"),
    ("train", ["--resume", "last", "--output-dir", "{p}/empty"], "no runs"),
    ("train", ["--resume", "{p}/empty"], "run folder"),
    ("train", ["--resume", "{p}/loose.ckpt"], "--weights"),
    ("train", ["--resume", "last", "--output-dir", "{p}/runs", "--lr", "0.5"], "--lr 0.5"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--optimizer", "sgd"], "--optimizer sgd"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--batch-size", "50"], "--batch-size 50"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--find-lr"], "--find-lr"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--model", "resnet50"], "--model resnet50"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--dropout", "0"], "--dropout 0"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--weights", "{p}/loose.ckpt"], "--weights with --resume"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--run-name", "other"], "--run-name other"),
    ("train", ["--resume", "{p}/runs/vgg16/version_0", "--limit-val-batches", "2"], "--limit-val-batches 2"),
    ("train", ["--label-smoothing", "1.5"], "below 1"),
    ("train", ["--weight-decay", "-1"], ">= 0"),
    ("test", ["--ckpt", "{p}/missing.ckpt"], "checkpoint not found"),
    ("test", ["--ckpt", "{p}/runs/vgg16/version_0"], "is a directory"),
    ("test", ["--ckpt", "{p}/notes.txt"], "not a PyTorch checkpoint"),
    ("test", ["--ckpt", "{p}/loose.ckpt", "--log-to-run"], "--log-to-run"),
    ("test", ["--ckpt", "{p}/loose.ckpt", "--json", "{p}/empty"], "is a folder"),
    ("test", ["--ckpt", "{p}/loose.ckpt", "--devices", "0,1"], "GPU indices"),
    ("test", ["--ckpt", "{p}/loose.ckpt", "--limit-test-batches", "0"], "at least 1"),
    ("test", ["--ckpt", "{p}/loose.ckpt", "--data-dir", "{p}/cifar10.tgz"], "archive not found"),
    ("predict", ["--ckpt", "{p}/loose.ckpt", "{p}/missing.jpg"], "no such file"),
    ("predict", ["--ckpt", "{p}/loose.ckpt", "{p}/empty"], "no images"),
    ("predict", ["--ckpt", "{p}/missing.ckpt", "{p}/photo.jpg"], "checkpoint not found"),
    ("predict", ["--ckpt", "{p}/notes.txt", "{p}/photo.jpg"], "not a PyTorch checkpoint"),
    ("predict", ["--ckpt", "{p}/loose.ckpt", "--explain-class", "cat", "{p}/photo.jpg"], "needs --explain"),
    ("predict", ["--ckpt", "{p}/loose.ckpt", "--explain", "{p}/notes.txt", "{p}/photo.jpg"], "is a file"),
    ("predict", ["--ckpt", "{p}/loose.ckpt", "--top-k", "0", "{p}/photo.jpg"], "positive integer"),
    ("export", ["--ckpt", "{p}/missing.ckpt", "--format", "onnx"], "checkpoint not found"),
    ("export", ["--ckpt", "{p}/loose.ckpt", "--format", "onnx"], "--force"),
    ("export", ["--ckpt", "{p}/loose.ckpt", "--format", "onnx", "--output", "{p}/empty"], "is a folder"),
    ("export", ["--ckpt", "{p}/notes.txt", "--format", "safetensors"], "not a PyTorch checkpoint"),
    ("export", ["--ckpt", "{p}/loose.ckpt", "--format", "h5"], "invalid choice"),
]


@pytest.mark.parametrize(("script", "args", "fragment"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_flag_mistakes_are_refused_before_torch_loads(place, script, args, fragment):
    """A mistaken flag, path or resume option: one line, exit 2, and torch never imported."""
    args = [arg.replace("{p}", str(place)) for arg in args]
    # --accelerator cpu: the same answer on a machine with a GPU (a device list is refused on the CPU).
    hardware = ["--accelerator", "cpu"] if script != "export" else []
    done = subprocess.run([sys.executable, "tests/import_probe.py", script, *args, *hardware],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    err_lines = done.stderr.strip().splitlines()
    imported = err_lines.pop() if err_lines and err_lines[-1].startswith("IMPORTED: ") else "IMPORTED: ?"
    result = CliResult(done.returncode, done.stdout, "\n".join(err_lines), script, tuple(args))
    assert_one_line_error(result, fragment)
    assert imported == "IMPORTED: none", imported
