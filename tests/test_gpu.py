"""On a CUDA GPU: bf16, channels_last, compile, the device data path, train -> resume -> test, and CPU loading.

Skipped without CUDA; ``scripts/gpu_proof.py`` runs them first on a lent GPU (``pytest -m gpu``).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import QUICK_VGG

from datamodules import CIFAR10DataModule
from models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU = ["--accelerator", "gpu", "--devices", "1"]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_data):
    """A 2-epoch run on the GPU with auto precision, trained 1 epoch then resumed; its run folder."""
    from cli.flags import run_main
    from conftest import load_script

    output = tmp_path_factory.mktemp("gpu-runs")
    codes = []
    for epochs, resume in (("1", []), ("2", ["--resume", "last"])):
        with pytest.raises(SystemExit) as exit_info:
            run_main(load_script("train").main, [*QUICK_VGG, *GPU, "--data-dir", str(tiny_data), "--epochs", epochs,
                                                  "--output-dir", str(output), *resume])
        codes.append(exit_info.value.code)
    assert codes == [0, 0]
    yield output / "vgg16" / "version_0"
    shutil.rmtree(output, ignore_errors=True)


def test_auto_precision_is_bf16_with_channels_last_on_the_gpu(gpu_run):
    config = yaml.safe_load((gpu_run / "config.resumed.yaml").read_text())
    assert config["accelerator"] == "gpu" and config["channels_last"] is True
    assert config["precision"] == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")


def test_train_resume_test_on_the_gpu_and_the_checkpoint_loads_on_the_cpu(cli, gpu_run, tiny_data, tmp_path):
    last = torch.load(gpu_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # 2 epochs of 2 steps: the resume continued, not restarted
    report = tmp_path / "cpu.json"
    result = cli("test", "--ckpt", str(gpu_run / "checkpoints" / "best.ckpt"), "--accelerator", "cpu",
                 "--data-dir", str(tiny_data), "--json", str(report))
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["images"] == 50


def test_device_data_path_builds_batches_on_the_gpu(tiny_data):
    datamodule = CIFAR10DataModule(tiny_data, batch_size=8, val_size=20, download=False, data_path="auto",
                                   channels_last=True, device="cuda", num_workers=0)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.is_cuda and labels.is_cuda and images.is_contiguous(memory_format=torch.channels_last)


def test_compiled_run_on_the_gpu_writes_checkpoints_that_load_uncompiled(cli, tiny_data, tmp_path):
    result = cli("train", *QUICK_VGG, *GPU, "--data-dir", str(tiny_data), "--epochs", "1", "--compile",
                 "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    state = torch.load(tmp_path / "vgg16" / "version_0" / "checkpoints" / "best.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    model = build_model("vgg16")
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})


def test_lr_find_on_the_gpu(cli, tiny_data, tmp_path, monkeypatch):
    from run import lr_find

    monkeypatch.setattr(lr_find, "STEPS", 20)
    result = cli("train", *QUICK_VGG, *GPU, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--find-lr",
                 "--batch-size", "4")
    assert result.code == 0, result.err
    suggestion = json.loads((tmp_path / "vgg16" / "lr_find" / "version_0" / "lr_find.json").read_text())["suggestion"]
    assert lr_find.MIN_LR <= suggestion <= lr_find.MAX_LR


def test_grad_cam_on_the_gpu():
    from models.explain import grad_cam

    model = build_model("resnet50").cuda()
    maps = grad_cam(model, torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([1, 2], device="cuda"))
    assert maps.is_cuda and maps.shape == (2, 32, 32)
