"""TensorBoard dashboards (callbacks/dashboards.py, train.py, test.py --log-to-run) and the console.

One tiny CPU run of train.py writes the dashboards; the tests read them back as TensorBoard does,
with its EventAccumulator.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from robustness import assert_one_line_error
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassConfusionMatrix

from datamodules import CLASSES, CIFAR10DataModule
from datamodules.cifar10 import eval_transform
from callbacks.dashboards import ConfidentMistakes, ConfusionMatrix, to_rgb
from callbacks.progress import ThrottledProgressBar
from callbacks.checkpoints import FiniteLossGuard

# 50 of the 120 tiny training images held out, so that every class has validation images.
QUICK = ["--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "50", "--eval-batch-size", "50",
         "--log-every-n-steps", "1"]
EPOCHS = 2
IMAGE_TAGS = {"confusion_matrix/val", "confusion_matrix/test", "misclassified/test"}


def read_events(path: Path) -> EventAccumulator:
    """Everything TensorBoard shows for a run folder or one events file, none of it sampled away."""
    accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, str]:
    """One vgg16 run of 2 epochs on the tiny data: (its run folder, what it printed)."""
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main(["--model", "vgg16", "--data-dir", str(tiny_data), "--epochs", str(EPOCHS),
                                            *QUICK, "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    yield output / "vgg16" / "version_0", printed.getvalue()
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


@pytest.mark.slow
def test_training_logs_per_class_validation_accuracy_every_epoch(run: tuple[Path, str], tiny_data: Path) -> None:
    events = read_events(run[0])
    acc_val = events.Scalars("acc/val")
    assert len(acc_val) == EPOCHS
    per_class = {name: events.Scalars(f"acc_per_class/val/{name}") for name in CLASSES}
    for values in per_class.values():
        assert [event.step for event in values] == [event.step for event in acc_val]  # beside acc/val
    # Weighted by each class's validation images, the classes' accuracies give the overall one.
    datamodule = CIFAR10DataModule(tiny_data, val_size=50, seed=0, download=False)
    datamodule.setup("fit")
    images_per_class = torch.bincount(datamodule.val_set.labels, minlength=len(CLASSES))
    for epoch, overall in enumerate(acc_val):
        correct = sum(int(n) * per_class[name][epoch].value for name, n in zip(CLASSES, images_per_class))
        assert correct / 50 == pytest.approx(overall.value, abs=1e-6)


def test_training_draws_confusion_matrices_and_misclassified_images(run: tuple[Path, str]) -> None:
    events = read_events(run[0])
    assert IMAGE_TAGS <= set(events.Tags()["images"])
    # One validation matrix per epoch, at the steps of acc/val; the test pictures once.
    assert [event.step for event in events.Images("confusion_matrix/val")] == [e.step for e in events.Scalars("acc/val")]
    assert len(events.Images("confusion_matrix/test")) == 1 and len(events.Images("misclassified/test")) == 1
    assert events.Images("confusion_matrix/test")[0].step == events.Scalars("acc/test")[0].step
    for tag in IMAGE_TAGS:
        pixels = decode(events.Images(tag)[-1])
        # Big enough to read ten class names, and a picture rather than a blank canvas.
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 400, (tag, pixels.shape)
        assert pixels.std() > 10, tag


def test_training_records_hyperparameters_with_final_results(run: tuple[Path, str]) -> None:
    events = read_events(run[0])
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"hp/best_val_acc", "hp/best_epoch", "hp/test_acc", "hp/test_loss"} <= metrics
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["model"].string_value == "vgg16"
    assert session.hparams["epochs"].number_value == EPOCHS and session.hparams["lr"].number_value == pytest.approx(1e-3)
    # The HParams tab reads each metric from the scalar of that name: they hold the run's results.
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(events.Scalars("acc/test")[-1].value)
    assert events.Scalars("hp/best_val_acc")[-1].value == pytest.approx(max(e.value for e in events.Scalars("acc/val")))
    assert events.Scalars("hp/best_epoch")[-1].value in range(1, EPOCHS + 1)


def test_summary_names_the_best_epoch_counted_from_one(run: tuple[Path, str]) -> None:
    run_dir, printed = run
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    line = next(line for line in printed.splitlines() if line.startswith("best epoch"))
    assert f" {best['epoch'] + 1} of {EPOCHS} (counting from 1), acc/val " in line
    events = read_events(run_dir)
    assert events.Scalars("hp/best_epoch")[-1].value == best["epoch"] + 1


def test_output_that_is_not_a_terminal_gets_one_line_per_epoch(run: tuple[Path, str]) -> None:
    # The fixture's stdout is a StringIO, as a log file would be: the live bar draws nothing there.
    run_dir, printed = run
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch {n}/{EPOCHS}" for n in range(1, EPOCHS + 1)]
    events = read_events(run_dir)
    for number, (line, acc_val, loss_train) in enumerate(zip(lines, events.Scalars("acc/val"), events.Scalars("loss/train_epoch")), 1):
        parts = line.split(" | ")
        # Every epoch but the last says how long the rest of the run will take.
        assert parts[-1].startswith("run eta ") == (number < EPOCHS), line
        if number < EPOCHS:
            assert re.fullmatch(r"run eta \d+:\d\d", parts.pop()), line
        line = " | ".join(parts)
        fields = dict(field.split(" ", 1) for field in parts)
        assert fields["val"].endswith(f"acc {100 * acc_val.value:.2f} %"), line
        assert fields["train"].startswith(f"loss {loss_train.value:.4f} acc "), line
        assert fields["lr"] and float(fields["lr"]) > 0, line
        rate, seconds = line.split(" | ")[-2:]
        assert rate.endswith(" img/s") and float(rate.split()[0].replace(",", "")) > 0, line
        assert seconds.endswith(" s") and float(seconds[:-2]) > 0, line


@pytest.mark.slow
def test_test_py_adds_its_results_to_the_run(cli, run: tuple[Path, str], tiny_data: Path, tmp_path: Path) -> None:
    # A copy of the run, so that the other tests read the run as train.py left it.
    run_dir = shutil.copytree(run[0], tmp_path / "runs" / "vgg16" / "version_0")
    before = set(run_dir.glob("events.out.tfevents.*"))
    best = run_dir / "checkpoints" / "best.ckpt"
    result = cli("test", "--ckpt", str(best), "--log-to-run", "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0")
    assert result.code == 0, result.err
    assert f"tensorboard --logdir {run_dir}" in result.out
    added = set(run_dir.glob("events.out.tfevents.*")) - before
    assert len(added) == 1
    events = read_events(added.pop())
    step = torch.load(best, weights_only=True, map_location="cpu")["global_step"]
    scalars = set(events.Tags()["scalars"])
    assert {"acc/test", "acc_top5/test", "loss/test"} | {f"acc_per_class/test/{name}" for name in CLASSES} <= scalars
    assert {"confusion_matrix/test", "misclassified/test"} <= set(events.Tags()["images"])
    # At the training step of the tested weights, so the points line up with the run's curves.
    assert {event.step for tag in scalars for event in events.Scalars(tag)} == {step}
    assert events.Images("confusion_matrix/test")[0].step == step
    # The same test set and weights as train.py's own final test: the same accuracy.
    assert events.Scalars("acc/test")[0].value == pytest.approx(read_events(run[0]).Scalars("acc/test")[0].value)


@pytest.mark.slow
def test_log_to_run_needs_a_checkpoint_inside_a_run(cli, run: tuple[Path, str], tiny_data: Path, tmp_path: Path) -> None:
    """test.py --log-to-run with a checkpoint outside any run folder, or not written by train.py."""
    loose = tmp_path / "best.ckpt"
    shutil.copy(run[0] / "checkpoints" / "best.ckpt", loose)
    result = cli("test", "--ckpt", str(loose), "--log-to-run", "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0")
    assert_one_line_error(result, "--log-to-run", "is not in a run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]

    # A course state dict dropped into a run's checkpoints folder has no step to be logged at.
    run_dir = shutil.copytree(run[0], tmp_path / "runs" / "vgg16" / "version_0")
    before = sorted(p.name for p in run_dir.iterdir())
    state_dict = run_dir / "checkpoints" / "course.pt"
    weights = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    torch.save({key.removeprefix("backbone."): value for key, value in weights.items()}, state_dict)
    result = cli("test", "--ckpt", str(state_dict), "--log-to-run", "--data-dir", str(tiny_data), "--accelerator",
                 "cpu", "--workers", "0")
    assert_one_line_error(result, "--log-to-run", "not a checkpoint written by train.py")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_confusion_matrix_counts_as_torchmetrics_does() -> None:
    generator = torch.Generator().manual_seed(1)
    ours, reference = ConfusionMatrix(10), MulticlassConfusionMatrix(10)
    for size in (50, 50, 7):
        logits, labels = torch.randn(size, 10, generator=generator), torch.randint(0, 10, (size,), generator=generator)
        ours.update(logits, labels)
        reference.update(logits, labels)
    assert torch.equal(ours.compute(), reference.compute()) and ours.compute().sum() == 107


def test_confident_mistakes_keeps_the_most_confident_wrong_answers_of_all_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(300, 3, 4, 4, generator=generator)
    logits = 3 * torch.randn(300, 10, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    kept = ConfidentMistakes(k=7)
    for start in range(0, 300, 64):  # uneven batches, the last one smaller than the others
        kept.update(images[start:start + 64], logits[start:start + 64], labels[start:start + 64])
    confidence, preds = logits.softmax(1).max(1)
    wrong = (preds != labels).nonzero().squeeze(1)
    expected = wrong[confidence[wrong].argsort(descending=True)[:7]]
    gathered = kept.gather(lambda tensor: tensor)  # one process: its tensors as they are
    torch.testing.assert_close(gathered["scores"], confidence[expected])
    torch.testing.assert_close(gathered["images"], images[expected])
    assert gathered["labels"].tolist() == labels[expected].tolist()
    assert gathered["preds"].tolist() == preds[expected].tolist()


def test_confident_mistakes_shows_no_right_answers() -> None:
    logits = torch.eye(10) * 5
    kept = ConfidentMistakes(k=4)
    kept.update(torch.zeros(10, 3, 2, 2), logits, torch.arange(10))  # all right
    kept.update(torch.ones(1, 3, 2, 2), logits[:1], torch.tensor([3]))  # one wrong
    gathered = kept.gather(lambda tensor: tensor)
    assert gathered["labels"].tolist() == [3] and gathered["preds"].tolist() == [0]


def test_misclassified_images_are_shown_in_their_original_colours() -> None:
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    shown = to_rgb(torch.stack([eval_transform()(image) for image in pixels]))
    np.testing.assert_allclose(shown * 255, pixels.permute(0, 2, 3, 1).numpy(), atol=1e-3)


class _SlowRegression(L.LightningModule):
    """Each step takes at least ``seconds``: a known upper bound for the throughput."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.seconds = seconds

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(self.seconds)
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_progress_bar_shows_throughput_and_epochs_from_one_without_v_num(tmp_path: Path) -> None:
    guard = FiniteLossGuard()  # whose reads of the loss the bar's throughput is measured between
    bar = ThrottledProgressBar(metrics_interval=0.1, loss_guard=guard)
    shown: list[dict] = []
    read = bar.get_metrics
    bar.get_metrics = lambda *args: shown.append(read(*args)) or shown[-1]  # what the bar displays
    data = DataLoader(TensorDataset(torch.randn(80, 4), torch.randn(80, 1)), batch_size=4)  # 20 steps
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, guard], log_every_n_steps=2)
    trainer.fit(_SlowRegression(seconds=0.02), train_dataloaders=data)
    assert shown and all("v_num" not in metrics for metrics in shown)
    rates = [float(metrics["img/s"].replace(",", "")) for metrics in shown if "img/s" in metrics]
    assert rates, shown
    # 4 images per step of at least 20 ms: at most 200 images/s, and not far below on an idle machine.
    assert all(0 < rate <= 200 for rate in rates), rates
    assert bar._get_train_description(0).strip() == "Epoch 1/2"


def test_curves_script_reads_one_row_per_epoch(run: tuple[Path, str]) -> None:
    from benchmarks.curves import TAGS, epoch_curves

    curves = epoch_curves(run[0])
    assert sorted(curves) == list(range(1, EPOCHS + 1))
    acc_val = [event.value for event in read_events(run[0]).Scalars("acc/val")]
    assert [curves[epoch]["acc/val"] for epoch in sorted(curves)] == acc_val
    assert all(set(values) == set(TAGS) for values in curves.values())


def test_curves_script_reads_one_row_per_logging_step(run: tuple[Path, str]) -> None:
    """--steps: the batch loss and the gradient norm at every logging step, as logged."""
    from benchmarks.curves import STEP_TAGS, step_curves

    curves = step_curves(run[0])
    events = read_events(run[0])
    losses = events.Scalars("loss/train_step")
    assert sorted(curves) == [event.step for event in losses] and len(losses) > 1
    # lr too where the run logs it per step (a per-step schedule; this course run's is per epoch).
    assert all({"loss/train_step", "grad_norm/train"} <= set(values) <= set(STEP_TAGS) for values in curves.values())
    assert [curves[event.step]["grad_norm/train"] for event in events.Scalars("grad_norm/train")] == [
        event.value for event in events.Scalars("grad_norm/train")]
    assert all(values["grad_norm/train"] > 0 for values in curves.values())


def test_curves_script_steps_are_the_logging_steps_only(tmp_path: Path) -> None:
    """--steps: one row per loss/train_step point, however the other tags were logged (a per-epoch
    rate at each epoch's start; a run without gradient norms)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        for step, loss, norm in ((4, 2.5, 9.0), (9, 2.0, None), (14, 1.5, 3.0)):
            writer.add_scalar("loss/train_step", loss, step)
            if norm is not None:
                writer.add_scalar("grad_norm/train", norm, step)
        for step in (0, 9, 10):
            writer.add_scalar("lr", 0.1, step)
    result = subprocess.run([sys.executable, "benchmarks/curves.py", "--steps", str(tmp_path)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["step\tloss/train_step\tgrad_norm/train\tlr", "4\t2.5\t9\t", "9\t2\t\t0.1",
                                          "14\t1.5\t3\t"]


def test_curves_script_names_a_folder_without_events(tmp_path: Path) -> None:
    """A folder that is not a run (a typo, the checkpoints folder): one error line, exit code 2."""
    (tmp_path / "checkpoints").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "checkpoints"):
        result = subprocess.run([sys.executable, "benchmarks/curves.py", str(folder)], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.startswith("curves.py: error:") and len(result.stderr.splitlines()) == 1, result.stderr
        assert str(folder) in result.stderr and "no TensorBoard events" in result.stderr
