"""The option schema: every option of a training run once, grouped by the part that owns it.

Each group is a frozen dataclass whose fields are the options, with their default and an
:class:`Option` that says everything else: the flag's parser and help, and whether a resume may
change it. What derives from here, and nothing restates:

- the flags of train.py (and the shared ones of test.py, predict.py and export.py), their help and
  the defaults ``--help`` shows (``cli.flags.add_options``);
- the YAML keys of a ``--config`` file and of a run's ``config.yaml`` (the field names; a file may
  also group them under the section names of :data:`GROUPS`, as ``--print-config`` writes them);
- ``run.config.RunConfig``, every field of every group, flat and resolved;
- the parts that take a group whole: ``ImageClassifier(network, optim, dataset)`` and the
  DataModule's :class:`DataOptions`, and the hyper-parameters a checkpoint saves (one mapping per
  group, :func:`hparams_of` also reads the flat ones of checkpoints written before the groups);
- the rule of what a resume may change (``fixed``) and what belongs to one command only.

The networks' own options (ResNet50's ``identity_shortcut``) are declared by their entries in
``models.catalog``, which adds them here (:data:`NETWORK_OPTIONS`): from then on each is an option
of the network group like the others.

Before the options, what they are built from: the fixed choices and file suffixes every layer
shares (the one place they are spelled), and the parsers of option values as typed.

Importable without torch or Lightning: the command-line tools answer ``--help`` and refuse a
mistyped flag before loading them. The choices of ``--model`` and ``--dataset`` come from their
catalogs (``catalog=``), which the command-line layer reads.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.errors import UserError


# --- the fixed choices and suffixes: every layer reads them from here, torch-free ----------------

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


# --- the value parsers: a flag's text, or a YAML value as the file spells it, typed or refused ---
# Each takes the text and returns the typed value, or raises ``argparse.ArgumentTypeError`` with a
# message naming what was expected; argparse turns that into ``--flag: message``, and a config file
# value goes through the same parser (``cli.flags.parse_config_file``).


def _number(text: str, kind: type, accept: Callable[[float], bool], expected: str, must: str) -> int | float:
    """``text`` as ``kind`` (int or float) if ``accept`` holds for it; an argparse error naming the flag otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f"{must}, got {text.strip()}")
    return value


# The largest count torch takes (int64): a larger one would overflow in a tensor, a sampler or a
# loop counter after torch has loaded, with a traceback instead of this one line.
INT_MAX = 2**63 - 1
# The seeds numpy takes (and Lightning's seed_everything with it): 0 to 2**32 - 1.
SEED_MAX = 2**32 - 1


def positive_int(text: str) -> int:
    value = _number(text, int, lambda v: v >= 1, "a positive integer", "must be a positive integer")
    return _at_most(value, INT_MAX, text)


def non_negative_int(text: str) -> int:
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, INT_MAX, text)


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**32 - 1, the range numpy (hence Lightning) seeds from."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, SEED_MAX, text, "the seeds numpy and Lightning take")


# Every image this project trains on is 32x32 (datamodules/sources.py refuses others).
IMAGE_SIDE = 32


def shift_pixels(text: str) -> int:
    """A training shift (``--translate``): 0 to 16 pixels, half a 32x32 image's side; more would leave
    images that are mostly border (and a reflection needs the shift below the side)."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, IMAGE_SIDE // 2, text, "half the side of the 32x32 images")


def square_side(text: str) -> int:
    """Cutout's square (``--cutout``): 0 to 32 pixels, the images' side."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, IMAGE_SIDE, text, "the side of the 32x32 images")


def _at_most(value: int, limit: int, text: str, what: str = "the largest count torch takes") -> int:
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit:,} ({what}), got {text.strip()}")
    return value


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number", "must be a positive (finite) number")


def non_negative_float(text: str) -> float:
    """A number >= 0 (a weight decay)."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0", "must be >= 0")


def unit_fraction(text: str) -> float:
    """A number from 0 (included) to 1 (excluded): a momentum, a label smoothing."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number from 0 to below 1", "must be at least 0 and below 1")


def learning_rate(text: str) -> float | str:
    """A positive number, or ``find``: the learning-rate range test's suggestion."""
    return "find" if text.strip().lower() == "find" else positive_float(text)


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (an EMA decay, a target accuracy)."""
    return _number(text, float, lambda v: 0 < v < 1, "a number between 0 and 1", "must be between 0 and 1 (exclusive)")


def batch_limit(text: str) -> int | float:
    """Lightning's limit_*_batches: an int counts batches, a float in (0, 1] is a fraction."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a batch count or a fraction, got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 batch, got {value}")
    return value


def logger_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of loggers (``tensorboard,csv``), each one of :data:`LOGGERS`."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(LOGGERS)}, got {text!r}")
    return names


def devices(text: str) -> str:
    """``--devices`` as typed (a count, a list such as ``0,1``, ``-1`` or ``auto``); run/hardware.py
    checks and resolves it against the machine."""
    return text.strip()


# --- the options: what the schema says about each, then the groups that declare them -----------

# Why an option may not change when a run is resumed (``fixed``); any other may.
TRAINING = "it decides what the run trains on"
OPTIMISER = "the optimiser's restored state was built with it"
SCHEDULE = "it changes the length of the run's learning-rate schedule"


@dataclass(frozen=True)
class Option:
    """What the schema says about one option besides its name and default.

    ``parse``: the value's parser (one of those above), ``choices``: its fixed choices, or
    ``catalog``: the catalog whose names are its choices (``"models"``, ``"datasets"``); ``switch``:
    a ``--x/--no-x`` pair, ``store_true``: a flag that takes no value; ``fixed``: why a resume may
    not change it; ``path``: expanded (``~``, ``$VARS``) and made absolute; ``per_invocation``:
    belongs to one command, so a resume does not inherit it; ``flag``: False for a fact the
    resolution adds (no flag, ignored in a ``--config`` file).
    """

    help: str
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    catalog: str | None = None
    switch: bool = False
    store_true: bool = False
    metavar: str | None = None
    fixed: str | None = None
    path: bool = False
    per_invocation: bool = False
    flag: bool = True


def option(default: Any, help: str, **spec: Any) -> Any:
    """A schema field: ``default`` and the :class:`Option` built from ``help`` and ``spec``."""
    return field(default=default, metadata={"option": Option(help, **spec)})


# The options of the networks' own factories (ResNet50's identity_shortcut), by name: each catalog
# entry declares those it takes (``models.catalog.ModelOption``) and the catalog adds them here
# (:func:`set_network_options`), so that each is an option like the others, in the network section
# after ``model``: a flag, a YAML key, a field of the run's config and a hyper-parameter.
NETWORK_OPTIONS: dict[str, dataclasses.Field] = {}


@dataclass(frozen=True, init=False)
class NetworkOptions:
    """The network and what the LightningModule computes with it (its loss, its evaluation).

    Besides its fields it holds the networks' own options (:data:`NETWORK_OPTIONS`) in ``options``,
    each one's default where not given; they are given and read like fields:
    ``NetworkOptions(model="resnet50", identity_shortcut=True).identity_shortcut``.
    """

    model: str = option("vgg16", "network", catalog="models", fixed=TRAINING)
    options: Mapping[str, Any] = field(default_factory=dict, metadata={"network_options": True})
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", parse=unit_fraction, fixed=TRAINING)
    tta: str = option(
        "none",
        "test-time augmentation of validation and test; flip: mean logits of each image and its mirror; "
        "flip-translate: also of both moved a pixel up-left and down-right. "
        "Saved in the checkpoints, where test.py takes it from unless given its own --tta",
        choices=TTA_MODES, fixed="the best checkpoint was chosen with it",
    )

    def __init__(self, **given: Any) -> None:
        chosen = dict(given.pop("options", None) or {})
        for f in dataclasses.fields(self):
            if f.name != "options":
                object.__setattr__(self, f.name, given.pop(f.name, f.default))
        chosen.update(given)
        unknown = sorted(set(chosen) - set(NETWORK_OPTIONS))
        if unknown:
            raise TypeError(f"NetworkOptions has no option(s) {', '.join(unknown)}")
        object.__setattr__(self, "options", {name: chosen.get(name, f.default) for name, f in NETWORK_OPTIONS.items()})

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"NetworkOptions has no option {name!r}")


@dataclass(frozen=True)
class OptimOptions:
    """The optimiser and the learning-rate schedule (the course's by default: Adam 1e-3, StepLR 20 x 1/3)."""

    epochs: int | None = option(
        None, "default: the network's course run, 250 for vgg16, 285 for resnet50", parse=positive_int
    )
    optimizer: str = option("adam", "optimiser", choices=OPTIMIZERS, fixed=OPTIMISER)
    lr: float | str = option(
        1e-3, "learning rate (peak for onecycle), or find: run the range test first and use its suggestion",
        parse=learning_rate, fixed=OPTIMISER,
    )
    find_lr: bool = option(
        False,
        "only run the learning-rate range test (Lightning's lr_find) on this model, data and optimiser: "
        "prints the suggested rate and saves the plot, then exits",
        store_true=True, per_invocation=True,
    )
    momentum: float = option(0.9, "sgd only", parse=unit_fraction, fixed=OPTIMISER)
    nesterov: bool = option(False, "sgd only", switch=True, fixed=OPTIMISER)
    weight_decay: float = option(0.0, "L2 penalty (decoupled for adamw)", parse=non_negative_float, fixed=OPTIMISER)
    scheduler: str = option("step", "step: per epoch; cosine, onecycle: per step", choices=SCHEDULERS, fixed=SCHEDULE)
    step_size: int = option(20, "step scheduler: epochs between decays", parse=positive_int, fixed=SCHEDULE)
    gamma: float = option(1 / 3, "step scheduler: decay factor", parse=positive_float, fixed=SCHEDULE)
    gradient_clip_val: float | None = option(
        None,
        "before each optimiser step, scale the gradients down to this global L2 norm where it is larger "
        "(Lightning's gradient_clip_val; the norm before clipping is logged as grad_norm/train; default: off)",
        parse=positive_float, metavar="NORM", fixed=TRAINING,
    )
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights, updated every step with decay min(DECAY, "
        "(1 + n) / (10 + n)) after n updates (e.g. 0.998); validation, the saved checkpoints and the final test "
        "use the averaged weights (default: off)",
        parse=open_fraction, metavar="DECAY", fixed=TRAINING,
    )


@dataclass(frozen=True)
class DataOptions:
    """Where the images come from and how they are served: the DataModule's options."""

    dataset: str = option(
        "cifar10", "what --data-dir holds: cifar10, cifar100 (python format) or imagefolder (any N classes)",
        catalog="datasets", fixed=TRAINING,
    )
    data_dir: Path = option(
        "data",
        "CIFAR-10 or CIFAR-100 as a folder holding torchvision's python archive (downloaded there when missing and "
        "online), an image-folder tree (train/<class>/*, test/<class>/*) or a .tar.gz of one",
        path=True,
    )
    batch_size: int = option(
        100, "per device: each step trains on batch x devices x nodes", parse=positive_int, fixed=SCHEDULE
    )
    eval_batch_size: int = option(500, "batch size of validation and test", parse=positive_int)
    val_size: int = option(5000, "training images held out for validation", parse=positive_int, fixed=TRAINING)
    translate: int = option(
        4, "training augmentation: random shifts of up to N pixels each way (RandomCrop(32, padding=N)); 0: none",
        parse=shift_pixels, metavar="N", fixed=TRAINING,
    )
    translate_padding: str = option(
        "zeros", "what a shift brings in at the border: zeros (the course's) or reflect", choices=PADDING_MODES,
        fixed=TRAINING,
    )
    cutout: int = option(
        0, "training augmentation: erase one random N x N square of every image (Cutout, set to the mean); 0: none",
        parse=square_side, metavar="N", fixed=TRAINING,
    )
    train_limit: int | None = option(None, "train on only the first N images", parse=positive_int, fixed=TRAINING)
    data_path: str = option(
        "auto",
        "device: whole batches augmented on the training device (datamodules/augment.py); "
        "loader: a DataLoader augmenting image by image on the CPU; auto: device on CUDA and CPU",
        choices=DATA_PATHS,
    )
    workers: int = option(2, "DataLoader worker processes (--data-path loader)", parse=non_negative_int)
    cache_dir: Path | None = option(None, "where decoded images are cached (default: ~/.cache)", path=True)


@dataclass(frozen=True)
class HardwareOptions:
    """What the run runs on; resolved before the run starts, so a run's config never says auto."""

    accelerator: str = option("auto", "auto picks a GPU when there is one", choices=ACCELERATORS)
    devices: Any = option("auto", DEVICES_HELP, parse=devices, fixed=SCHEDULE)
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS)
    precision_reason: str | None = option(None, "why this precision", flag=False)
    channels_last: bool | None = option(
        None, "channels_last memory format for the model and its batches (default: on with CUDA)", switch=True
    )
    compile: bool = option(
        False, "torch.compile the network; the first steps (and the first evaluation) are spent compiling", switch=True
    )
    num_nodes: int = option(1, "machines, for multi-node DDP", parse=positive_int, fixed=SCHEDULE)
    strategy: str = option("auto", "Lightning strategy: auto picks DDP for several devices", choices=STRATEGIES)


@dataclass(frozen=True)
class RunOptions:
    """The run itself: its folder, seed, checkpoints, logs, and what one command asks of it."""

    config: Path | None = option(
        None, "YAML file of option defaults, e.g. configs/vgg16.yaml, or a shipped recipe by name (resnet50_fast); "
        "flags typed win over it",
        path=True, per_invocation=True,
    )
    output_dir: Path = option("runs", "runs go to OUTPUT_DIR/MODEL/RUN_NAME", path=True)
    run_name: str | None = option(
        None,
        "the run's folder name (default: the next free version_N); with --resume last, continue this run "
        "if it has a checkpoint, else start it: one command for a job's first start and its requeues",
    )
    seed: int = option(0, "seeds weights, split, shuffling, augmentation (0 to 2**32 - 1)", parse=seed, fixed=TRAINING)
    resume: Path | None = option(
        None, "continue a run: its folder, a checkpoint in it, or last (the newest run, or --run-name's)",
        metavar="PATH|last", path=True, per_invocation=True,
    )
    rewind: bool = option(
        False,
        "with --resume of a checkpoint older than the run's latest (best.ckpt, epochNNN.ckpt): go back to it and "
        "train on from there; the later checkpoints are moved into RUN/rewound/ (without it such a resume is refused)",
        store_true=True, per_invocation=True,
    )
    weights: Path | None = option(
        None, "start from these weights (course state dict or .ckpt)", metavar="PATH", path=True, per_invocation=True
    )
    checkpoint_every: int = option(20, "keep a checkpoint every N epochs", parse=positive_int)
    results_json: Path | None = option(
        None, "also write the run's test results and timings as JSON", metavar="PATH", path=True, per_invocation=True
    )
    time_to_accuracy: float | None = option(
        None,
        "benchmark only: evaluate the TEST set after every epoch and record, in --results-json, the training "
        "time at which its accuracy first reaches ACC (e.g. 0.93); model selection still uses validation only",
        parse=open_fraction, metavar="ACC", per_invocation=True,
    )
    log_every_n_steps: int = option(50, "training curves' resolution", parse=positive_int)
    logger: tuple[str, ...] = option(
        ("tensorboard",), "where curves and pictures go: tensorboard, csv, mlflow, comma-separated",
        parse=logger_list, metavar="NAMES",
    )
    requeue_signal: str | None = option(
        None, "also save last.ckpt and exit 143 on this signal, as on SIGTERM (e.g. SLURM --signal=USR1@90)",
        choices=REQUEUE_SIGNALS,
    )
    fast_dev_run: int = option(0, "run N batches of each stage, no output", parse=non_negative_int,
                               per_invocation=True)
    limit_train_batches: int | float | None = option(
        None, "batches (int) or fraction per epoch", parse=batch_limit, fixed=SCHEDULE
    )
    limit_val_batches: int | float | None = option(
        None, "as --limit-train-batches", parse=batch_limit,
        fixed="the best checkpoint is chosen by validating on it",
    )
    limit_test_batches: int | float | None = option(None, "as --limit-train-batches", parse=batch_limit)


# Section name (a ``--config`` file's and ``--print-config``'s, a checkpoint's hyper-parameters) ->
# group, in the order --help shows them.
GROUPS: dict[str, type] = {
    "network": NetworkOptions,
    "optim": OptimOptions,
    "data": DataOptions,
    "hardware": HardwareOptions,
    "run": RunOptions,
}
TITLES = {
    "network": "model",
    "optim": "optimiser and schedule (defaults: the course's)",
    "data": "data",
    "hardware": "hardware",
    "run": "run, checkpoints and logs",
}
# Every option by name, in the groups' order (a group's ``options`` field opened into the networks'
# options), its section and its default; filled in place, so that the networks' options the catalog
# adds (:func:`set_network_options`) are in every module's copy.
FIELDS: dict[str, dataclasses.Field] = {}
GROUP_OF: dict[str, str] = {}
DEFAULTS: dict[str, Any] = {}


def _index() -> None:
    pairs = [
        (section, inner)
        for section, group in GROUPS.items()
        for f in dataclasses.fields(group)
        for inner in (NETWORK_OPTIONS.values() if f.metadata.get("network_options") else (f,))
    ]
    for table in (FIELDS, GROUP_OF, DEFAULTS):
        table.clear()
    FIELDS.update((f.name, f) for _, f in pairs)
    GROUP_OF.update((f.name, section) for section, f in pairs)
    DEFAULTS.update((f.name, f.default) for _, f in pairs)


_index()


def set_network_options(declared: Mapping[str, tuple[type, Any, Option]]) -> None:
    """Make ``declared`` (name -> its type, default and :class:`Option`) the networks' own options.

    Called by ``models.catalog``, which declares them, when it is imported and when a network is
    registered. Raises ValueError for a name that is another option's.
    """
    taken = sorted(set(declared) & (set(FIELDS) - set(NETWORK_OPTIONS)))
    if taken:
        raise ValueError(f"network option(s) {', '.join(taken)}: the name of another option")
    NETWORK_OPTIONS.clear()
    for name, (kind, default, spec) in declared.items():
        made = field(default=default, metadata={"option": spec})
        made.name, made.type = name, kind
        NETWORK_OPTIONS[name] = made
    _index()


def option_of(name: str) -> Option:
    """The :class:`Option` of the option ``name`` (a field name, ``batch_size``)."""
    return FIELDS[name].metadata["option"]


def flag_of(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def group_names(group: type) -> list[str]:
    """The names of the options of ``group``, in order (the networks' options in place of ``options``)."""
    section = next(section for section, known in GROUPS.items() if known is group)
    return [name for name in FIELDS if GROUP_OF[name] == section]


def group_values(group: type, source: Mapping[str, Any] | Any) -> Any:
    """The ``group`` dataclass filled from ``source``: a mapping or an object (a ``RunConfig``) that
    has every option of the group."""
    get = source.get if isinstance(source, Mapping) else lambda name, default=None: getattr(source, name)
    return group(**{name: get(name, FIELDS[name].default) for name in group_names(group)})


def group_dict(values: Any) -> dict[str, Any]:
    """A group's values as a flat mapping of its options, plain (:func:`plain`), in order: what a
    checkpoint's hyper-parameters hold of it."""
    return {name: plain(getattr(values, name)) for name in group_names(type(values))}


def plain(value: Any) -> Any:
    """A value as YAML, JSON and checkpoints keep it: a path as text, a tuple as a list."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def shown(value: Any) -> str:
    """A value as ``--help`` and messages show it: ``0.333333``, ``0,1``, ``tensorboard,csv``."""
    if value is None:
        return "not set"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# The hyper-parameters of checkpoints written before the groups: flat, the network as ``model_name``
# and ``model_options``, the classes as ``class_names`` (those runs all trained on CIFAR-10).
_FLAT_NETWORK = ("label_smoothing", "tta")
_FLAT_OPTIM = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "scheduler", "step_size", "gamma")
_FLAT = {"model_name", "model_options", "num_classes", "class_names", *_FLAT_NETWORK, *_FLAT_OPTIM}


def hparams_of(saved: Mapping[str, Any], strict: bool = False) -> dict[str, Any]:
    """A checkpoint's hyper-parameters as ``{"network": {...}, "optim": {...}, "dataset": ... or None,
    "class_names": [...] or None}``: the one reader of old checkpoints' hyper-parameters.

    Reads both layouts: the grouped one ``ImageClassifier`` saves, and the flat one of checkpoints
    written before it (``model_name``, ``model_options``, ``lr``, ...), so that old runs still
    resume, test and export. ``dataset`` is the recorded ``DatasetInfo.to_dict``, None where the
    checkpoint records none (the flat ones: CIFAR-10, with their ``class_names``). Raises
    ``KeyError`` when ``saved`` names no network at all; ``strict`` (the module's constructor, given
    the flat ones as keywords): ``TypeError`` for that and for a key the flat layout never had.
    """
    if "network" in saved:
        dataset = saved.get("dataset")
        return {"network": dict(saved["network"]), "optim": dict(saved.get("optim") or {}), "dataset": dataset,
                "class_names": list(dataset["classes"]) if dataset else saved.get("class_names")}
    unknown = sorted(set(saved) - _FLAT)
    if strict and (unknown or "model_name" not in saved):
        raise TypeError(f"ImageClassifier got unexpected keyword(s) {', '.join(unknown or ['without model_name'])}")
    network = {"model": saved["model_name"], **dict(saved.get("model_options") or {})}
    network.update({name: saved[name] for name in _FLAT_NETWORK if name in saved})
    optim = {name: saved[name] for name in _FLAT_OPTIM if name in saved}
    return {"network": network, "optim": optim, "dataset": None, "class_names": saved.get("class_names")}


def flatten_sections(config: dict[Any, Any], lines: dict[Any, int], source: str) -> tuple[dict[Any, Any], dict[Any, int]]:
    """``config`` (a YAML file's mapping, from ``source``) with the sections of :data:`GROUPS`
    (``optim: {lr: 0.1}``, as ``--print-config`` writes them) opened into their keys, and
    ``lines`` (each key's line) with each key inside a section at its section's line.

    Raises ``UserError`` for a key given twice or put under another group's section.
    """
    flat: dict[Any, Any] = {}
    flat_lines: dict[Any, int] = {}
    for key, value in config.items():
        if key in GROUPS and isinstance(value, dict):
            for inner, inner_value in value.items():
                if GROUP_OF.get(str(inner).replace("-", "_"), key) != key:
                    where = f"{source}: line {lines[key]}: " if key in lines else f"{source}: "
                    raise UserError(f"{where}{inner!r} is not an option of the {key} section; it belongs under "
                                    f"{GROUP_OF[str(inner).replace('-', '_')]}")
                if inner in flat:
                    raise UserError(f"{source}: {inner!r} is given twice (in the {key} section and elsewhere); keep one of them")
                flat[inner] = inner_value
                if key in lines:
                    flat_lines[inner] = lines[key]
        else:
            if key in flat:
                raise UserError(f"{source}: {key!r} is given twice (in a section and at the top); keep one of them")
            flat[key] = value
            if key in lines:
                flat_lines[key] = lines[key]
    return flat, flat_lines


def argparse_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments of ``parser.add_argument(flag_of(name), **...)`` for the option ``name``.

    Without a default: a flag not typed is absent from the namespace (the parsers use
    ``argument_default=SUPPRESS``), and the default of :data:`DEFAULTS` applies later, once.
    """
    spec = option_of(name)
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.switch:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.store_true:
        kwargs["action"] = "store_true"
    if spec.parse is not None:
        kwargs["type"] = spec.parse
    if spec.choices is not None:
        kwargs["choices"] = spec.choices
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    return kwargs
