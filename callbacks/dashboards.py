"""Dashboard pictures of a classifier: confusion matrices, per-class accuracy, misclassified images.

``Dashboards`` is a Lightning callback. It reads the logits and labels that the LightningModule's
``validation_step`` and ``test_step`` return, and writes, to each of the run's loggers (numbers to
all of them; pictures to those that show pictures, TensorBoard and MLflow, and none to CSV:
``callbacks.pictures``):

- ``acc_per_class/val/<class>``: each class's validation accuracy, every validation epoch;
- ``confusion_matrix/val``: the validation confusion matrix as an image, at the first and last
  validation epoch and in between whenever drawing it costs at most 5 % of the time since the
  last one (every epoch of a CPU run, every few of a fast GPU run);
- ``confusion_matrix/test`` and ``misclassified/test``: the test confusion matrix and a grid of
  the test images the model got wrong most confidently, at the end of testing.

Under DDP the matrices come from torchmetrics' ``compute()``, which adds up every process's
counts, and each process offers only its ``misclassified`` most confident mistakes, so a few
images cross between processes however large the test set. The pictures are drawn and written
by rank 0 alone. Nothing here runs during training steps, and what runs after each evaluation
batch only queues kernels (see ``ConfusionMatrix``): no value is read back to the host before
the epoch's end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from callbacks.pictures import figure_to_array, image_loggers, log_figure  # noqa: F401 (figure_to_array: importable here too)
from base.datasets import CIFAR10, DatasetInfo
from models.catalog import CATALOG
from models.explain import CAPTUM_MISSING, cam_layer, grad_cam, grad_cam_available

STAGES = ("val", "test")
# Above this many classes a confusion matrix is drawn as a heat map: no numbers in the cells, a
# tick label every few classes, and a figure of bounded size (100 classes would otherwise need a
# 64 x 56 inch picture of unreadable digits).
MANY_CLASSES = 20
# The heat map's size in inches, whatever the number of classes, and how many tick labels it shows at most.
_HEAT_MAP_SIZE = (11.0, 9.5)
_HEAT_MAP_TICKS = 20


def confusion_matrix_figure(matrix: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted) with each row as percentages.

    Rows are normalised so that classes with few images read as clearly as common ones; each
    row's image count is in its label, so the percentages can be turned back into counts. Up to
    :data:`MANY_CLASSES` classes every cell shows its percentage and every class is labelled;
    above, the matrix is a heat map of bounded size (:data:`_HEAT_MAP_SIZE`) with a label every
    ``ceil(n / 20)`` classes (every 5th of 100), each label led by its class index.
    """
    counts = matrix.detach().cpu().double()
    totals = counts.sum(dim=1)
    percent = (100 * counts / totals.clamp(min=1).unsqueeze(1)).numpy()
    n = len(class_names)
    many = n > MANY_CLASSES
    # Figures are built directly, not through pyplot: no GUI backend, no global figure registry.
    size = _HEAT_MAP_SIZE if many else (1.6 + 0.62 * n, 0.9 + 0.55 * n)
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    axes = figure.add_subplot()
    # Nearest: each cell one flat square, never blended with its neighbours when scaled down.
    image = axes.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    if many:
        every = -(-n // _HEAT_MAP_TICKS)
        ticks = list(range(0, n, every))
        axes.set_xticks(ticks, [f"{i} {class_names[i]}" for i in ticks], rotation=60, ha="right",
                        rotation_mode="anchor", fontsize=8)
        axes.set_yticks(ticks, [f"{i} {class_names[i]} ({int(totals[i]):,})" for i in ticks], fontsize=8)
        axes.set_xlabel(f"predicted class (every {every}th of {n} labelled)" if every > 1 else "predicted class")
    else:
        for row in range(n):
            for col in range(n):
                if counts[row, col] == 0:
                    continue  # empty cells stay blank, so the mistakes that happen stand out
                value = percent[row, col]
                text = f"{value:.0f}" if value >= 0.5 else "<1"  # a rare mistake is not "0"
                axes.text(col, row, text, ha="center", va="center", fontsize=9, color="white" if value > 50 else "black")
        axes.set_xticks(range(n), list(class_names), rotation=45, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(n), [f"{name} ({int(total):,})" for name, total in zip(class_names, totals)])
        axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (its images)")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.85, label="% of the true class's images")
    return figure


def to_rgb(
    images: torch.Tensor, mean: Sequence[float] = CIFAR10.mean, std: Sequence[float] = CIFAR10.std
) -> np.ndarray:
    """Normalised (N, 3, H, W) model inputs back to RGB in [0, 1], (N, H, W, 3), for display:
    ``x * std + mean`` with the statistics they were normalised with (default: CIFAR-10's)."""
    mean_ = torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_ = torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
    rgb = images.detach().float().cpu() * std_ + mean_
    return rgb.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def misclassified_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    preds: torch.Tensor,
    confidences: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    columns: int = 4,
    heat_maps: torch.Tensor | None = None,
    dataset: DatasetInfo = CIFAR10,
) -> Figure:
    """A grid of normalised images, each titled with its true class, the prediction and its probability.

    ``heat_maps`` (N, H, W) in [0, 1], when given, are drawn over the images: where the network
    saw the evidence for its (wrong) prediction (Grad-CAM, ``models/explain.py``). ``dataset``:
    the statistics the images were normalised with, to show them in their own colours.
    """
    n = len(images)
    rows = max(1, -(-n // columns))
    figure = Figure(figsize=(1.75 * columns, 0.45 + 1.95 * rows), dpi=100, layout="constrained")
    figure.suptitle(title, fontsize=10)
    for index, (image, label, pred, confidence) in enumerate(
        zip(to_rgb(images, dataset.mean, dataset.std), labels.tolist(), preds.tolist(), confidences.tolist())
    ):
        axes = figure.add_subplot(rows, columns, index + 1)
        # Nearest-neighbour keeps the 32x32 pixels sharp instead of blurring them when enlarged.
        axes.imshow(image, interpolation="nearest")
        if heat_maps is not None:
            axes.imshow(heat_maps[index].numpy(), cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
        axes.set_title(f"true: {class_names[label]}\npred: {class_names[pred]} {100 * confidence:.0f}%", fontsize=8.5)
        axes.axis("off")
    return figure


class ConfusionMatrix(MulticlassConfusionMatrix):
    """torchmetrics' ``MulticlassConfusionMatrix``, counting without waiting for the device.

    Its own ``update`` counts with ``torch.bincount``, which on CUDA reads the largest value back
    to the host to size its output: a wait at every evaluation batch. Summing one-hot rows of the
    (true, predicted) pairs gives the same integer counts with every shape known in advance.
    ``compute()``, ``reset()`` and the sum over processes are torchmetrics' own.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim == target.ndim + 1:  # logits or probabilities
            preds = preds.argmax(dim=1)
        n = self.num_classes
        self.confmat += F.one_hot(target * n + preds, n * n).sum(dim=0).view(n, n)


class ConfidentMistakes:
    """The ``k`` most confidently misclassified images seen so far, kept on the images' device.

    Every update is a fixed-size top-k over the kept images and the batch's, so it never waits
    for the device (no ``nonzero`` or boolean indexing, whose output size the host must read).
    Slots that hold no mistake (yet) have a score of -inf.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.preds: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def reset(self) -> None:
        self.images = self.labels = self.preds = self.scores = None

    def update(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        confidences, preds = logits.detach().float().softmax(dim=1).max(dim=1)
        # Right answers score -inf, so that any mistake outranks them.
        scores = torch.where(preds != labels, confidences, torch.full_like(confidences, float("-inf")))
        if self.scores is None:
            # Start from k empty slots: every update then has the same shapes, on every process.
            self.images = images.new_zeros((self.k, *images.shape[1:]))
            self.labels = labels.new_zeros(self.k)
            self.preds = preds.new_zeros(self.k)
            self.scores = scores.new_full((self.k,), float("-inf"))
        # The batch's own top k first, so that only 2k images are ever concatenated.
        top = scores.topk(min(self.k, len(scores))).indices
        scores = torch.cat([self.scores, scores[top]])
        keep = scores.topk(self.k).indices
        self.images = torch.cat([self.images, images[top].to(self.images.dtype)])[keep]
        self.labels = torch.cat([self.labels, labels[top]])[keep]
        self.preds = torch.cat([self.preds, preds[top]])[keep]
        self.scores = scores[keep]

    def gather(self, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every process's kept mistakes merged, most confident first, on the CPU.

        ``all_gather`` is the strategy's (a collective call under DDP, where it adds a leading
        process dimension; the tensor as it is on one device): flattening the first two
        dimensions covers both.
        """
        if self.scores is None:
            return None
        parts = {
            name: all_gather(value).reshape(-1, *value.shape[1:]).cpu()
            for name, value in (("images", self.images), ("labels", self.labels), ("preds", self.preds), ("scores", self.scores))
        }
        order = parts["scores"].argsort(descending=True)[: self.k]
        order = order[parts["scores"][order].isfinite()]
        return {name: value[order] for name, value in parts.items()}


class Dashboards(L.Callback):
    """Confusion matrices, per-class validation accuracy and misclassified test images for the run's loggers.

    Needs the LightningModule's ``validation_step`` and ``test_step`` to return
    ``{"logits": ..., "labels": ...}`` (``ImageClassifier`` does). Pictures go to each of the
    trainer's loggers that takes pictures (TensorBoard, MLflow: ``callbacks.pictures``), at the step
    of the metrics logged with them; a CSV logger gets the per-class numbers only, and a trainer
    with no picture-taking logger draws nothing.

    ``loggers`` and ``step`` are for testing a checkpoint outside of its training run (``test.py
    --log-to-run``): the pictures, and the test metrics that the trainer's own logging would
    otherwise have written, then go to each of ``loggers`` at ``step``, the training step of the
    checkpoint.

    ``classes``: the data set (``base.datasets.DatasetInfo``: class names, and the statistics the
    images were normalised with, to draw them in their own colours), or its class names only;
    then the statistics are the LightningModule's data set's (its ``dataset`` attribute, which
    ``ImageClassifier`` has from its checkpoint), else CIFAR-10's.
    """

    def __init__(
        self,
        classes: Sequence[str] | DatasetInfo,
        *,
        misclassified: int = 16,
        loggers: Sequence[Logger] | None = None,
        step: int | None = None,
        figure_share: float = 0.05,
    ) -> None:
        if (loggers is None) != (step is None):
            raise ValueError("loggers and step go together: pass both (test.py --log-to-run) or neither")
        self.dataset = classes if isinstance(classes, DatasetInfo) else None
        self.class_names = list(classes.classes if isinstance(classes, DatasetInfo) else classes)
        # One matrix per stage, so that a validation run inside fit never mixes with testing.
        self.confusion = {stage: ConfusionMatrix(len(self.class_names)) for stage in STAGES}
        self.mistakes = ConfidentMistakes(misclassified)
        self.loggers = list(loggers) if loggers is not None else None
        self.step = step
        self.figure_share = figure_share
        self._drawn_at: float | None = None  # when the last validation matrix was drawn (time.monotonic)
        self._draw_s = 0.0  # and how long that took

    # -- collecting -------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("val", pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", pl_module)
        self.mistakes.reset()

    def _start(self, stage: str, pl_module: L.LightningModule) -> None:
        # Metrics held by a callback are not moved with the module: follow it to its device here.
        self.confusion[stage].reset()
        self.confusion[stage].to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        logits, labels = _step_outputs(outputs, "validation_step")
        self.confusion["val"].update(logits, labels)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        logits, labels = _step_outputs(outputs, "test_step")
        self.confusion["test"].update(logits, labels)
        self.mistakes.update(batch[0], logits, labels)

    # -- writing ----------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = self.confusion["val"]
        if trainer.sanity_checking or metric.update_count == 0:
            return
        matrix = metric.compute()  # every process's counts added up: the same matrix on all ranks
        metric.reset()
        per_class = matrix.diagonal() / matrix.sum(dim=1).clamp(min=1)
        for name, accuracy, total in zip(self.class_names, per_class, matrix.sum(dim=1)):
            if total > 0:  # a class without validation images has no accuracy
                # The values agree on every rank already; sync_dist tells Lightning so, which
                # otherwise warns about unsynced epoch values under DDP.
                pl_module.log(f"acc_per_class/val/{name}", accuracy, sync_dist=True)
        takers = self._picture_loggers(trainer)
        if takers and self._draw_validation_now(trainer):
            started = time.monotonic()
            title = f"validation, epoch {trainer.current_epoch + 1}: {_accuracy_text(matrix)}"
            self._add_figure(takers, "confusion_matrix/val", confusion_matrix_figure(matrix, self.class_names, title), trainer)
            self._drawn_at, self._draw_s = time.monotonic(), time.monotonic() - started

    def _draw_validation_now(self, trainer: L.Trainer) -> bool:
        """Whether this validation's confusion matrix is drawn: the first and the last epoch's always,
        the others when drawing costs at most ``figure_share`` of the time since the last drawing.

        Drawing and encoding the picture takes about half a second on the host, with the device
        idle: every epoch of a CPU run (minutes long), but only every few epochs of a GPU run whose
        epochs take seconds. The per-class accuracies are logged every epoch either way.
        """
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self._drawn_at is None or last_epoch or trainer.should_stop:
            return True
        return self._draw_s <= self.figure_share * (time.monotonic() - self._drawn_at)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = self.confusion["test"]
        if metric.update_count == 0:
            return
        matrix = metric.compute()
        metric.reset()
        mistakes = self.mistakes.gather(trainer.strategy.all_gather)  # every rank takes part
        self.mistakes.reset()
        takers = self._picture_loggers(trainer)
        if not takers:
            return
        title = f"test: {_accuracy_text(matrix)}"
        self._add_figure(takers, "confusion_matrix/test", confusion_matrix_figure(matrix, self.class_names, title), trainer)
        if mistakes is not None and len(mistakes["scores"]):
            wrong = int(matrix.sum() - matrix.trace())
            title = f"most confident mistakes on the test set: {len(mistakes['scores'])} of {wrong:,}"
            heat_maps = _explain(pl_module, mistakes["images"], mistakes["preds"])
            if heat_maps is not None:
                title += "\nGrad-CAM of the predicted class over each image"
            figure = misclassified_figure(
                mistakes["images"], mistakes["labels"], mistakes["preds"], mistakes["scores"], self.class_names, title,
                heat_maps=heat_maps, dataset=self._dataset_of(pl_module),
            )
            self._add_figure(takers, "misclassified/test", figure, trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.loggers is None or not trainer.is_global_zero:
            return
        # The trainer has no logger of its own here, so its test metrics are written with the
        # pictures, at the checkpoint's step; they are all computed (and synced) by now.
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, self.step)
        for logger in self.loggers:
            logger.finalize("success")

    def _dataset_of(self, pl_module: L.LightningModule) -> DatasetInfo:
        """The data set whose statistics the images were normalised with (see the class docstring)."""
        if self.dataset is not None:
            return self.dataset
        module_dataset = getattr(pl_module, "dataset", None)
        return module_dataset if isinstance(module_dataset, DatasetInfo) else CIFAR10

    def _picture_loggers(self, trainer: L.Trainer) -> list[Logger]:
        """The loggers to draw into, on rank 0 (those that take pictures); none elsewhere."""
        if not trainer.is_global_zero:
            return []
        return image_loggers(self.loggers if self.loggers is not None else trainer.loggers)

    def _add_figure(self, loggers: Sequence[Logger], tag: str, figure: Figure, trainer: L.Trainer) -> None:
        # The step Lightning logs epoch metrics at (its LearningRateMonitor reads it too): at the
        # end of an epoch's validation it is one behind global_step, and the pictures should sit
        # at the same step as acc/val.
        step = self.step if self.step is not None else trainer.fit_loop.epoch_loop._batches_that_stepped
        log_figure(loggers, tag, figure, step)


_said_no_captum = False


def _explain(pl_module: L.LightningModule, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor | None:
    """Grad-CAM maps (on the CPU) of ``classes`` for the module's backbone; None where its network's
    catalog entry names no layer (or the module names no catalogued network), or where captum is
    not installed (said once per process, on the console).

    A compiled backbone is left alone: hooks on its layers would make it compile again.
    """
    global _said_no_captum
    backbone = getattr(pl_module, "backbone", None)
    network = getattr(pl_module, "network", None)  # ImageClassifier's base.schema.NetworkOptions
    model_name = network.model if network is not None else None
    if (
        backbone is None
        or model_name not in CATALOG
        or CATALOG[model_name].cam_layer is None
        or getattr(backbone, "_compiled_call_impl", None)
    ):
        return None
    if not grad_cam_available():
        if not _said_no_captum:
            print(f"misclassified/test is drawn without heat maps: {CAPTUM_MISSING}", file=sys.stderr, flush=True)
            _said_no_captum = True
        return None
    device = next(backbone.parameters()).device
    with torch.autocast(device.type, enabled=False):
        layer = cam_layer(backbone, model_name)
        return grad_cam(backbone, images.to(device).float(), classes.to(device), layer).cpu()


def _step_outputs(outputs: Any, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(outputs, dict) and "logits" in outputs and "labels" in outputs):
        raise TypeError(f"Dashboards needs the LightningModule's {hook} to return {{'logits': ..., 'labels': ...}}")
    return outputs["logits"], outputs["labels"]


def _accuracy_text(matrix: torch.Tensor) -> str:
    total = int(matrix.sum())
    return f"accuracy {100 * float(matrix.trace()) / max(total, 1):.2f} % of {total:,} images"
