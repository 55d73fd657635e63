"""The fast step: compiled and channels_last backbones keep plain checkpoints; the progress bar waits rarely."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from run.hardware import Hardware
from models import prepare_backbone
from run.hardware import use_channels_last
from lit_modules import ImageClassifier
from callbacks.progress import ThrottledProgressBar
from models import build_model


@pytest.mark.slow
def test_compiled_backbone_keeps_the_plain_state_dict_keys() -> None:
    plain = build_model("resnet50")
    compiled = prepare_backbone(build_model("resnet50"), channels_last=False, compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    module = ImageClassifier("resnet50", backbone=compiled)
    assert not any("_orig_mod" in key for key in module.state_dict())


def test_channels_last_weights_load_into_a_plain_model() -> None:
    torch.manual_seed(0)
    nhwc = prepare_backbone(build_model("vgg16"), channels_last=True, compile=False)
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_model("vgg16")
    plain.load_state_dict(nhwc.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    nhwc.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images.contiguous(memory_format=torch.channels_last)), plain(images))


def test_channels_last_is_on_by_default_only_on_cuda() -> None:
    gpu, cpu, cpu_bf16 = Hardware("gpu", 1, "bf16-mixed"), Hardware("cpu", 1, "32-true"), Hardware("cpu", 1, "bf16-mixed")
    assert use_channels_last(None, gpu) and use_channels_last(None, cpu_bf16) and not use_channels_last(None, cpu)
    assert use_channels_last(True, cpu) and not use_channels_last(False, gpu)


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("bar, most_reads", [(ThrottledProgressBar(metrics_interval=3600), 3), (RichProgressBar(), None)])
def test_progress_bar_reads_metrics_rarely(monkeypatch: pytest.MonkeyPatch, bar: RichProgressBar, most_reads: int | None) -> None:
    # Every read of the logged metrics turns GPU tensors into numbers, waiting for the GPU.
    reads = []
    read = RichProgressBar.get_metrics
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, *args: reads.append(1) or read(self, *args))
    data = DataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    trainer.fit(_Regression(), train_dataloaders=data)
    if most_reads is None:  # the stock bar reads after every one of the 20 steps
        assert len(reads) >= 20
    else:
        assert 1 <= len(reads) <= most_reads


@pytest.mark.slow
def test_compiled_training_writes_checkpoints_that_load_uncompiled(cli, tiny_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "runs"
    result = cli("train", "--model", "resnet50", "--compile", "--epochs", "1", "--limit-train-batches", "2",
                 "--data-dir", str(tiny_data), "--output-dir", str(output), "--accelerator", "cpu", "--workers", "0",
                 "--batch-size", "20", "--val-size", "20", "--eval-batch-size", "50")
    assert result.code == 0, result.err
    best = output / "resnet50" / "version_0" / "checkpoints" / "best.ckpt"
    keys = torch.load(best, weights_only=True, map_location="cpu")["state_dict"]
    assert keys and not any("_orig_mod" in key for key in keys)
    plain = build_model("resnet50")
    plain.load_state_dict({k.removeprefix("backbone."): v for k, v in keys.items()}, strict=True)
    report = tmp_path / "result.json"
    result = cli("test", "--ckpt", str(best), "--data-dir", str(tiny_data), "--accelerator", "cpu", "--workers", "0",
                 "--json", str(report))
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["images"] == 50
