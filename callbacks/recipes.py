"""Pieces of the fast recipes (configs/*_fast.yaml): EMA of the weights and the time-to-accuracy benchmark.

* :class:`WeightEMA` is Lightning's own weight-averaging callback doing an EMA (see its
  docstring for what differs from ``EMAWeightAveraging``): the averaged weights are what
  validation, the saved checkpoints' ``state_dict`` and every later test see; the raw weights
  and the averaging state travel in the checkpoint only so that ``--resume`` continues exactly.
* :class:`TimeToAccuracy` evaluates the *test* set after every epoch and records the training
  time at which its accuracy first reaches a target. It exists for one benchmark (how long a
  recipe takes to reach, say, 93 %), never to choose a checkpoint or a hyper-parameter: model
  selection stays on the held-out validation split.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import AveragedModel
from torchmetrics.classification import MulticlassAccuracy


def ema_weight(decay: float, updates: int) -> float:
    """The weight of the current weights in the EMA's next update, ``1 - min(decay, (1 + n) / (10 + n))``.

    ``n`` is the number of updates already averaged (the first update copies the weights). The
    warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule. Without it the
    average of a short run, and of the first epochs of a long one, is mostly the random initial
    weights: with a constant 0.998 they still weigh 0.998^88 = 84 % after the first epoch of
    configs/vgg16_fast.yaml (88 steps), so its early validation, and a short run's test, would
    see an almost untrained model. The rule reaches 0.998 after about 4,500 updates.
    """
    return 1.0 - min(decay, (1 + updates) / (10 + updates))


class DeviceEMA(AveragedModel):
    """PyTorch's ``AveragedModel`` as an EMA whose update never waits for the device.

    ``AveragedModel.update_parameters`` reads its ``n_averaged`` counter, a tensor on the
    average's device, twice per update (``bool(n_averaged == 0)``, ``n_averaged > 0``): on a GPU
    two host waits per training step. Here a Python count (:attr:`updates`) decides, and gives
    the decay of :func:`ema_weight` as a plain number, so an update is a handful of foreach
    kernels for all tensors: one ``lerp`` over the floating-point ones, one copy over the integer
    buffers (BatchNorm's ``num_batches_tracked``, which cannot be averaged and follow the model).
    ``n_averaged`` is still counted, on the device, so checkpoints keep torch's layout; it is read
    once, when a checkpoint is loaded.
    """

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        floats = [(a, c.detach()) for a, c in zip(averaged, current) if a.is_floating_point()]
        others = [(a, c.detach()) for a, c in zip(averaged, current) if not a.is_floating_point()]
        if self.updates == 0:
            floats, others = [], floats + others
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], ema_weight(self.decay, self.updates))
        if others:
            torch._foreach_copy_([a for a, _ in others], [c for _, c in others])
        self.n_averaged += 1
        self.updates += 1

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)
        return result


class WeightEMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimiser step.

    Lightning's ``WeightAveraging`` callback, the base of its ``EMAWeightAveraging``, averaging
    with :class:`DeviceEMA` on the training device. ``EMAWeightAveraging`` itself hard-wires
    ``get_ema_avg_fn``: a constant decay (see :func:`ema_weight` for the warm-up used here) and
    three or four kernels per tensor, over a thousand launches per step for resnet50's 373
    parameter and buffer tensors, where the foreach version launches a handful.

    What Lightning's callback does, and this project relies on:

    * validation runs on the averaged weights (swapped in for the validation epoch), so
      ``acc/val`` and the choice of ``best.ckpt`` are the averaged model's;
    * every checkpoint saved while fitting holds the averaged weights under ``state_dict``, which
      is all that ``test.py``, ``predict.py``, ``export.py`` and ``--weights`` read; the raw
      weights go under ``current_model_state`` and the average's counter under
      ``averaging_state``, and a resumed fit puts both back (exact resume);
    * when fitting ends the averaged weights are copied into the module.

    Chosen here:

    * The average lives on the strategy's device. Lightning builds it in ``setup`` on
      ``pl_module.device``, but callbacks are set up before the strategy moves the module, so on
      a GPU the average would stay on the CPU and every step would copy all weights there.
    * BatchNorm's running statistics are averaged like the weights (``use_buffers=True``). The
      swap exchanges buffers too, and without averaging them the averaged weights would be
      evaluated with the raw weights' statistics; their moving average is what timm's
      ``ModelEmaV2`` uses as well.
    * Loading a checkpoint outside fitting (``trainer.test(ckpt_path=...)`` after training) keeps
      the module at the checkpoint's ``state_dict``. The stock callback, whose average survives
      from the fit, would load ``current_model_state`` instead, so ``train.py``'s final test
      would evaluate the raw weights while ``test.py`` evaluates the averaged ones.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True)
        self.decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = DeviceEMA(pl_module, self.decay, trainer.strategy.root_device)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class TimeToAccuracy(Callback):
    """Test accuracy after every epoch, and the training time when it first reaches ``target``.

    A benchmark, not a training aid: it reads the test set, which nothing else touches before
    the final test, and its figures are only reported. It evaluates at the end of each
    validation epoch, with the weights and test-time augmentation that validation used (the
    averaged weights under :class:`WeightEMA`, hence it must come before that callback in the
    Trainer's list: the average is swapped out again in the same hook).

    Times are wall-clock seconds since training started (``on_train_start``: data loaded, model
    on the device, the sanity check done; ``startup_s`` is the time those took since the fit's
    setup), waiting for the device before each reading, and exclude the time of these extra test
    evaluations. They include validation and checkpoint writing, which a real run pays too. The
    first epoch also pays one-off costs (``torch.compile``, cuDNN's autotuning, memory
    allocation); ``warmup_s`` estimates them as the first epoch's time minus the median of the
    others. A resumed run continues the clock and the curve: both are saved in every checkpoint
    (:meth:`state_dict`), and the time between a stop and its resume does not count (``resumes``
    says how many there were; ``startup_s`` is the first start's).
    """

    def __init__(self, target: float) -> None:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target accuracy must be in (0, 1], got {target}")
        self.target = target
        self.epochs: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None
        self._metric: MulticlassAccuracy | None = None
        self._loader: Any = None
        self._setup_at = 0.0
        self._start: float | None = None
        self._excluded = 0.0
        self._device = torch.device("cpu")
        self._saved: dict[str, Any] | None = None  # what a resumed run's checkpoint recorded
        self.startup_s: float | None = None
        self.resumes = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._setup_at = time.perf_counter()
        self._device = trainer.strategy.root_device
        names = [type(callback).__name__ for callback in trainer.callbacks]
        mine = trainer.callbacks.index(self)
        late = [names[i] for i, cb in enumerate(trainer.callbacks) if isinstance(cb, WeightAveraging) and i < mine]
        if late:
            raise ValueError(f"TimeToAccuracy must come before {late[0]} in the Trainer's callbacks: {names}")
        self._metric = MulticlassAccuracy(pl_module.dataset.num_classes, average="micro").to(trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self._now()
        self._excluded = 0.0
        saved, self._saved = self._saved, None
        if saved is None:
            self.epochs, self.reached, self.resumes = [], None, 0
            self.startup_s = now - self._setup_at
            self._start = now
            return
        self.epochs, self.reached = list(saved["epochs"]), saved["reached"]
        self.startup_s, self.resumes = saved["startup_s"], saved["resumes"] + 1
        self._start = now - saved["train_s"]

    def state_dict(self) -> dict[str, Any]:
        # Saved with every checkpoint; a resumed run continues from it (on_train_start).
        return {"epochs": list(self.epochs), "reached": self.reached, "train_s": self._elapsed(self._now()),
                "startup_s": self.startup_s, "resumes": self.resumes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Kept until the fit starts: trainer.test also loads the state of the checkpoint it tests,
        # which must not replace the finished run's record.
        self._saved = dict(state_dict)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        now = self._now()
        elapsed = self._elapsed(now)
        accuracy = self._evaluate(trainer, pl_module)
        self._excluded += self._now() - now
        record = {"epoch": trainer.current_epoch + 1, "train_s": elapsed, "test_acc": accuracy}
        self.epochs.append(record)
        if self.reached is None and accuracy >= self.target:
            self.reached = dict(record)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        assert self._metric is not None, "setup('fit') was not called"
        datamodule = trainer.datamodule
        if self._loader is None:
            datamodule.setup("test")
            # Built once: on the device path it copies the test images to the device.
            self._loader = datamodule.test_dataloader()
        device = trainer.strategy.root_device
        self._metric.reset()
        # Lightning runs validation's epoch-end hooks without gradients and in eval mode; autocast
        # is the precision plugin's, as in test_step.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for images, labels in self._loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                self._metric.update(pl_module._eval_logits(images), labels)
        # compute() sums the counts of every process under DDP.
        return float(self._metric.compute())

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _elapsed(self, now: float) -> float:
        """Training seconds at ``now`` (0 before the fit starts), these test evaluations excluded."""
        return 0.0 if self._start is None else now - self._start - self._excluded

    def report(self) -> dict[str, Any]:
        """What the run's results JSON records (see ``run/report.py``)."""
        durations = [b["train_s"] - a["train_s"] for a, b in zip([{"train_s": 0.0}, *self.epochs], self.epochs)]
        later = statistics.median(durations[1:]) if len(durations) > 1 else None
        return {
            "target": self.target,
            "startup_s": self.startup_s,
            "resumes": self.resumes,
            "reached": self.reached is not None,
            "epoch": self.reached["epoch"] if self.reached else None,
            "train_s": self.reached["train_s"] if self.reached else None,
            "first_epoch_s": durations[0] if durations else None,
            "median_later_epoch_s": later,
            "warmup_s": durations[0] - later if later is not None else None,
            "note": "test set evaluated after every epoch for this benchmark only; "
            "times exclude those evaluations",
            "epochs": self.epochs,
        }


def recipe_callbacks(ema_decay: float | None, time_to_accuracy: float | None) -> list[Callback]:
    """The callbacks that ``--ema-decay`` and ``--time-to-accuracy`` ask for, in the order they need."""
    callbacks: list[Callback] = []
    if time_to_accuracy is not None:
        callbacks.append(TimeToAccuracy(time_to_accuracy))
    if ema_decay is not None:
        callbacks.append(WeightEMA(ema_decay))
    return callbacks
