"""Work between epochs that leaves the device idle: checkpoints written in the background, last.ckpt and the
validation confusion matrix throttled for runs whose epochs take seconds."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import dashboards
from callbacks.checkpoints import BackgroundCheckpointIO, NamedCheckpoint
from callbacks.dashboards import Dashboards
from callbacks.checkpoints import AtomicCheckpointIO


class _GatedIO(CheckpointIO):
    """Saves with torch.save once ``gate`` is set; records the order of the paths written."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.gate = threading.Event()
        self.written: list[str] = []
        self.fail_on = fail_on

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.gate.wait(timeout=30)
        if self.fail_on and str(path).endswith(self.fail_on):
            raise OSError(28, "No space left on device")
        torch.save(checkpoint, path)
        self.written.append(Path(path).name)

    def load_checkpoint(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink()


def test_a_save_returns_before_the_write_and_holds_the_values_of_its_moment(tmp_path):
    """save_checkpoint hands the write to a thread; tensors changed afterwards do not reach the file."""
    inner = _GatedIO()
    io = BackgroundCheckpointIO(inner)
    weights = torch.zeros(3)
    io.save_checkpoint({"w": weights}, tmp_path / "a.ckpt")
    weights += 1  # training goes on while the file is being written
    assert not (tmp_path / "a.ckpt").exists()
    inner.gate.set()
    io.wait()
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.zeros(3))
    io.teardown()


def test_at_most_max_pending_saves_are_queued_then_a_save_waits_for_the_oldest(tmp_path):
    inner = _GatedIO()
    io = BackgroundCheckpointIO(inner, max_pending=2)
    io.save_checkpoint({"n": torch.tensor(1)}, tmp_path / "1.ckpt")
    io.save_checkpoint({"n": torch.tensor(2)}, tmp_path / "2.ckpt")
    third = threading.Thread(target=io.save_checkpoint, args=({"n": torch.tensor(3)}, tmp_path / "3.ckpt"))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # blocked: two saves in flight
    inner.gate.set()
    third.join(timeout=30)
    io.teardown()
    assert inner.written == ["1.ckpt", "2.ckpt", "3.ckpt"]


def test_a_load_or_removal_of_a_queued_file_waits_for_its_write(tmp_path):
    """Lightning's Tuner.lr_find saves its temporary checkpoint and restores it at once: the load waits
    for that file's write (a slow disk made it a FileNotFoundError), a removal too."""
    inner = _GatedIO()
    io = BackgroundCheckpointIO(inner)
    io.save_checkpoint({"n": torch.tensor(7)}, tmp_path / "a.ckpt")
    threading.Timer(0.3, inner.gate.set).start()
    assert int(io.load_checkpoint(tmp_path / "a.ckpt")["n"]) == 7
    inner.gate.clear()
    io.save_checkpoint({"n": torch.tensor(8)}, tmp_path / "b.ckpt")
    threading.Timer(0.3, inner.gate.set).start()
    io.remove_checkpoint(tmp_path / "b.ckpt")
    assert not (tmp_path / "b.ckpt").exists()
    io.teardown()


def test_a_failed_background_save_is_raised_not_lost(tmp_path):
    """A full disk during a background save: the user's one-line error at the next save, the previous file intact."""
    target = tmp_path / "last.ckpt"
    torch.save({"n": torch.tensor(0)}, target)
    inner = _GatedIO(fail_on="last.ckpt")
    inner.gate.set()
    io = BackgroundCheckpointIO(inner)
    io.save_checkpoint({"n": torch.tensor(1)}, target)
    with pytest.raises(OSError, match="No space left"):
        io.wait()
    assert int(torch.load(target, weights_only=True)["n"]) == 0
    io.teardown()


def test_atomic_checkpoint_errors_reach_the_caller_through_the_background_writer(tmp_path, monkeypatch):
    from base import errors

    io = BackgroundCheckpointIO(AtomicCheckpointIO())
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "best.ckpt")
    with pytest.raises(errors.UserError, match="cannot write checkpoint .*best.ckpt.*No space left"):
        io.teardown()
    assert list(tmp_path.iterdir()) == []  # no temporary file left


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("interval, saved_after", [(0.0, [1, 2, 3, 4]), (3600.0, [1, 4])])
def test_last_checkpoint_waits_min_interval_but_always_saves_the_final_epoch(tmp_path, interval, saved_after):
    """min_interval_s skips an epoch's save when the previous is recent; the first and the final epoch always save."""
    last = NamedCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, enable_version_counter=False,
                           min_interval_s=interval)
    saves: list[int] = []
    real = last._save_checkpoint
    last._save_checkpoint = lambda trainer, path: saves.append(trainer.current_epoch + 1) or real(trainer, path)
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[last])
    trainer.fit(_Tiny(), train_dataloaders=data)
    assert saves == saved_after
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3


def test_validation_confusion_matrix_is_drawn_when_it_costs_at_most_its_share(monkeypatch):
    """First and last epoch always; in between only when drawing cost <= 5 % of the time since the last one."""
    now = [100.0]
    monkeypatch.setattr(dashboards.time, "monotonic", lambda: now[0])
    board = Dashboards([str(i) for i in range(10)])
    trainer = SimpleNamespace(max_epochs=10, current_epoch=0, should_stop=False)
    assert board._draw_validation_now(trainer)  # nothing drawn yet
    board._drawn_at, board._draw_s = 100.0, 0.5
    now[0], trainer.current_epoch = 102.0, 1  # a 2-second epoch: 0.5 s is 25 % of it
    assert not board._draw_validation_now(trainer)
    now[0] = 110.0  # 10 s since: 5 %
    assert board._draw_validation_now(trainer)
    now[0], trainer.current_epoch = 101.0, 9  # the last epoch
    assert board._draw_validation_now(trainer)
