"""Loading plain state dicts (the course's ``torch.save(model.state_dict())`` files and ours).

Every problem a user can fix (wrong file, other architecture, other number of classes, corrupt
values) is raised as :class:`base.errors.UserError` with a one-line message naming the source,
so the command-line tools print it without a traceback.

The one tolerated mismatch, the ``layer5.*`` keys of an unused block that old copies of the course
skeleton defined, is reported through the ``logging`` module (logger ``models.weights``, level
WARNING) rather than ``warnings``: it is a message for the person running the tool, not for the
developer, and logging prints it once per load without a file:line prefix.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from base.errors import UserError
from models.catalog import recognise

logger = logging.getLogger(__name__)

# DataParallel/DDP save under "module.", torch.compile under "_orig_mod."; both can nest.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where this project's LightningModule (lit_modules.ImageClassifier) keeps the network.
MODULE_PREFIX = "backbone."
# BatchNorm's counter of batches seen, added in PyTorch 0.4.1; only BatchNorm with momentum=None
# reads it (none here), and PyTorch loads state dicts of older versions without it as 0.
_BATCH_COUNTER = "num_batches_tracked"
_AVERAGED_COUNTER = "n_averaged"
LEGACY_PREFIX = "layer5."
_PREVIEW = 3


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
    return key


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Return a new state dict with the ``module.`` / ``_orig_mod.`` prefixes removed from its keys.

    Raises UserError if two keys collapse onto one name, since silently keeping either would
    load weights the user did not mean.
    """
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        name = _strip_wrappers(key)
        if name in out:
            raise UserError(f"the state dict holds '{name}' twice, with and without a wrapper")
        out[name] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # Module versions drive load_state_dict's migrations, so they follow the keys. Their keys
        # are module paths without the trailing dot ("" for the root), hence the added dot.
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (_strip_wrappers(path + ".")[:-1], version) for path, version in metadata.items()
        )
    return out


def _without_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the ``backbone.`` in front of every key that a state dict of this
    project's LightningModule (``torch.save(module.state_dict())``, whose network is its
    ``backbone``) has; any other state dict as it is. Only when every key has it: a dict mixing
    both is another model, refused by the key check."""
    if not state_dict or not all(key.startswith(MODULE_PREFIX) for key in state_dict):
        return state_dict
    out: OrderedDict[str, Any] = OrderedDict((key[len(MODULE_PREFIX) :], value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (path[len(MODULE_PREFIX) :] if path.startswith(MODULE_PREFIX) else "", version)
            for path, version in metadata.items()
            if path.startswith(MODULE_PREFIX) or path == MODULE_PREFIX[:-1]
        )
    return out


def course_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of the network itself: wrapper prefixes (``module.``, ``_orig_mod.``) and our
    LightningModule's ``backbone.`` removed (see :func:`normalize_keys`), and the update counter
    ``n_averaged`` of ``torch.optim.swa_utils.AveragedModel`` (EMA/SWA weights, saved as
    ``n_averaged`` beside ``module.*``) dropped."""
    if _AVERAGED_COUNTER in state_dict and all(
        key.startswith("module.") for key in state_dict if key != _AVERAGED_COUNTER
    ):
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k != _AVERAGED_COUNTER)
        if metadata is not None:
            state_dict._metadata = metadata  # type: ignore[attr-defined]
    return _without_module_prefix(normalize_keys(state_dict))


def require_state_dict(obj: object, source: str) -> None:
    """UserError naming ``source`` unless ``obj`` is a mapping with text keys."""
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise UserError(
            f"{source} is not a state dict (expected a mapping of parameter names to tensors)"
        )


def infer_architecture(
    state_dict: Mapping[str, Any], source: str = "the file"
) -> tuple[str, dict[str, Any]]:
    """Return ``(model name, build_model kwargs)`` for a state dict, judged from its keys alone:
    :func:`models.catalog.recognise`, which reads each network's signature from its catalog entry."""
    return recognise(state_dict, source)


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_PREVIEW])
    return shown + ", ..." if len(keys) > _PREVIEW else shown


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        problems.append(f"missing {_plural(len(missing), 'key')} ({_preview(missing)})")
    if unexpected:
        problems.append(f"unexpected {_plural(len(unexpected), 'key')} ({_preview(unexpected)})")
    wrong = []
    for key, value in given.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            wrong.append(
                f"size mismatch for {key}: checkpoint {list(value.shape)}, "
                f"model {list(expected[key].shape)}"
            )
    problems.extend(wrong[:_PREVIEW])
    if len(wrong) > _PREVIEW:
        problems.append(f"and {_plural(len(wrong) - _PREVIEW, 'more mismatched tensor')}")
    return problems


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> list[str]:
    """Load ``state_dict`` into ``model`` with strict semantics; return the ignored legacy keys.

    Wrapper prefixes and our LightningModule's ``backbone.`` are removed, missing BatchNorm
    ``num_batches_tracked`` counters (state dicts of PyTorch before 0.4.1) start at 0 as PyTorch
    does, and ``layer5.*`` keys (the unused block of old course skeletons) are dropped and
    reported with one WARNING log line. Any other difference in keys or shapes,
    and any NaN/inf in a floating tensor, raises UserError naming ``source``; the model is left
    untouched in that case.
    """
    require_state_dict(state_dict, source)
    sd = course_keys(state_dict)
    ignored = [key for key in sd if key.startswith(LEGACY_PREFIX)]
    for key in ignored:
        del sd[key]

    expected = model.state_dict()
    # A state dict of PyTorch before 0.4.1 has no BatchNorm batch counters; PyTorch itself loads
    # it (with the counter at 0), so it loads here too, whatever version its metadata claims. Only
    # beside the layer's running statistics: a layer missing altogether is a real mismatch.
    for key, value in expected.items():
        module, _, name = key.rpartition(".")
        if name == _BATCH_COUNTER and key not in sd and f"{module}.running_mean" in sd:
            sd[key] = torch.zeros_like(value)
    problems = _mismatches(expected, sd)
    if problems:
        raise UserError(f"cannot load {source}: " + "; ".join(problems))
    for key, value in sd.items():
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            raise UserError(f"cannot load {source}: tensor {key} holds NaN or infinite values")

    model.load_state_dict(sd, strict=True)
    if ignored:
        logger.warning(
            "ignored %d layer5.* keys of the old course skeleton in %s", len(ignored), source
        )
    return ignored
