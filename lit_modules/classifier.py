"""The LightningModule: a course network, the course's loss/optimiser/schedule, metrics per stage."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from base.datasets import CIFAR10, DatasetInfo
from base.schema import (
    OPTIMIZERS,
    SCHEDULERS,
    TTA_MODES,
    NetworkOptions,
    OptimOptions,
    group_dict,
    group_names,
    group_values,
    hparams_of,
)
from datamodules.augment import tta_logits
from models import build_model
from models.catalog import chosen_options

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ImageClassifier(L.LightningModule):
    """Trains a network with cross-entropy; the defaults of its option groups are the course recipe.

    ``network`` (``base.schema.NetworkOptions``: the model's name and options, label smoothing,
    test-time augmentation) and ``optim`` (``OptimOptions``: optimiser and schedule) are groups of
    the option schema, or their mappings (``network`` also just a model name); ``dataset`` (``base.datasets.DatasetInfo``, default
    CIFAR-10) gives the class count and names. The network is ``models.build_model(network.model,
    dataset.num_classes, ...)``, or the injected ``backbone`` (that same network already prepared:
    weights loaded, channels_last, compiled). The three are saved as hyper-parameters, one mapping
    each, so a checkpoint alone rebuilds the module: ``ImageClassifier.load_from_checkpoint(path,
    weights_only=True)`` works, also on checkpoints written before the groups, whose flat
    hyper-parameters (``model_name``, ``lr``, ...) Lightning passes as ``flat_hparams``.

    Raises ValueError for an unknown optimizer, scheduler or tta, TypeError for an unknown
    keyword, and ``base.errors.UserError`` for an unknown model name or option.
    """

    def __init__(
        self,
        network: NetworkOptions | Mapping[str, Any] | str | None = None,
        optim: OptimOptions | Mapping[str, Any] | None = None,
        dataset: DatasetInfo | Mapping[str, Any] | None = None,
        *,
        backbone: nn.Module | None = None,
        **flat_hparams: Any,
    ) -> None:
        super().__init__()
        if flat_hparams:
            network, optim, dataset = _upgrade(flat_hparams, dataset)
        network = _as_group(NetworkOptions, {"model": network} if isinstance(network, str) else network)
        optim = _as_group(OptimOptions, optim)
        dataset = dataset if isinstance(dataset, DatasetInfo) else DatasetInfo.from_dict(dataset) if dataset else CIFAR10
        if optim.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optim.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if optim.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {optim.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if network.tta not in TTA_MODES:
            raise ValueError(f"unknown tta {network.tta!r}; choose one of {', '.join(TTA_MODES)}")
        self.save_hyperparameters(
            {"network": group_dict(network), "optim": group_dict(optim), "dataset": dataset.to_dict()}
        )
        self.network, self.optim, self.dataset = network, optim, dataset
        num_classes = dataset.num_classes
        self.backbone = backbone if backbone is not None else build_model(network.model, num_classes, **chosen_options(network.options, network.model))
        # One CIFAR-10 image: Lightning's model summary then shows real shapes and FLOPs per image.
        self.example_input_array = torch.zeros(1, 3, 32, 32)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=network.label_smoothing)
        # An attribute besides the hparam, so that test.py can evaluate with another mode than the
        # checkpoint's training run used.
        self.tta = network.tta
        # Metric objects are per stage so that their states never mix (lightning-hydra-template).
        top_k = min(5, num_classes)
        # Accuracy is the share of images classified right (average="micro"), as the course and
        # every CIFAR-10 table report it; torchmetrics' default is the mean of per-class accuracies,
        # which differs on a validation split whose classes are not exactly balanced. Micro also
        # counts with one comparison, where macro's bincount makes the host wait for a GPU.
        # No input validation: torchmetrics' checks call torch.unique, which waits for the GPU at
        # every batch, and the labels come from the data sources, always in range of the classes
        # (a checkpoint's class count is checked against the data before testing).
        metric = {"average": "micro", "validate_args": False}
        # The epoch's training loss and accuracy accumulate in metric objects, whose state a
        # checkpoint written in the middle of an epoch keeps (on_save_checkpoint): resumed there,
        # the epoch's values still cover all its batches. The loss is the mean over images, as
        # Lightning's own epoch mean weighs batches by their size; never NaN-checked, which would
        # read the value on the host (FiniteLossGuard watches the loss).
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MulticlassAccuracy(num_classes, **metric)
        self.val_acc = MulticlassAccuracy(num_classes, **metric)
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, **metric)
        self.test_acc = MulticlassAccuracy(num_classes, **metric)
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, **metric)
        self.test_acc_per_class = PerClassAccuracy(num_classes)
        # How many images each evaluation saw: a limited one (--limit-*-batches) says so. A count
        # cannot be NaN, and the NaN check reads the value on the host.
        self.val_images = SumMetric(nan_strategy="disable")
        self.test_images = SumMetric(nan_strategy="disable")
        self._resumed_epoch_metrics: dict[str, Any] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of validation and test: averaged over the views of ``self.tta`` (``augment.tta_logits``,
        the function predict.py and export.py score with too)."""
        return tta_logits(self.backbone, images, self.tta)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if images.shape[0] == 1:
            # Batch statistics of one image do not exist (BatchNorm raises "Expected more than 1
            # value per channel"): a last batch of one, or --batch-size 1, normalises with the
            # running statistics instead, as evaluation does, and leaves them as they are.
            with _running_batchnorm(self.backbone):
                logits = self(images)
        else:
            logits = self(images)
        loss = self.criterion(logits, labels)
        # update(), not a call: only the epoch value is logged, so the per-batch accuracy that a
        # call also computes would be wasted kernels.
        self.train_acc.update(logits, labels)
        self.train_loss.update(loss.detach(), weight=_count(labels))
        # Epoch values only: they are read once, at the epoch's end (the mean over all processes,
        # synced then). The per-step curve, loss/train_step, is logged by callbacks.checkpoints'
        # FiniteLossGuard, which reads the loss on the host once per --log-every-n-steps steps
        # together with its divergence check; a step value logged here, and any prog_bar=True
        # step value, would be read by Lightning again, the latter at every step.
        self.log("loss/train_epoch", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("acc/train", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self._eval_logits(images)
        self.val_acc(logits, labels)
        self.val_acc_top5(logits, labels)
        self.log("loss/val", self.criterion(logits, labels), sync_dist=True, prog_bar=True)
        self.log("acc/val", self.val_acc, prog_bar=True)
        self.log("acc_top5/val", self.val_acc_top5)
        self.val_images.update(_count(labels))
        self.log("images/val", self.val_images)
        # For callbacks that look at the predictions (callbacks/dashboards.py).
        return {"logits": logits, "labels": labels}

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self._eval_logits(images)
        self.test_acc(logits, labels)
        self.test_acc_top5(logits, labels)
        self.test_acc_per_class.update(logits, labels)
        self.log("loss/test", self.criterion(logits, labels), sync_dist=True)
        self.log("acc/test", self.test_acc)
        self.log("acc_top5/test", self.test_acc_top5)
        self.test_images.update(_count(labels))
        self.log("images/test", self.test_images)
        return {"logits": logits, "labels": labels}

    def on_test_epoch_end(self) -> None:
        per_class = self.test_acc_per_class.compute()
        for name, value in zip(self.dataset.classes, per_class):
            # compute() already gathered every process's counts, so the values agree on all ranks
            # and averaging them changes nothing; sync_dist says so to Lightning, which otherwise
            # warns about unsynced epoch values under DDP.
            self.log(f"acc_per_class/test/{name}", value, sync_dist=True)
        self.test_acc_per_class.reset()

    def _epoch_metrics(self) -> dict[str, Metric]:
        """The metrics that accumulate over a training epoch, by attribute name."""
        return {"train_loss": self.train_loss, "train_acc": self.train_acc}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the training epoch's metric states in a checkpoint written in the middle of an epoch.

        Stored under ``"epoch_metrics"``: ``{"train_loss": {state: tensor}, ...}``, or with several
        processes ``{"ranks": [that of rank 0, of rank 1, ...]}`` (each process's share, gathered:
        every process builds the checkpoint, rank 0 writes it). Nothing at an epoch's end, where
        the next epoch starts its metrics afresh.
        """
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if not 0 < done < trainer.num_training_batches:
            return
        state = {name: {key: value.detach().cpu().clone() for key, value in metric.metric_state.items()}
                 for name, metric in self._epoch_metrics().items()}
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
            state = {"ranks": states}
        checkpoint["epoch_metrics"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied when training starts (the module is on its device then), and only by a resumed fit.
        self._resumed_epoch_metrics = checkpoint.get("epoch_metrics")

    def on_train_start(self) -> None:
        saved, self._resumed_epoch_metrics = self._resumed_epoch_metrics, None
        if not saved:
            return
        if "ranks" in saved:
            rank = self.trainer.global_rank
            saved = saved["ranks"][rank] if rank < len(saved["ranks"]) else None
        elif self.trainer.global_rank != 0:
            saved = None  # one process's share, saved by a single-process run: counted once
        for name, metric in self._epoch_metrics().items():
            if saved and name in saved:
                for key, value in saved[name].items():
                    setattr(metric, key, value.to(self.device))
                metric._update_count = max(metric._update_count, 1)  # its state holds updates: compute() may run
                metric._computed = None

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.optim
        params = list(self.backbone.parameters())
        # One fused kernel for the whole update instead of several per parameter: a few percent of
        # a CPU step, more on GPUs. PyTorch has fused kernels for CPU and CUDA tensors only. Lightning
        # 2.6 refuses to clip the gradients of a fused optimiser under mixed precision (even bf16,
        # which has no loss scale to undo), so a run that clips steps unfused, whatever its
        # precision: a resume may change the precision, and the restored optimiser keeps its kind.
        fused = all(p.device.type in ("cpu", "cuda") for p in params) and hp.gradient_clip_val is None
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
                fused=fused,
            )
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)

        if hp.scheduler == "none":
            return {"optimizer": optimizer}
        if hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
            interval = "epoch"
        else:
            # Per-step schedules need the run length, which only the trainer knows.
            total_steps = int(self.trainer.estimated_stepping_batches)
            if hp.scheduler == "onecycle":
                scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total_steps)
            else:
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
            interval = "step"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "name": "lr"}}


def _as_group(group: type, values: Any) -> Any:
    if isinstance(values, group):
        return values
    values = dict(values or {})
    unknown = sorted(set(values) - set(group_names(group)))
    if unknown:
        raise TypeError(f"{group.__name__} has no option(s) {', '.join(unknown)}")
    return group_values(group, values)


def _upgrade(flat: Mapping[str, Any], dataset: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(network, optim, dataset)`` of a checkpoint's flat hyper-parameters (``base.schema.hparams_of``);
    such a checkpoint was trained on CIFAR-10, with its ``class_names``."""
    groups = hparams_of(flat, strict=True)
    if dataset is None and groups["class_names"]:
        dataset = dataclasses.replace(CIFAR10, classes=tuple(groups["class_names"]))
    return groups["network"], groups["optim"], dataset


class PerClassAccuracy(Metric):
    """Each class's accuracy, shape ``(num_classes,)``: right predictions over images of that class
    (0 for a class without images, as torchmetrics' ``MulticlassAccuracy(average=None)`` gives).

    Counted with ``scatter_add_`` into tensors of fixed size: torchmetrics' own counts with
    ``torch.bincount``, which on CUDA reads the largest value back to the host to size its
    output, a wait at every test batch. The counts are summed over processes by torchmetrics.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: logits or probabilities ``(N, C)``, or class indices ``(N,)``; ``target``: ``(N,)``."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        self.correct.scatter_add_(0, target, (preds == target).long())
        self.total.scatter_add_(0, target, torch.ones_like(target))

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


def _count(labels: torch.Tensor) -> torch.Tensor:
    """The batch's image count as a float scalar on its device, made by a fill kernel: a tensor
    built from a Python number would be copied from the host, which waits for the device."""
    return torch.full((), float(labels.shape[0]), device=labels.device)


@contextmanager
def _running_batchnorm(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` in evaluation mode for the duration; the rest untouched."""
    switched = [m for m in module.modules() if isinstance(m, _BATCHNORMS) and m.training]
    for layer in switched:
        layer.train(False)
    try:
        yield
    finally:
        for layer in switched:
            layer.train(True)
