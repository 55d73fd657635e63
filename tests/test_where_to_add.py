"""docs/development.md's "Where to add things", the recipes that have no test of their own elsewhere."""
from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback


class EpochCounter(Callback):
    """A callback as docs/development.md describes one: what it needs comes in as constructor arguments."""

    def __init__(self, every: int) -> None:
        self.every, self.epochs = every, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every == 0:
            self.epochs.append(trainer.current_epoch + 1)


@pytest.mark.slow
def test_a_callback_added_to_build_callbacks_runs_in_every_training(cli, tiny_data, tmp_path, monkeypatch):
    """A callback added to run/build.py's build_callbacks list, reading an option from the RunConfig
    (here --checkpoint-every), is called by train.py's Trainer."""
    from run import build as run_build

    added: list[EpochCounter] = []
    real = run_build.build_callbacks

    def build_callbacks(config, run_dir, dataset):
        callbacks = real(config, run_dir, dataset)
        added.append(EpochCounter(every=config.checkpoint_every))
        callbacks.all.append(added[-1])
        return callbacks

    monkeypatch.setattr(run_build, "build_callbacks", build_callbacks)
    result = cli("train", "--model", "vgg16", "--epochs", "2", "--checkpoint-every", "2", "--batch-size", "20",
                 "--val-size", "20", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs"),
                 "--accelerator", "cpu", "--workers", "0")
    assert result.code == 0, result.err[-2000:]
    assert [counter.epochs for counter in added] == [[2]]
