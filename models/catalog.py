"""The networks this project knows: one :class:`ModelEntry` per network, the only place one is described.

An entry says how to build the network (a lazy ``"module:function"`` factory reference), the
course's run length for it, the keyword options its factory takes (each a :class:`ModelOption`:
name, type, default, help), the recipe a new run of it takes by default, how a state dict of it is
recognised from its keys alone (its :class:`Signature`), and which submodule Grad-CAM explains.
Everything else reads it: ``--model`` choices and the default epochs (:data:`MODEL_NAMES`,
:data:`COURSE_EPOCHS`), the networks' options (published into ``base.schema``, so each is a flag, a
config key, a field of the run's config and a hyper-parameter), :func:`build_model`, the checkpoint
readers (:func:`recognise`), predict.py ``--explain`` and the dashboards' heat maps
(:attr:`ModelEntry.cam_layer`).

This module imports neither torch nor the networks, so the command-line tools list the names and
refuse a mistyped one before torch loads; a factory's module is imported when a model is built.

A new network: its module in ``models/`` and one entry in :data:`_BUILT_IN` below, or, from
outside the project (a plugin, a test), ``register(ModelEntry(...))``.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from base.errors import UserError
from base.registry import Registry
from base.schema import TRAINING, Option, flag_of, set_network_options, unit_fraction

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Signature:
    """How a state dict of one network is told apart by its keys (wrapper prefixes removed).

    It matches when every key of ``required`` and ``classes_key`` is present and none of
    ``absent``. ``classes_key`` names the output layer's weight, a 2-D tensor
    (num_classes, ``in_features``), from which the class count is read. ``read_options``, when
    given, returns the factory options the keys reveal (ResNet50's ``identity_shortcut``), from
    the key names alone.
    """

    required: tuple[str, ...]
    classes_key: str
    in_features: int
    absent: tuple[str, ...] = ()
    read_options: Callable[[Collection[str]], dict[str, Any]] | None = None

    def matches(self, keys: Collection[str]) -> bool:
        return (
            self.classes_key in keys
            and all(key in keys for key in self.required)
            and not any(key in keys for key in self.absent)
        )


@dataclass(frozen=True)
class ModelOption:
    """One keyword option of a network's factory, declared by the entries that take it.

    It is an option of every command like those of ``base.schema``: the flag ``--NAME`` (with
    dashes; ``--NAME/--no-NAME`` for a bool), the key ``NAME`` of config files, a field of the run's
    config and a hyper-parameter of its checkpoints; a resume may not change it. ``type`` is
    ``bool``, ``int``, ``float`` or ``str``; ``help`` says what it does (``--help`` puts the names
    of the networks that take it in front); ``summary`` is how the run's one-line description
    names a bool option that is on (default: ``NAME=VALUE``, as for the others). ``parse`` is the
    value's parser from ``base.schema`` (``unit_fraction``), where the type's own would accept
    values the factory refuses. ``in_state_dict`` says whether the option shows in the network's
    state dict (its keys or shapes, as ``identity_shortcut``): a run started from weights then takes
    it from them; one that holds no weight (``dropout``) comes from the flags, the config and the
    defaults, like the training options. Entries declaring the same name must agree on all of it but
    its help and summary.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    summary: str | None = None
    parse: Callable[[str], Any] | None = None
    in_state_dict: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"model option {self.name!r}: a lower-case identifier, as its flag and YAML key")
        if self.type not in (bool, int, float, str) or not isinstance(self.default, self.type):
            raise ValueError(f"model option {self.name!r}: type bool, int, float or str, and a default of it")

    def check(self, value: Any, model: str) -> None:
        """UserError where ``value`` (read from a checkpoint, a saved config) is not of this option's
        type or not one its parser takes."""
        number = self.type is float and isinstance(value, int)
        if isinstance(value, bool) != (self.type is bool) or not (isinstance(value, self.type) or number):
            raise UserError(f"model '{model}': {self.name} must be a {self.type.__name__}, got {value!r}")
        if self.parse is not None:
            try:
                self.parse(str(value))
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"model '{model}': {self.name} {exc}") from None

    def schema_option(self, takers: Sequence[str]) -> Option:
        """Its ``base.schema.Option``: parser (its own, else argparse's for int and float), help and resume rule."""
        parse = self.parse or (self.type if self.type in (int, float) else None)
        return Option(f"{', '.join(takers)}: {self.help}", parse=parse,
                      choices=self.choices, switch=self.type is bool, fixed=TRAINING)


@dataclass(frozen=True)
class ModelEntry:
    """One network: its ``--model`` name and everything the tools need to know about it.

    ``factory`` is ``"package.module:function"``; the function takes ``num_classes`` and the
    keywords that ``options`` declare (:class:`ModelOption`), and returns the ``nn.Module``.
    ``course_epochs`` is the default run length. ``cam_layer`` is the dotted path of the submodule
    Grad-CAM explains (``nn.Module.get_submodule``: ``"layer4"``, ``"features.29"``), or None for a
    network without one: predict.py ``--explain`` then refuses it and the dashboards draw no heat
    maps. ``recipe``, when given, is the config a new run of this network takes its options from
    where neither ``--config`` nor the flags give them: a shipped recipe's name (``configs/NAME.yaml``)
    or a YAML file's path; without one the schema's defaults are its recipe.
    """

    name: str
    factory: str
    course_epochs: int
    signature: Signature
    cam_layer: str | None = None
    options: tuple[ModelOption, ...] = ()
    recipe: str | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Developer errors, found when the entry is written rather than when a user first builds it.
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.factory):
            raise ValueError(f"model entry {self.name!r}: factory must read 'package.module:function', got {self.factory!r}")
        if not isinstance(self.course_epochs, int) or self.course_epochs < 1:
            raise ValueError(f"model entry {self.name!r}: course_epochs must be a positive integer")
        if not all(isinstance(option, ModelOption) for option in self.options):
            raise ValueError(f"model entry {self.name!r}: options must be ModelOption declarations")
        if "num_classes" in self.option_names:
            raise ValueError(f"model entry {self.name!r}: num_classes is always passed; it is not an option")

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def load_factory(self) -> Callable[..., nn.Module]:
        """The factory function itself (its module is imported now, torch with it)."""
        module, _, function = self.factory.partition(":")
        return getattr(importlib.import_module(module), function)


# --- the networks -------------------------------------------------------------------------------

# Residual blocks of the course ResNet, e.g. "layer3.2." from "layer3.2.layer.0.0.weight", and the
# blocks that carry a shortcut module: a block without one was built with identity_shortcut=True.
_BLOCK_KEY = re.compile(r"^(layer[2-4]\.\d+\.)layer\.")
_SHORTCUT_KEY = re.compile(r"^(layer[2-4]\.\d+\.)(?:downsize|make_equal_channel)\.")


def _resnet_options(keys: Collection[str]) -> dict[str, Any]:
    blocks = {m.group(1) for m in map(_BLOCK_KEY.match, keys) if m}
    with_shortcut = {m.group(1) for m in map(_SHORTCUT_KEY.match, keys) if m}
    return {"identity_shortcut": True} if blocks - with_shortcut else {}


# The classifier's two Dropout layers, whose probability the course fixed at 0.5: the BatchNorm
# recipes that reach 94 % in 24 epochs have none, and weights load whatever it is.
_VGG_DROPOUT = ModelOption(
    "dropout", float, 0.5,
    "probability of the classifier's two Dropout layers, the course's by default; 0 turns them off",
    parse=unit_fraction, in_state_dict=False,
)

# VGG16's Grad-CAM layer is the last ReLU of ``features``, before its final max-pool: 2x2 x 512 on
# 32x32 inputs (after the pool it is 1x1, which locates nothing). Without BatchNorm ``features`` has
# 13 x (conv, relu) + 5 pools = 31 modules, with it 13 x 3 + 5 = 44; the ReLU is second to last.
_BUILT_IN = (
    ModelEntry(
        name="vgg16",
        factory="models.vgg:vgg16",
        course_epochs=250,
        signature=Signature(("features.0.weight",), "classifier.5.weight", 512, absent=("features.1.running_mean",)),
        cam_layer="features.29",
        options=(_VGG_DROPOUT,),
        description="the course's VGG16 (no BatchNorm2d), 14,983,498 parameters for 10 classes",
    ),
    ModelEntry(
        name="vgg16_bn",
        factory="models.vgg:vgg16_bn",
        course_epochs=250,
        signature=Signature(("features.0.weight", "features.1.running_mean"), "classifier.5.weight", 512),
        cam_layer="features.42",
        options=(_VGG_DROPOUT,),
        description="VGG16 with a BatchNorm2d after every convolution",
    ),
    ModelEntry(
        name="resnet50",
        factory="models.resnet:resnet50",
        course_epochs=285,
        signature=Signature(("layer1.0.weight",), "fc.weight", 1024, read_options=_resnet_options),
        cam_layer="layer4",  # the last bottleneck stage, 2x2 on 32x32 inputs
        options=(ModelOption(
            "identity_shortcut", bool, False,
            "identity shortcut where shapes match, instead of the course's projection everywhere",
            summary="identity shortcuts",
        ),),
        description="the course's ResNet50_layer4, 14,750,730 parameters for 10 classes",
    ),
)
_REGISTRY: Registry[ModelEntry] = Registry("model", _BUILT_IN)
_ENTRIES = _REGISTRY.entries


def _declared(entries: Iterable[ModelEntry]) -> dict[str, tuple[ModelOption, list[str]]]:
    """Each option the ``entries`` declare, with the names of those that take it."""
    found: dict[str, tuple[ModelOption, list[str]]] = {}
    for each in entries:
        for option in each.options:
            first, takers = found.setdefault(option.name, (option, []))
            if _rule(first) != _rule(option):
                raise ValueError(f"model entry {each.name!r}: option {option.name!r} is declared by "
                                 f"{', '.join(takers)} with another type, default, parser or in_state_dict")
            takers.append(each.name)
    return found


def _rule(option: ModelOption) -> tuple[Any, ...]:
    """What entries sharing an option must agree on (its help and summary are each entry's words)."""
    return option.type, option.default, option.choices, option.parse, option.in_state_dict


def _publish() -> None:
    """The options the entries declare into ``base.schema``: flags, keys, fields, hyper-parameters."""
    set_network_options({name: (option.type, option.default, option.schema_option(takers))
                         for name, (option, takers) in _declared(_ENTRIES.values()).items()})


_publish()

# Read-only live views: a registered network shows in each at once, also where it was imported
# with ``from models.catalog import MODEL_NAMES`` before the registration.
CATALOG: Mapping[str, ModelEntry] = _ENTRIES


class _Names(Sequence[str]):
    """The entries' names in catalog order; equal to a tuple or list of the same names."""

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return tuple(_ENTRIES)[index]

    def __len__(self) -> int:
        return len(_ENTRIES)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _ENTRIES

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_ENTRIES))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (_Names, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # it changes with the catalog

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Epochs(Mapping[str, int]):
    """Each entry's ``course_epochs`` by name."""

    def __getitem__(self, name: str) -> int:
        return _ENTRIES[name].course_epochs

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_ENTRIES))

    def __len__(self) -> int:
        return len(_ENTRIES)

    def __repr__(self) -> str:
        return repr(dict(self))


MODEL_NAMES: Sequence[str] = _Names()
COURSE_EPOCHS: Mapping[str, int] = _Epochs()


def register(new: ModelEntry) -> ModelEntry:
    """Add ``new`` to the catalog (after the built-in ones); it is then a model name everywhere.

    Raises ValueError where the name is taken. Its signature is tried after those registered
    before it, so it must not match their state dicts. Its options must be ones the catalog
    already has (same type and default): the run's config has a field per option, made when the
    commands load, so a network with an option of its own is a built-in entry (:data:`_BUILT_IN`).
    """
    known = _declared(_ENTRIES.values())
    new_options = [option.name for option in new.options if option.name not in known]
    if new_options:
        raise ValueError(f"model entry {new.name!r}: option(s) {', '.join(new_options)} are not in the catalog; "
                         "a network with options of its own is added to models/catalog.py's _BUILT_IN")
    _declared([*_ENTRIES.values(), new])  # the same type and default as the entries that have them
    _REGISTRY.add(new)
    _publish()  # --help names it among the networks that take each option
    return new


def unregister(name: str) -> None:
    """Remove a registered entry (a test's, at its end); the built-in ones stay."""
    _REGISTRY.remove(name)
    _publish()


def option_defaults(in_state_dict: bool | None = None) -> dict[str, Any]:
    """Each network option the catalog declares, at its default; with ``in_state_dict``, only those
    whose :attr:`ModelOption.in_state_dict` is that."""
    return {name: option.default for name, (option, _) in _declared(_ENTRIES.values()).items()
            if in_state_dict is None or option.in_state_dict == in_state_dict}


def chosen_options(values: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The network options ``values`` (a flat mapping of options or hyper-parameters) set to other
    than their defaults: the factory keywords of network ``name``, or of any network without it.
    The defaults are left out, so a course network is built with none."""
    declared = _declared(_ENTRIES.values())
    wanted = entry(name).option_names if name is not None else tuple(declared)
    return {key: values[key] for key in wanted
            if key in values and key in declared and values[key] != declared[key][0].default}


def check_options(name: str, values: Mapping[str, Any]) -> None:
    """UserError where ``values`` set an option, other than to its default, that network ``name`` does not take."""
    declared = _declared(_ENTRIES.values())
    for key in chosen_options(values):
        if key not in entry(name).option_names:
            raise UserError(f"{flag_of(key)} applies to {', '.join(declared[key][1])} only, not {name}")


def describe_options(name: str, values: Mapping[str, Any]) -> str:
    """Network ``name``'s options set in ``values``, as the run's one-line description shows them:
    `` (identity shortcuts)``, or nothing."""
    found = {option.name: option for option in entry(name).options}
    shown = [found[key].summary if found[key].type is bool and found[key].summary else f"{key}={value}"
             for key, value in chosen_options(values, name).items()]
    return f" ({', '.join(shown)})" if shown else ""


def _hint(name: str) -> str:
    by_norm = {n.lower().replace("-", "_"): n for n in _ENTRIES}
    target = name.lower().replace("-", "_")
    if target in by_norm:
        return f" (did you mean {by_norm[target]}?)"
    close = difflib.get_close_matches(target, list(by_norm), n=1, cutoff=0.6)
    return f" (did you mean {by_norm[close[0]]}?)" if close else ""


def entry(name: str) -> ModelEntry:
    """The catalog entry of ``name``; UserError naming the choices (and the likely one) otherwise."""
    if isinstance(name, str) and name in _ENTRIES:
        return _ENTRIES[name]
    hint = _hint(name) if isinstance(name, str) else ""
    raise UserError(f"unknown model {name!r}: choose one of {', '.join(_ENTRIES)}{hint}")


def build_model(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """Build a model by name; ``options`` are its entry's factory keywords (``identity_shortcut``).

    Names, class counts and options usually come from a config file or command line, so bad
    values raise UserError instead of a TypeError deep inside a constructor.
    """
    found = entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    unknown = sorted(set(options) - set(found.option_names))
    if unknown:
        offered = ", ".join(sorted(found.option_names)) or "none"
        raise UserError(f"model '{name}' has no option {', '.join(unknown)} (its options: {offered})")
    declared = {option.name: option for option in found.options}
    for key, value in options.items():
        declared[key].check(value, name)
    return found.load_factory()(num_classes=num_classes, **options)


def not_recognised(source: str) -> str:
    """The one-line refusal of a state dict that no entry's signature matches."""
    *others, last = _ENTRIES
    return f"{source} does not hold a state dict of {', '.join(others)}{' or ' if others else ''}{last}"


def recognise(state_dict: Mapping[str, Any], source: str = "the file") -> tuple[str, dict[str, Any]]:
    """Return ``(model name, build_model kwargs)`` for a state dict, judged from its keys alone.

    Wrapper prefixes (``module.``, ``_orig_mod.``), our LightningModule's ``backbone.`` and an
    ``AveragedModel``'s ``n_averaged`` are looked through (``models.weights.course_keys``). The
    entries are tried in catalog order; the first whose :class:`Signature` matches names the
    network. ``kwargs`` always holds ``num_classes`` (the first dimension of its ``classes_key``
    weight) and the options its keys reveal (``identity_shortcut=True`` for a ResNet saved with
    it). UserError naming ``source`` for anything that is not a state dict of a catalogued network,
    a matching one whose output layer has the wrong shape included. The weights themselves are
    validated later by ``models.weights.load_weights``.
    """
    import torch

    from models.weights import course_keys, require_state_dict

    require_state_dict(state_dict, source)
    keys = course_keys(state_dict)
    for found in _ENTRIES.values():
        signature = found.signature
        if not signature.matches(keys):
            continue
        weight = keys[signature.classes_key]
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != signature.in_features:
            raise UserError(not_recognised(source))
        kwargs: dict[str, Any] = {"num_classes": int(weight.shape[0])}
        if signature.read_options is not None:
            kwargs.update(signature.read_options(keys))
        return found.name, kwargs
    raise UserError(not_recognised(source))


def grad_cam_layer(name: str) -> str | None:
    """The dotted path of the layer Grad-CAM explains in network ``name``, or None where it has none."""
    return entry(name).cam_layer
