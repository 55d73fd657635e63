"""Turning everyday image files into model input, and model output into probabilities.

Shared by predict.py and the export tests, so that every path through which a picture reaches a
network (checkpoint, ONNX, TorchScript, safetensors) sees exactly the same pixels.

Any picture becomes one 3x32x32 image the way the training data looks:

* EXIF orientation is applied first, so phone photos are not classified lying on their side;
* transparent pixels are composited onto white rather than dropped, because ``convert("RGB")``
  would expose whatever colour the file stores under them (often black);
* the largest centred square is cropped before resizing. CIFAR-10 images are square with the
  object centred and filling most of the frame; squashing a 4:3 or 16:9 picture into a square
  would distort the shapes the network learned, while the crop only drops edges, where the
  subject rarely is (the same rule as the usual ImageNet evaluation);
* the square is resized to 32x32 with antialiasing (without it, downscaling a photo by 100x
  aliases into noise), then normalised exactly like the test split (``eval_transform``), with
  the statistics of the data set the checkpoint was trained on (``run.checkpoints.checkpoint_dataset``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from base.datasets import CIFAR10, DatasetInfo
from base.errors import UserError
from base.files import atomic_write, printable
from base.schema import TTA_MODES
from datamodules.augment import TestTimeAugmentation
from datamodules.cifar10 import eval_transform
from datamodules.sources import to_rgb
from models.explain import grad_cam
from run.checkpoints import CheckpointContents, checkpoint_dataset
from run.hardware import resolve_hardware

IMAGE_SIZE = 32
_resize = v2.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True)


# Pictures of more pixels than this are decoded at reduced size where the format allows (JPEG), to
# at least _DRAFT_SIDE pixels a side: plenty for a 32x32 input, at a fraction of the memory.
_DRAFT_PIXELS = 16_000_000
_DRAFT_SIDE = 1024


@contextmanager
def any_size() -> Iterator[None]:
    """Within the block, Pillow opens pictures of any size, as predict.py promises.

    Pillow warns above 89 megapixels and refuses above 179 ("decompression bomb"), a guard for
    servers decoding strangers' uploads; here the user names their own pictures (a panorama, a
    scan). Pillow's limit is a module global: set for the block only, on predict.py's one thread.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class UnreadableImageError(UserError):
    """An image file that exists but cannot be decoded; predict.py skips these with a warning."""


def load_image(path: str | Path) -> torch.Tensor:
    """One image file as a uint8 3x32x32 tensor (see the module docstring for how).

    Raises UnreadableImageError, naming the file, when it cannot be decoded.
    """
    try:
        with any_size(), Image.open(path) as image:
            if image.width * image.height > _DRAFT_PIXELS:
                # A JPEG that large is decoded at a fraction of its size (1/2 to 1/8, by the
                # decoder's own scaling), still far above 32x32: a panorama needs no gigabytes.
                image.draft("RGB", (_DRAFT_SIDE, _DRAFT_SIDE))
            # Animated GIF/WebP: the first frame, which is what Image.open positions on.
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(f"cannot read image {printable(path)}: {reason}") from None
    except UserError as exc:  # an image mode with no RGB meaning
        raise UnreadableImageError(f"cannot read image {printable(path)}: {exc}") from None
    pixels = F.pil_to_tensor(rgb)
    side = min(pixels.shape[-2:])
    return _resize(F.center_crop(pixels, [side, side]))


def to_model_input(images: torch.Tensor, dataset: DatasetInfo = CIFAR10) -> torch.Tensor:
    """uint8 N,3,32,32 images -> float32 normalised with ``dataset``'s statistics (default: CIFAR-10's)."""
    return eval_transform(dataset.mean, dataset.std)(images)


def load_images(
    paths: Sequence[str | Path],
    on_unreadable: Callable[[UnreadableImageError], None] | None = None,
    dataset: DatasetInfo = CIFAR10,
) -> tuple[torch.Tensor, list[Path]]:
    """Model input (float32 N,3,32,32, normalised with ``dataset``'s statistics) for ``paths`` and
    the paths it holds, in the same order.

    An unreadable image raises, unless ``on_unreadable`` is given: then it is called with the
    error and the image is left out, which is why the paths that were loaded are returned too.
    """
    loaded: list[torch.Tensor] = []
    kept: list[Path] = []
    for path in paths:
        try:
            loaded.append(load_image(path))
        except UnreadableImageError as exc:
            if on_unreadable is None:
                raise
            on_unreadable(exc)
            continue
        kept.append(Path(path))
    if not loaded:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE), kept
    return to_model_input(torch.stack(loaded), dataset), kept


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, num_classes, float32 on the CPU) for normalised images.

    Puts ``model`` in eval mode (dropout off, BatchNorm on its running statistics), since a
    prediction must not depend on the other images of its batch. Each batch goes to the device
    the model's parameters are on.
    """
    model.eval()
    device = next(model.parameters()).device
    batches = [model(batch.to(device)).float().softmax(dim=1).cpu() for batch in images.split(batch_size)]
    return torch.cat(batches)


def checkpoint_tta(contents: CheckpointContents) -> str:
    """The test-time augmentation the checkpoint's run validated and tested with (one of ``TTA_MODES``);
    "none" for course state dicts, which record none."""
    tta = contents.hparams.get("tta") or "none"
    if tta not in TTA_MODES:
        raise UserError(f"{contents.path} records an unknown test-time augmentation {tta!r}; pass --tta with one of {', '.join(TTA_MODES)}")
    return str(tta)


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """``model`` scoring with the test-time augmentation ``tta``: itself for "none", else wrapped in
    ``augment.TestTimeAugmentation`` (exactly what validation and testing computed)."""
    return model if tta == "none" else TestTimeAugmentation(model, tta)


def class_names(contents: CheckpointContents) -> list[str]:
    """The class names a checkpoint was trained with, in label order (``checkpoint_dataset``)."""
    return list(checkpoint_dataset(contents).classes)


def explanation_picture(path: str | Path, heat_map: torch.Tensor) -> Image.Image:
    """The picture at ``path`` beside itself overlaid with ``heat_map``, at the picture's own size.

    ``heat_map`` (32, 32) in [0, 1] is over the model's input, the centred square that
    :func:`load_image` cropped: it is resized to that square's size and drawn there (red: the
    evidence), the rest of the picture dimmed. The result is twice the picture's width.
    """
    from matplotlib import colormaps

    with any_size(), Image.open(path) as image:
        picture = to_rgb(ImageOps.exif_transpose(image))
    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    heat = F.resize(heat_map[None, None].float(), [side, side], antialias=True)[0, 0].clamp(0, 1).numpy()
    colours = Image.fromarray((colormaps["jet"](heat)[..., :3] * 255).astype("uint8"))
    overlay = Image.blend(picture, Image.new("RGB", picture.size), 0.5)  # dim outside the square
    square = picture.crop((left, top, left + side, top + side))
    overlay.paste(Image.blend(square, colours, 0.45), (left, top))
    pair = Image.new("RGB", (2 * width, height), "white")
    pair.paste(picture, (0, 0))
    pair.paste(overlay, (width, 0))
    return pair


def inference_device(accelerator: str) -> torch.device:
    """The one device to predict on; resolve_hardware has already refused unavailable ones."""
    accelerator = resolve_hardware(accelerator, 1, "32-true").accelerator
    return torch.device("cuda" if accelerator == "gpu" else accelerator)


def explain_images(
    model: nn.Module,
    layer: nn.Module,
    images: torch.Tensor,
    predicted: torch.Tensor,
    paths: Sequence[Path],
    folder: Path,
    explain_class: str | None,
    names: Sequence[str],
) -> list[str]:
    """Write each image's Grad-CAM picture (:func:`explanation_picture`) into ``folder``.

    ``layer`` is the submodule of ``model`` explained (``models.explain.cam_layer``). ``images``
    are the model inputs of ``paths`` (N, 3, 32, 32); each map is of the ``predicted``
    class (N,), or of ``explain_class`` for all. Returns the files written, as printable text.
    """
    target = torch.full_like(predicted, list(names).index(explain_class)) if explain_class else predicted
    device = next(model.parameters()).device
    maps = grad_cam(model, images.to(device), target.to(device), layer).cpu()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, heat_map, label in zip(paths, maps, target.tolist()):
        out = _free_name(folder, f"{Path(path).stem}.gradcam-{names[label]}.png")
        atomic_write(out, lambda file: explanation_picture(path, heat_map).save(file, format="PNG"))
        written.append(printable(out))
    return written


def _free_name(folder: Path, name: str) -> Path:
    # Pictures of the same name from different folders must not overwrite each other.
    candidate, number = folder / name, 1
    while candidate.exists():
        number += 1
        candidate = folder / name.replace(".gradcam-", f"-{number}.gradcam-", 1)
    return candidate
