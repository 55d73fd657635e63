"""Training steps never make the host wait for the device: host reads of tensor values counted on the CPU.

On a GPU every read of a tensor's value on the host (``item``, ``tolist``, ``bool``, ``float``,
``int``, ``cpu``, ``numpy``) waits for all queued kernels, so the GPU runs dry while the host
queues the next step. On the CPU the same calls happen, so counting them here finds the waits a
GPU run would have (tests/test_gpu.py checks the same with CUDA's own sync detector).
"""
from __future__ import annotations

import threading
import traceback
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICK
from lightning.pytorch.callbacks import Callback

from callbacks.recipes import WeightEMA
from lit_modules import ImageClassifier

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
LOG_EVERY = 5
# 100 training images at batch 4: 25 steps an epoch, 2 epochs.
STEPS_FLAGS = ["--model", "vgg16", *QUICK, "--batch-size", "4", "--epochs", "2",
               "--log-every-n-steps", str(LOG_EVERY)]


class _HostReads(Callback):
    """Counts host reads of tensor values between the start of one training step and the start of the
    next (Lightning's per-step logging and every callback's batch-end hooks included), leaving out
    what happens before validation and at the epoch's end."""

    def __init__(self) -> None:
        self.steps = 0
        self.reads: Counter[str] = Counter()
        self.counting = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counting = True
        self.steps += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self.counting = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.counting = False

    def on_train_end(self, trainer, pl_module) -> None:
        self.counting = False


@pytest.fixture
def count_host_reads(monkeypatch, extra_callback):
    """Every train.py run in this test counts its host reads in the returned counter callback."""
    counter = _HostReads()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            # The training loop's thread: checkpoints are written (and checked) by a thread of their own.
            if counter.counting and threading.current_thread() is threading.main_thread():
                caller = traceback.extract_stack(limit=3)[0]
                counter.reads[f"{_name} at {caller.filename.rsplit('/', 2)[-2:]}:{caller.lineno}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    extra_callback(first=[lambda: counter])
    return counter


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param([], id="course"),
        pytest.param(["--config", "configs/vgg16_fast.yaml", "--time-to-accuracy", "0.9"], id="fast-ema-tta"),
        pytest.param(["--optimizer", "sgd", "--lr", "0.01", "--gradient-clip-val", "1"], id="clipped"),
    ],
)
def test_training_steps_read_the_device_once_per_logging_interval(cli, tiny_data, tmp_path, count_host_reads, recipe):
    """At most one host read of a tensor value per --log-every-n-steps training steps (loss and gradient
    norm logging and the divergence check share it), with the course recipe, the fast one (EMA, TTA,
    one-cycle) and a clipped one."""
    result = cli("train", *recipe, *STEPS_FLAGS, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    counter = count_host_reads
    assert counter.steps == 50  # 2 epochs of 25 steps
    total = sum(counter.reads.values())
    assert total <= counter.steps // LOG_EVERY, dict(counter.reads)


@pytest.mark.slow
def test_step_loss_is_logged_every_interval_from_the_shared_read(cli, tiny_data, tmp_path):
    """loss/train_step still reaches TensorBoard at every --log-every-n-steps steps, at Lightning's step numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cli("train", *STEPS_FLAGS, "--epochs", "1", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    events = EventAccumulator(str(tmp_path / "vgg16" / "version_0")).Reload()
    steps = [event.step for event in events.Scalars("loss/train_step")]
    assert steps == [4, 9, 14, 19, 24]  # global steps 5, 10, ... logged one lower, as Lightning logs them
    assert all(event.value > 0 for event in events.Scalars("loss/train_step"))


def test_ema_lives_on_the_strategy_device_not_where_the_module_is_at_setup():
    """Callbacks are set up before the strategy moves the module: the average is built on the strategy's
    device (here a device the module never was on), so a GPU run averages on the GPU."""
    module = ImageClassifier("vgg16")
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    ema = WeightEMA(0.9)
    ema.setup(trainer, module, "fit")
    assert next(module.parameters()).device.type == "cpu"
    devices = {tensor.device.type for tensor in [*ema._average_model.parameters(), *ema._average_model.buffers()]}
    assert devices == {"meta"}


def test_ema_update_reads_nothing_from_the_device(monkeypatch):
    """An EMA update decides by a Python count: no tensor value is read on the host (torch's
    AveragedModel reads its counter twice per update)."""
    module = ImageClassifier("resnet50")
    ema = WeightEMA(0.998)
    ema.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), module, "fit")
    reads = []
    for name in READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: reads.append(_n) or _real(self, *a, **k))
    for _ in range(3):
        ema._average_model.update_parameters(module)
    monkeypatch.undo()
    assert reads == []
    assert ema._average_model.updates == 3 and int(ema._average_model.n_averaged) == 3


def test_checkpoint_finite_check_reads_the_device_once(monkeypatch):
    """The check on the way into a checkpoint reads one stacked answer per device, not one per tensor,
    and still names every non-finite tensor, in the checkpoint's order."""
    from callbacks.checkpoints import non_finite_keys

    tensors = {f"layer{i}.weight": torch.randn(3) for i in range(50)}
    tensors["layer7.weight"][1] = float("nan")
    tensors["layer31.weight"][0] = float("inf")
    tensors["steps"] = torch.tensor(3)  # not floating point: not checked
    reads = []
    for name in READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: reads.append(_n) or _real(self, *a, **k))
    bad = non_finite_keys(tensors)
    monkeypatch.undo()
    assert bad == ["layer7.weight", "layer31.weight"]
    assert reads == ["tolist"]


def test_per_class_test_accuracy_counts_without_reading_the_device(monkeypatch):
    """Per-class test accuracy: no host read per batch (torchmetrics' counts use bincount, which waits
    on CUDA), and the same values as torchmetrics' MulticlassAccuracy(average=None)."""
    from torchmetrics.classification import MulticlassAccuracy

    from lit_modules.classifier import PerClassAccuracy

    ours, theirs = PerClassAccuracy(10), MulticlassAccuracy(10, average=None)
    batches = [(torch.randn(16, 10), torch.randint(0, 9, (16,))) for _ in range(3)]  # class 9 never seen
    for logits, labels in batches:
        theirs.update(logits, labels)
    reads = []
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: reads.append("bincount"))
    for name in READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: reads.append(_n) or _real(self, *a, **k))
    for logits, labels in batches:
        ours.update(logits, labels)
    monkeypatch.undo()
    assert reads == []
    assert torch.allclose(ours.compute(), theirs.compute())
