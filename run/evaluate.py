"""Testing one checkpoint (test.py): ours, a course state dict or an exported .safetensors, on a test split."""
from __future__ import annotations

import dataclasses
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

from base.errors import ctrl_c_raises
from base.schema import NetworkOptions
from datamodules import check_data_dir, describe_source
from lit_modules import ImageClassifier
from models import prepare_backbone
from run.build import build_datamodule, build_trainer
from run.checkpoints import build_backbone, checkpoint_dataset, load_any_checkpoint, records_dataset
from run.config import build_config
from run.life import console_kind, require_run_dir
from run.hardware import worker_failures_explained
from run.loggers import recorded_loggers
from run.tensorboard import run_dashboards


def evaluate(args: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Test ``args["ckpt"]`` with test.py's ``args``; ``values``: its run options as
    ``run.preflight.check_test`` returned them. Returns the results that test.py prints.

    The test data is read as the data set the checkpoint was trained on (``checkpoint_dataset``:
    its ``--dataset``, its classes, its normalisation); data whose classes differ is refused in
    one line before the network is built. A checkpoint that records no data set (older runs,
    course state dicts) is tested as CIFAR-10, the data needing only as many classes."""
    config = build_config(values)
    run_dir = require_run_dir(args["ckpt"]) if args.get("log_to_run") else None
    contents = load_any_checkpoint(args["ckpt"], expected_model=args.get("model"))
    trained_on = checkpoint_dataset(contents)
    expected = trained_on if records_dataset(contents) else None
    if expected is not None:
        config = dataclasses.replace(config, dataset=expected.name)
    check_data_dir(config.data_dir, download=True, dataset=config.dataset)
    # A flag wins; otherwise the checkpoint is evaluated as its own run evaluated it.
    tta = args.get("tta") or contents.hparams.get("tta", "none")
    datamodule = build_datamodule(config, expected)
    # The test split now, not inside trainer.test: a test set of other classes is refused before
    # the network is built. The Trainer's own prepare_data and setup then find it done.
    datamodule.prepare_data()
    datamodule.setup("test")
    backbone = build_backbone(contents, num_classes=datamodule.num_classes)
    network = NetworkOptions(
        model=contents.model_name,
        label_smoothing=contents.hparams.get("label_smoothing", 0.0),
        tta=tta,
        **contents.model_options,
    )
    dataset = datamodule.dataset_info
    module = ImageClassifier(
        network, dataset=dataset, backbone=prepare_backbone(backbone, channels_last=config.channels_last, compile=False)
    )
    # --log-to-run: through the loggers the run itself logs to, as its config records them.
    dashboards = [run_dashboards(run_dir, contents, dataset, recorded_loggers(run_dir))] if run_dir else []
    # A live bar only in a terminal: piped or in a log file its frames would be the output's first line.
    bar = [RichProgressBar()] if console_kind() == "bar" else []
    trainer = build_trainer(config, logger=False, callbacks=[*bar, *dashboards], progress_bar=bool(bar))
    with ctrl_c_raises("stopped by Ctrl-C; nothing was written"), worker_failures_explained(config.workers):
        metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    per_class_prefix = "acc_per_class/test/"
    return {
        "checkpoint": str(args["ckpt"]),
        "model": contents.model_name,
        "checkpoint_kind": contents.kind,
        "tta": tta,
        "data": describe_source(config.data_dir, config.dataset),
        "dataset": dataset.name,
        "images": int(metrics["images/test"]),
        "test_set_images": len(datamodule.test_set),
        "accuracy": metrics["acc/test"],
        "top5_accuracy": metrics["acc_top5/test"],
        "loss": metrics["loss/test"],
        "per_class_accuracy": {
            key.removeprefix(per_class_prefix): value for key, value in metrics.items() if key.startswith(per_class_prefix)
        },
        "logged_to_run": str(run_dir) if run_dir else None,
        "run_loggers": list(recorded_loggers(run_dir)) if run_dir else [],
    }
