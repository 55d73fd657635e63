"""Grad-CAM: where in an image the evidence for a class lies, by captum's ``LayerGradCam``.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017: the activations of a late convolutional layer, weighted by the mean
gradient of the class score over each channel, summed over channels, then ReLU. Each network's
catalog entry names its layer (``ModelEntry.cam_layer`` in models/catalog.py: VGG16's last
activation in ``features``, ResNet50's ``layer4``); both are 2x2 on 32x32 inputs, so a map says
which quarter of the picture, blended.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from base.errors import UserError
from models.catalog import entry

# captum is imported where a map is drawn, not with this module: training, testing and the
# benchmarks run without it (a lent GPU machine may have only torch and Lightning).
CAPTUM_MISSING = "Grad-CAM needs captum, which is not installed here: pip install 'captum>=0.8,<1'"


def grad_cam_available() -> bool:
    """Whether captum can be imported here (its import is a few hundred ms, paid once)."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def cam_layer(model: nn.Module, model_name: str) -> nn.Module:
    """The submodule of ``model`` (a ``model_name`` network) that Grad-CAM explains, as its catalog
    entry names it; UserError for a network whose entry names none (``cam_layer=None``)."""
    path = entry(model_name).cam_layer
    if path is None:
        raise UserError(f"{model_name} has no Grad-CAM layer (its models/catalog.py entry names no cam_layer)")
    return model.get_submodule(path)


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1], at the images' own size, for ``classes`` (N,), of the
    activations of ``layer``, a submodule of ``model`` (:func:`cam_layer` finds a network's).

    ``images`` are the network's normalised input (N, 3, H, W); each map is scaled by its own
    maximum (an all-zero map stays zero). The model runs in evaluation mode, with gradients,
    whatever the caller's mode; its parameters' gradients are left untouched. Raises
    ``UserError`` where captum is not installed (:func:`grad_cam_available` asks first).
    """
    try:
        from captum.attr import LayerGradCam
    except ImportError as exc:
        raise UserError(CAPTUM_MISSING) from exc
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            maps = LayerGradCam(model, layer).attribute(inputs, target=classes.tolist(), relu_attributions=True)
    finally:
        model.train(was_training)
    maps = F.interpolate(maps.detach().float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (maps / peak[:, None, None]).clamp(0, 1)
