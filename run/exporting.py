"""Writing a trained backbone in formats other programs load: ONNX, TorchScript, safetensors.

Every file carries the same metadata (network, classes, expected input), so whoever receives it
can preprocess images correctly and, for safetensors, rebuild the network with ``build_model``.
The format libraries are optional (``pip install -e ".[export]"``) and imported only when used.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable
from typing import BinaryIO

import torch
from torch import nn

from datamodules.augment import TTA_MEANING
from run.checkpoints import CheckpointContents, checkpoint_dataset
from base.errors import UserError
from base.schema import EXPORT_FORMATS
from run.inference import IMAGE_SIZE, with_tta

FORMATS = EXPORT_FORMATS
PRODUCER = "cifar10-lightning"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# torch.export specialises a dimension whose example size is 0 or 1, so the example batch holds 2.
_EXAMPLE_BATCH = 2
_INSTALL_HINT = 'install the export extras: pip install -e ".[export]"'


def export_metadata(contents: CheckpointContents, class_names: list[str] | None = None, tta: str = "none") -> dict[str, str]:
    """String key/values (what ONNX and safetensors metadata can hold) describing the model.

    The classes and the normalisation are those of the data set the checkpoint was trained on
    (``run.checkpoints.checkpoint_dataset``), also whole as ``dataset`` (JSON of
    ``DatasetInfo.to_dict``), which test.py and predict.py read back from a safetensors file;
    ``class_names``, when given, must be its class names. ``tta``: the test-time augmentation the file scores with. The ONNX and TorchScript exporters
    build it into the graph (:func:`deployed`); a safetensors file holds weights only, so its
    metadata says what whoever loads it must do (predict.py and test.py do it).
    """
    info = checkpoint_dataset(contents)
    if class_names is not None and list(class_names) != list(info.classes):
        raise ValueError(f"class_names {class_names!r} are not the checkpoint's classes {list(info.classes)!r}")
    return {
        "producer": PRODUCER,
        "model_name": contents.model_name,
        "num_classes": str(contents.num_classes),
        "model_options": json.dumps(contents.model_options, sort_keys=True),
        "class_names": json.dumps(list(info.classes)),
        "dataset": json.dumps(info.to_dict()),
        "input": f"{INPUT_NAME}: float32 N,3,{IMAGE_SIZE},{IMAGE_SIZE}, RGB scaled to [0, 1] then (x - mean) / std",
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "output": f"{OUTPUT_NAME}: float32 N,{contents.num_classes}, softmax gives the class probabilities"
        + (f", {TTA_MEANING[tta]} ({tta} test-time augmentation)" if tta != "none" else ""),
        "tta": tta,
    }


def deployed(model: nn.Module, metadata: dict[str, str]) -> nn.Module:
    """The module a graph format (ONNX, TorchScript) is traced or scripted from: ``model`` itself,
    or with a ``metadata["tta"]`` other than "none" wrapped in that test-time augmentation
    (``augment.TestTimeAugmentation``), so the file answers what the checkpoint's run measured."""
    return with_tta(model, metadata.get("tta", "none")).eval()


def describe_export(metadata: dict[str, str], fmt: str) -> str:
    """What an export does about test-time augmentation, for export.py's one line; "" when none."""
    tta = metadata.get("tta", "none")
    if tta == "none":
        return ""
    if fmt == "safetensors":
        return (f"; test-time augmentation {tta} recorded in its metadata (predict.py and test.py apply it; "
                f"elsewhere take {TTA_MEANING[tta]})")
    return f"; test-time augmentation {tta} is in the graph: it outputs {TTA_MEANING[tta]}"


def _require_packages(fmt: str, *names: str) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format {fmt} needs the package(s) {', '.join(missing)}: {_INSTALL_HINT}")


def export_onnx(model: nn.Module, file: BinaryIO, metadata: dict[str, str]) -> None:
    """ONNX with a dynamic batch axis: input "images" (N,3,32,32), output "logits" (N,classes).

    Uses the torch.export-based exporter (PyTorch's default since 2.9, it needs onnxscript); the
    TorchScript-based one still works in 2.14 but warns that it will be removed.
    """
    _require_packages("onnx", "onnx", "onnxscript")
    example = torch.zeros(_EXAMPLE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    program = torch.onnx.export(
        deployed(model, metadata),
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    # Our networks are ~60 MB, far below protobuf's 2 GB limit: one self-contained file.
    file.write(program.model_proto.SerializeToString())


def export_torchscript(model: nn.Module, file: BinaryIO, metadata: dict[str, str]) -> None:
    """TorchScript by scripting, which keeps the ResNet's shortcut branches as real control flow.

    The metadata goes into the archive as ``metadata.json`` (read it back with
    ``torch.jit.load(path, _extra_files={"metadata.json": ""})``).
    """
    with warnings.catch_warnings():
        # PyTorch 2.10+ deprecates TorchScript and warns once per scripted method; the user asked for it.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        scripted = torch.jit.script(deployed(model, metadata))
        torch.jit.save(scripted, file, _extra_files={"metadata.json": json.dumps(metadata)})


def export_safetensors(model: nn.Module, file: BinaryIO, metadata: dict[str, str]) -> None:
    """The backbone's state dict (the course's key names) with the metadata to rebuild it, and the
    test-time augmentation to score with (``tta``)."""
    _require_packages("safetensors", "safetensors")
    from safetensors.torch import save

    file.write(save(model.state_dict(), metadata=metadata))


# Each writes the model into an open binary file, so base.files.atomic_write can wrap any of them.
EXPORTERS: dict[str, Callable[[nn.Module, BinaryIO, dict[str, str]], None]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "safetensors": export_safetensors,
}
