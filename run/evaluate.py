"""Testing one checkpoint (test.py): ours, a course state dict or an exported .safetensors, on a test split."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

from base.errors import ctrl_c_raises
from datamodules import check_data_dir, describe_source
from lit_modules import ImageClassifier
from models import prepare_backbone
from run.build import build_datamodule, build_trainer
from run.checkpoints import build_backbone, load_any_checkpoint
from run.config import build_config
from run.folder import require_run_dir
from run.tensorboard import run_dashboards

def evaluate(args: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Test ``args["ckpt"]`` with test.py's ``args``; ``values``: its run options as
    ``run.preflight.check_test`` returned them. Returns the results that test.py prints."""
    config = build_config(values)
    run_dir = require_run_dir(args["ckpt"]) if args.get("log_to_run") else None
    check_data_dir(config.data_dir, download=True)
    contents = load_any_checkpoint(args["ckpt"], expected_model=args.get("model"))
    # A flag wins; otherwise the checkpoint is evaluated as its own run evaluated it.
    tta = args.get("tta") or contents.hparams.get("tta", "none")
    datamodule = build_datamodule(config)
    backbone = build_backbone(contents, num_classes=datamodule.num_classes)
    module = ImageClassifier(
        contents.model_name,
        backbone=prepare_backbone(backbone, channels_last=config.channels_last, compile=False),
        num_classes=contents.num_classes,
        model_options=contents.model_options,
        class_names=datamodule.classes,
        tta=tta,
    )
    dashboards = [run_dashboards(run_dir, contents, datamodule.classes)] if run_dir else []
    trainer = build_trainer(config, logger=False, callbacks=[RichProgressBar(), *dashboards])
    with ctrl_c_raises("stopped by Ctrl-C; nothing was written"):
        metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    per_class_prefix = "acc_per_class/test/"
    return {
        "checkpoint": str(args["ckpt"]),
        "model": contents.model_name,
        "checkpoint_kind": contents.kind,
        "tta": tta,
        "data": describe_source(config.data_dir),
        "images": int(metrics["images/test"]),
        "test_set_images": len(datamodule.test_set),
        "accuracy": metrics["acc/test"],
        "top5_accuracy": metrics["acc_top5/test"],
        "loss": metrics["loss/test"],
        "per_class_accuracy": {
            key.removeprefix(per_class_prefix): value for key, value in metrics.items() if key.startswith(per_class_prefix)
        },
        "logged_to_run": str(run_dir) if run_dir else None,
    }
