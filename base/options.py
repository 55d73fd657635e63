"""The names, choices and defaults of the options every layer shares, in one place.

Importable without torch or Lightning, so that the command-line tools answer ``--help`` and
refuse a mistyped flag before loading them. The modules that use a value take it from here:
``ImageClassifier``'s keyword defaults are :data:`COURSE_RECIPE`, ``CIFAR10DataModule``'s are
:data:`DATA`, and ``run.config.RunConfig`` gathers both with the run's own.
"""
from __future__ import annotations

from dataclasses import dataclass

MODEL_NAMES = ("vgg16", "vgg16_bn", "resnet50")
# The course trained VGG16 for 250 epochs and ResNet50 for 285; that is the default run length.
COURSE_EPOCHS = {"vgg16": 250, "vgg16_bn": 250, "resnet50": 285}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("step", "cosine", "onecycle", "none")
# Test-time augmentation of validation and test: none, or the mean logits of each image and its mirror.
TTA_MODES = ("none", "flip")
DATA_PATHS = ("auto", "device", "loader")
# What --data-dir holds: CIFAR-10 (python archive or image folders of its ten classes), CIFAR-100 in
# torchvision's python format, or any image-folder tree or .tar.gz of N classes named by its folders.
DATASETS = ("cifar10", "cifar100", "imagefolder")
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


@dataclass(frozen=True)
class CourseRecipe:
    """The course's training recipe: Adam 1e-3, StepLR every 20 epochs by 1/3, plain cross-entropy."""

    model_name: str = "vgg16"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "step"
    step_size: int = 20
    gamma: float = 1 / 3
    label_smoothing: float = 0.0
    tta: str = "none"


@dataclass(frozen=True)
class DataDefaults:
    """How the data is served unless asked otherwise: the course's batch of 100, 5,000 held out."""

    dataset: str = "cifar10"
    data_dir: str = "data"
    batch_size: int = 100
    eval_batch_size: int = 500
    val_size: int = 5000
    num_workers: int = 2
    data_path: str = "auto"


COURSE_RECIPE = CourseRecipe()
DATA = DataDefaults()

# Image files that a folder is searched for (training data in image folders, predict.py's inputs).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
