"""The model catalog (models/catalog.py): one entry per network, read by every tool.

A tiny network registered as one entry must then train, test, predict with Grad-CAM, export and be
recognised from its state dict, with no other change anywhere.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import QUICK, ROOT, copy_checkout
from PIL import Image
from robustness import assert_one_line_error
from torch import nn

from base.errors import UserError
from models import catalog
from models.catalog import (
    CATALOG,
    COURSE_EPOCHS,
    MODEL_NAMES,
    ModelEntry,
    ModelOption,
    Signature,
    build_model,
    entry,
    recognise,
)
from models.explain import cam_layer, grad_cam


class TinyCNN(nn.Module):
    """Two 3x3 convolutions (8 then 16 channels, a 2x2 max-pool between), global average, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class TinyMLP(nn.Module):
    """No convolution, hence no layer for Grad-CAM to explain."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(3 * 32 * 32, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    return TinyCNN(num_classes)


def tiny_mlp(num_classes: int = 10) -> TinyMLP:
    return TinyMLP(num_classes)


# pytest imports this file as the top-level module ``test_model_catalog`` (tests/ is on sys.path).
TINY_CNN = ModelEntry(
    name="tiny_cnn",
    factory=f"{__name__}:tiny_cnn",
    course_epochs=1,
    signature=Signature(("body.0.weight", "body.3.weight"), "head.weight", 16),
    cam_layer="body.4",
)
TINY_MLP = ModelEntry(
    name="tiny_mlp",
    factory=f"{__name__}:tiny_mlp",
    course_epochs=1,
    signature=Signature(("hidden.weight",), "out.weight", 16),
)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Both tiny networks in the catalog for one test.

    Modules that still hold their own copy of the names or run lengths (a ``MODEL_NAMES`` of
    their own, before they read the catalog) are pointed at the catalog's live views.
    """
    catalog.register(TINY_CNN)
    catalog.register(TINY_MLP)
    import cli.test
    import cli.train
    import run.config

    for module in (cli.train, cli.test, run.config):
        for name, live in (("MODEL_NAMES", MODEL_NAMES), ("COURSE_EPOCHS", COURSE_EPOCHS)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, live)
    try:
        yield
    finally:
        catalog.unregister(TINY_CNN.name)
        catalog.unregister(TINY_MLP.name)


# --- the built-in entries -----------------------------------------------------------------------


# The built-in networks: the catalog holds them first, and may hold more.
BUILT_IN = ("vgg16", "vgg16_bn", "resnet50")


def test_the_catalog_lists_the_three_course_networks():
    assert MODEL_NAMES[:len(BUILT_IN)] == BUILT_IN and MODEL_NAMES == tuple(CATALOG)
    assert dict(COURSE_EPOCHS).items() >= {"vgg16": 250, "vgg16_bn": 250, "resnet50": 285}.items()


def test_the_catalog_loads_without_torch():
    code = "import sys, models.catalog, models; models.MODEL_NAMES; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "resnet50"])
def test_each_entry_matches_its_factory(name):
    """The options an entry declares are its factory's keywords, and its Grad-CAM layer is the last
    2x2 activation (VGG16: the ReLU before the last max-pool)."""
    found = entry(name)
    factory = found.load_factory()
    assert set(inspect.signature(factory).parameters) - {"num_classes"} == set(found.option_names)
    model = build_model(name, num_classes=3)
    layer = cam_layer(model, name)
    assert layer is (model.features[-2] if name.startswith("vgg") else model.layer4)
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert seen[0][-2:] == (2, 2)


@pytest.fixture(scope="module")
def small_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of the three networks built with 3 classes, and ResNet50 with identity shortcuts."""
    return {
        "vgg16": build_model("vgg16", 3).state_dict(),
        "vgg16_bn": build_model("vgg16_bn", 3).state_dict(),
        "resnet50": build_model("resnet50", 3).state_dict(),
        "resnet50+identity": build_model("resnet50", 3, identity_shortcut=True).state_dict(),
    }


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("vgg16", ("vgg16", {"num_classes": 3})),
        ("vgg16_bn", ("vgg16_bn", {"num_classes": 3})),
        ("resnet50", ("resnet50", {"num_classes": 3})),
        ("resnet50+identity", ("resnet50", {"num_classes": 3, "identity_shortcut": True})),
    ],
)
def test_recognise_names_each_network_and_its_options(small_state_dicts, key, expected):
    sd = small_state_dicts[key]
    assert recognise(sd) == expected
    # Through wrappers (DDP, compile), our LightningModule's prefix and an AveragedModel's counter.
    assert recognise({f"module._orig_mod.{k}": v for k, v in sd.items()}) == expected
    assert recognise({f"backbone.{k}": v for k, v in sd.items()}) == expected
    assert recognise({"n_averaged": torch.tensor(3), **{f"module.{k}": v for k, v in sd.items()}}) == expected
    # The legacy layer5 block of old course skeletons does not change what the file holds.
    if key == "resnet50":
        assert recognise({**sd, "layer5.0.layer.0.0.weight": torch.zeros(256, 1024, 1, 1)}) == expected


def test_recognise_refuses_a_matching_network_with_a_foreign_output_layer(small_state_dicts):
    sd = dict(small_state_dicts["vgg16"])
    sd["classifier.5.weight"] = torch.zeros(3, 100)
    with pytest.raises(UserError, match="^x.pt does not hold a state dict of vgg16, vgg16_bn"):
        recognise(sd, source="x.pt")


@pytest.mark.parametrize(
    ("name", "hint"),
    [("vgg19", " (did you mean vgg16?)"), ("ResNet-50", " (did you mean resnet50?)"), ("alexnet", "")],
)
def test_an_unknown_name_is_refused_with_the_names_and_the_likely_one(name, hint):
    with pytest.raises(UserError) as error:
        entry(name)
    assert str(error.value) == f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}{hint}"
    with pytest.raises(UserError, match="^unknown model"):
        build_model(name)


def test_entries_are_checked_when_written():
    with pytest.raises(ValueError, match="module:function"):
        ModelEntry("x", "models.vgg.vgg16", 1, TINY_CNN.signature)
    with pytest.raises(ValueError, match="already in the catalog"):
        catalog.register(entry("vgg16"))
    with pytest.raises(ValueError, match="built in"):
        catalog.unregister("vgg16")


# --- a network's own options and recipe --------------------------------------------------------


def test_a_networks_option_is_a_flag_a_key_a_field_and_a_hyper_parameter():
    """ResNet50's identity_shortcut is declared by its entry only, and is an option like the schema's."""
    from base.schema import DEFAULTS, GROUP_OF, NetworkOptions, option_of
    from cli.train import build_train_parser
    from lit_modules import ImageClassifier
    from run.config import FIXED_ON_RESUME, RunConfig

    assert [option.name for option in entry("resnet50").options] == ["identity_shortcut"]
    assert [option.name for option in entry("vgg16").options] == ["dropout"]
    flag = {action.dest: action for action in build_train_parser()._actions}["identity_shortcut"]
    assert flag.option_strings == ["--identity-shortcut", "--no-identity-shortcut"]
    assert option_of("identity_shortcut").help.startswith("resnet50: identity shortcut")
    assert GROUP_OF["identity_shortcut"] == "network" and DEFAULTS["identity_shortcut"] is False
    assert RunConfig().identity_shortcut is False and "identity_shortcut" in FIXED_ON_RESUME
    network = NetworkOptions(model="resnet50", identity_shortcut=True)
    assert network.identity_shortcut and network.options == {"dropout": 0.5, "identity_shortcut": True}
    assert list(ImageClassifier(network).hparams["network"]) == ["model", "dropout", "identity_shortcut", "label_smoothing", "tta"]
    with pytest.raises(TypeError, match="no option"):
        NetworkOptions(model="vgg16", width=3)


def test_vgg_dropout_is_an_option_of_both_vggs_that_reaches_the_network_and_its_hparams():
    """--dropout: both VGGs take it, ResNet50 refuses it, and it is what the built classifier and the
    checkpoint's hyper-parameters hold; the course's 0.5 builds the network exactly as before."""
    from torch import nn

    from base.schema import DEFAULTS, NetworkOptions, option_of
    from lit_modules import ImageClassifier
    from run.config import FIXED_ON_RESUME

    assert option_of("dropout").help.startswith("vgg16, vgg16_bn: probability")
    assert DEFAULTS["dropout"] == 0.5 and "dropout" in FIXED_ON_RESUME
    assert catalog.chosen_options({"dropout": 0.5}, "vgg16") == {}
    assert catalog.chosen_options({"dropout": 0.0}, "vgg16_bn") == {"dropout": 0.0}
    module = ImageClassifier(NetworkOptions(model="vgg16_bn", dropout=0.1))
    assert module.hparams["network"]["dropout"] == 0.1
    assert [m.p for m in module.backbone.classifier if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    course = build_model("vgg16")
    assert [m.p for m in course.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert list(build_model("vgg16", dropout=0.0).state_dict()) == list(course.state_dict())
    with pytest.raises(UserError, match="^--dropout applies to vgg16, vgg16_bn only, not resnet50$"):
        catalog.check_options("resnet50", {"dropout": 0.2})
    # The factories' own default is the catalog's, which a network built with none of its options gets.
    for name in ("vgg16", "vgg16_bn"):
        assert inspect.signature(entry(name).load_factory()).parameters["dropout"].default == 0.5
    # A value read from a file (a checkpoint's hyper-parameters, a saved config) is checked as a flag's.
    for bad, words in ((1.0, "must be at least 0 and below 1, got 1.0"), (float("nan"), "below 1, got nan"),
                       ("abc", "must be a float, got 'abc'"), (True, "must be a float, got True")):
        with pytest.raises(UserError, match=f"^model 'vgg16': dropout .*{re.escape(words)}"):
            build_model("vgg16", dropout=bad)


def test_a_registered_network_shares_the_catalogs_options_but_brings_no_new_one():
    from base.schema import option_of
    from run.config import merge, settle

    sharing = ModelEntry("tiny_shortcut", TINY_CNN.factory, 1, TINY_CNN.signature,
                         options=(ModelOption("identity_shortcut", bool, False, "its own words"),))
    catalog.register(sharing)
    try:
        assert option_of("identity_shortcut").help.startswith("resnet50, tiny_shortcut: identity shortcut")
        assert catalog.chosen_options({"identity_shortcut": True}, "tiny_shortcut") == {"identity_shortcut": True}
        with pytest.raises(UserError, match="^--identity-shortcut applies to resnet50, tiny_shortcut only, not vgg16$"):
            settle(merge({"identity_shortcut": True, "model": "vgg16"}))
    finally:
        catalog.unregister(sharing.name)
    assert option_of("identity_shortcut").help.startswith("resnet50: ")
    with pytest.raises(ValueError, match="width are not in the catalog"):
        catalog.register(ModelEntry("tiny_width", TINY_CNN.factory, 1, TINY_CNN.signature,
                                    options=(ModelOption("width", int, 8, "channels"),)))
    with pytest.raises(ValueError, match="another type, default, parser or in_state_dict"):
        catalog.register(ModelEntry("tiny_other", TINY_CNN.factory, 1, TINY_CNN.signature,
                                    options=(ModelOption("identity_shortcut", bool, True, "on by default"),)))
    with pytest.raises(ValueError, match="another type, default, parser or in_state_dict"):
        catalog.register(ModelEntry("tiny_dropout", TINY_CNN.factory, 1, TINY_CNN.signature,
                                    options=(ModelOption("dropout", float, 0.5, "its own, from the file"),)))
    assert not {"tiny_width", "tiny_other", "tiny_dropout"} & set(CATALOG)
    with pytest.raises(ValueError, match="lower-case identifier"):
        ModelOption("Width", int, 8, "channels")


def test_a_networks_recipe_gives_its_new_runs_their_defaults(tmp_path):
    """An entry's recipe is read as a config file under --config and the flags typed, for a new run of that network."""
    from cli.train import parse_run_config

    recipe = tmp_path / "tiny_recipe.yaml"
    recipe.write_text("model: tiny_recipe\noptimizer: sgd\nlr: 0.05\nweight_decay: 0.001\nrun_name: not_this\n")
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("lr: 0.2\n")
    catalog.register(ModelEntry("tiny_recipe", TINY_CNN.factory, 1, TINY_CNN.signature, recipe=str(recipe)))
    try:
        cpu = ["--accelerator", "cpu", "--output-dir", str(tmp_path / "runs")]
        plain = parse_run_config(["--model", "tiny_recipe", *cpu])
        assert (plain.optimizer, plain.lr, plain.weight_decay, plain.run_name) == ("sgd", 0.05, 0.001, None)
        assert parse_run_config(["--model", "tiny_recipe", "--lr", "0.1", *cpu]).lr == 0.1
        over = parse_run_config(["--model", "tiny_recipe", "--config", str(config_file), *cpu])
        assert (over.lr, over.weight_decay, over.config) == (0.2, 0.001, config_file)
        assert parse_run_config(cpu).lr == 0.001  # vgg16: the schema's defaults are its recipe
    finally:
        catalog.unregister("tiny_recipe")


@pytest.mark.slow
def test_a_built_in_network_with_an_option_of_its_own_is_one_entry(tmp_path):
    """docs/development.md's recipe for a network: its module and one entry in _BUILT_IN, options included."""
    checkout = copy_checkout(tmp_path, "models")
    (checkout / "models" / "tiny.py").write_text(
        "from torch import nn\n\n\ndef tiny(num_classes=10, width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))\n"
    )
    source = checkout / "models" / "catalog.py"
    text = source.read_text()
    anchor = "_REGISTRY: Registry[ModelEntry] = Registry("
    source.write_text(text.replace(anchor, (
        "_BUILT_IN += (ModelEntry('tiny', 'models.tiny:tiny', 3, Signature(('0.weight',), '3.weight', 8), "
        "options=(ModelOption('width', int, 8, 'channels of its convolution'),)),)\n"
    ) + anchor, 1))
    env = {**os.environ, "PYTHONPATH": str(checkout)}

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(checkout / "train.py"), *args], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=120)

    helped = train("--help")
    assert "--width WIDTH" in helped.stdout and "tiny: channels of its convolution" in helped.stdout
    refused = train("--width", "4", "--accelerator", "cpu")
    assert refused.returncode == 2 and "--width applies to tiny only, not vgg16" in refused.stderr
    shown = train("--print-config", "--model", "tiny", "--width", "4", "--accelerator", "cpu")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["network"]["width"] == 4 and printed["optim"]["epochs"] == 3


# --- one more network, as one entry ---------------------------------------------------------------


def test_a_registered_network_is_a_name_everywhere_and_recognised(registered):
    assert MODEL_NAMES[-2:] == ("tiny_cnn", "tiny_mlp") and COURSE_EPOCHS["tiny_cnn"] == 1
    model = build_model("tiny_cnn", num_classes=4)
    assert recognise(model.state_dict()) == ("tiny_cnn", {"num_classes": 4})
    assert recognise(build_model("tiny_mlp").state_dict()) == ("tiny_mlp", {"num_classes": 10})
    maps = grad_cam(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), cam_layer(model, "tiny_cnn"))
    assert maps.shape == (2, 32, 32)
    with pytest.raises(UserError, match="tiny_mlp has no Grad-CAM layer"):
        cam_layer(build_model("tiny_mlp"), "tiny_mlp")
    with pytest.raises(UserError, match="of vgg16, vgg16_bn, resnet50, tiny_cnn or tiny_mlp$"):
        recognise({"conv.weight": torch.zeros(1)}, source="x.pt")
    with pytest.raises(UserError, match="has no option width"):
        build_model("tiny_cnn", width=3)


def test_dashboards_draw_no_heat_maps_for_a_network_without_a_grad_cam_layer(registered):
    from callbacks.dashboards import _explain

    class Module(nn.Module):
        """What _explain reads of an ImageClassifier: its backbone and its network's name."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.backbone = build_model(name)
            self.network = SimpleNamespace(model=name)

    images, classes = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    assert _explain(Module("tiny_mlp"), images, classes) is None
    assert _explain(Module("tiny_cnn"), images, classes).shape == (2, 32, 32)


def test_predict_explain_refuses_a_network_without_a_grad_cam_layer(cli, registered, tmp_path):
    checkpoint = tmp_path / "mlp.pt"
    torch.save(build_model("tiny_mlp").state_dict(), checkpoint)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    out = tmp_path / "explained"
    result = cli("predict", "--ckpt", str(checkpoint), str(photo), "--explain", str(out), "--accelerator", "cpu")
    assert_one_line_error(result, "--explain: tiny_mlp has no Grad-CAM layer")
    assert not out.exists()
    assert cli("predict", "--ckpt", str(checkpoint), str(photo), "--accelerator", "cpu").code == 0


@pytest.mark.slow
def test_a_registered_network_trains_tests_explains_and_exports(cli, registered, tiny_data, tmp_path):
    output = tmp_path / "runs"
    trained = cli("train", "--model", "tiny_cnn", *QUICK, "--train-limit", "40", "--data-dir", str(tiny_data),
                  "--output-dir", str(output))
    assert trained.code == 0, trained.err
    best = next(output.glob("tiny_cnn/*/checkpoints/best.ckpt"))
    # The run was as long as the entry's course_epochs: Lightning counts one epoch trained.
    last = torch.load(best.with_name("last.ckpt"), map_location="cpu", weights_only=True)
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1

    tested = cli("test", "--ckpt", str(best), "--data-dir", str(tiny_data), "--accelerator", "cpu", "--workers", "0",
                 "--model", "tiny_cnn")
    assert tested.code == 0, tested.err
    assert "tiny_cnn on 50 test images" in tested.out

    photo = tmp_path / "photo.png"
    Image.new("RGB", (48, 32), (200, 60, 60)).save(photo)
    explained = tmp_path / "explained"
    predicted = cli("predict", "--ckpt", str(best), str(photo), "--explain", str(explained), "--accelerator", "cpu")
    assert predicted.code == 0, predicted.err
    assert "Grad-CAM pictures (layer body.4)" in predicted.out
    assert [p.name for p in explained.iterdir()][0].startswith("photo.gradcam-")

    exported = tmp_path / "tiny.safetensors"
    assert cli("export", "--ckpt", str(best), "--format", "safetensors", "--output", str(exported)).code == 0
    onnx = cli("export", "--ckpt", str(best), "--format", "onnx", "--output", str(tmp_path / "tiny.onnx"))
    assert onnx.code == 0, onnx.err

    # The exported weights, without our metadata, are recognised as the network by their keys.
    from safetensors.torch import load_file

    assert recognise(load_file(exported)) == ("tiny_cnn", {"num_classes": 10})
    again = cli("predict", "--ckpt", str(exported), str(photo), "--json")
    assert again.code == 0 and '"class"' in again.out
