"""The fixed choices of options and the file suffixes every layer shares, in one place.

Importable without torch or Lightning. The options themselves, with their defaults and help, are
declared in ``base.schema``; the networks' names and course run lengths in ``models.catalog``.
"""
from __future__ import annotations


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("step", "cosine", "onecycle", "none")
# Test-time augmentation of validation and test: none; the mean logits of each image and its mirror;
# and those of both moved a pixel either way too (datamodules/augment.py).
TTA_MODES = ("none", "flip", "flip-translate")
# What a training translation brings in at the border (torch's padding_mode names).
PADDING_MODES = ("zeros", "reflect")
DATA_PATHS = ("auto", "device", "loader")
# Where a run's curves and pictures go; tensorboard is always available, mlflow is an optional extra.
LOGGERS = ("tensorboard", "csv", "mlflow")
# Lightning strategies this project runs and tests: auto (one process, or DDP over several devices)
# and ddp. Others (ddp_spawn pickles the Trainer, FSDP and DeepSpeed shard checkpoints) are untested.
STRATEGIES = ("auto", "ddp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
DEVICES_HELP = "number of devices, a list of GPU indices such as 0,1, -1 for all, or auto"
PRECISION_HELP = "auto: bf16-mixed on GPUs and CPUs with native bfloat16 (AMX, AVX512-BF16), else 32-true"
# export.py's formats and the suffix of each one's file. TorchScript gets a two-part suffix because
# a bare ".pt" is also what course state dicts are called, and an export must never replace its source.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
# Signals that --requeue-signal may name; SLURM's ``--signal=USR1@90`` style warnings.
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
# Signals whose default action would end a run on the spot, which a run takes as SIGTERM instead
# (saving last.ckpt after the current batch): a closed SSH session or terminal (SIGHUP, which
# nohup would have ignored) and a CPU-time limit about to be reached (SIGXCPU, sent by ulimit -t
# and batch systems before they kill).
STOP_SIGNALS = ("SIGHUP", "SIGXCPU")


# Image files that a folder is searched for (training data in image folders, predict.py's inputs).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
