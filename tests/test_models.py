"""The two course networks (architecture, key names, init) and state-dict loading."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from base.errors import UserError
from models import (
    Bottleneck,
    build_model,
    infer_architecture,
    load_weights,
    normalize_keys,
    resnet50,
    vgg16,
    vgg16_bn,
)

# Building a model costs a few hundred ms, so read-only tests share these.


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return vgg16().eval()


@pytest.fixture(scope="module")
def vgg_bn() -> nn.Module:
    torch.manual_seed(0)
    return vgg16_bn().eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet50().eval()


@pytest.fixture(scope="module")
def resnet_identity() -> nn.Module:
    torch.manual_seed(0)
    return resnet50(identity_shortcut=True).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_and_reload(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """What a course checkpoint looks like: torch.save(model.state_dict()) read back safely."""
    torch.save(state_dict, path)
    return torch.load(path, weights_only=True)


# --- architecture -------------------------------------------------------------------------------


def test_parameter_counts(vgg: nn.Module, vgg_bn: nn.Module, resnet: nn.Module) -> None:
    assert n_params(vgg) == 14_983_498
    assert n_params(resnet) == 14_750_730
    # Thirteen BatchNorm2d layers add weight and bias per channel.
    assert n_params(vgg_bn) - n_params(vgg) == 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)


@pytest.mark.parametrize("fixture", ["vgg", "vgg_bn", "resnet", "resnet_identity"])
def test_output_shape(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_intermediate_shapes(resnet: nn.Module) -> None:
    expected = {
        "layer1": (2, 64, 8, 8),
        "layer2": (2, 256, 4, 4),
        "layer3": (2, 512, 2, 2),
        "layer4": (2, 1024, 2, 2),
        "avgpool": (2, 1024, 1, 1),
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, shape in expected.items():
            x = getattr(resnet, name)(x)
            assert tuple(x.shape) == shape, name
    assert resnet.fc.in_features == 1024


def test_vgg_key_names(vgg: nn.Module, vgg_bn: nn.Module) -> None:
    conv_indices = [i for i, m in enumerate(vgg.features) if isinstance(m, nn.Conv2d)]
    assert conv_indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    keys = vgg.state_dict().keys()
    assert {"features.0.weight", "features.28.bias", "classifier.1.weight",
            "classifier.2.running_mean", "classifier.5.weight"} <= keys  # fmt: skip
    assert not any(k.startswith("features.1.") for k in keys)

    bn_keys = vgg_bn.state_dict().keys()
    assert {"features.0.weight", "features.1.running_mean", "features.40.weight",
            "features.41.running_var", "classifier.5.weight"} <= bn_keys  # fmt: skip
    assert [type(m) for m in vgg.classifier] == [
        nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear
    ]  # fmt: skip


def test_resnet_key_names(resnet: nn.Module) -> None:
    keys = resnet.state_dict().keys()
    assert {
        "layer1.0.weight",
        "layer1.1.running_mean",
        "layer2.0.make_equal_channel.0.weight",
        "layer2.1.make_equal_channel.0.weight",
        "layer2.2.downsize.0.weight",
        "layer3.3.downsize.1.running_var",
        "layer4.5.layer.2.1.running_var",
        "layer4.5.make_equal_channel.0.weight",
        "fc.weight",
    } <= keys
    # The downsampling block is the last one of layer2 and layer3, and has no projection.
    assert not any(k.startswith("layer2.2.make_equal_channel") for k in keys)
    assert sorted({k.split(".downsize")[0] for k in keys if ".downsize." in k}) == [
        "layer2.2",
        "layer3.3",
    ]
    assert [len(resnet.layer2), len(resnet.layer3), len(resnet.layer4)] == [3, 4, 6]


def test_vgg_init(vgg: nn.Module) -> None:
    for conv in (m for m in vgg.features if isinstance(m, nn.Conv2d)):
        n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0
    # Linear layers keep PyTorch's default init, bounded by 1/sqrt(fan_in).
    assert vgg.classifier[1].weight.abs().max() <= 1 / math.sqrt(512)


def test_resnet_xavier_init(resnet: nn.Module) -> None:
    for m in resnet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_identity_shortcut_only_where_shapes_match(resnet_identity: nn.Module) -> None:
    keys = resnet_identity.state_dict().keys()
    projected = sorted({k.split(".make_equal_channel")[0] for k in keys if "equal_channel" in k})
    assert projected == ["layer2.0", "layer3.0", "layer4.0"]
    assert "layer2.2.downsize.0.weight" in keys and "layer3.3.downsize.0.weight" in keys
    assert resnet_identity.layer4[3].make_equal_channel is None


def test_bottleneck_default_projects_even_when_shapes_match() -> None:
    block = Bottleneck(256, 64, 256)
    assert isinstance(block.make_equal_channel, nn.Sequential) and block.downsize is None
    assert Bottleneck(256, 64, 256, identity_shortcut=True).make_equal_channel is None


# --- build_model --------------------------------------------------------------------------------


def test_build_model_by_name() -> None:
    assert {"vgg16", "vgg16_bn", "resnet50"} <= set(models.MODEL_NAMES)
    model = build_model("resnet50", num_classes=100, identity_shortcut=True)
    assert model.fc.out_features == 100 and model.layer2[1].make_equal_channel is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: build_model("vgg19"),
            "unknown model 'vgg19': choose one of vgg16, vgg16_bn, resnet50",  # the built-ins first
        ),
        (lambda: build_model("vgg16", num_classes=1), "num_classes"),
        (lambda: build_model("vgg16", identity_shortcut=True), "has no option identity_shortcut"),
    ],
)
def test_build_model_refuses(call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call()


# --- normalize_keys / infer_architecture --------------------------------------------------------


def test_normalize_keys_strips_wrapper_prefixes() -> None:
    t = torch.zeros(1)
    sd = {"module.a": t, "_orig_mod.b": t, "_orig_mod.module.c": t, "module._orig_mod.module.d": t,
          "e.module.f": t}  # fmt: skip
    assert list(normalize_keys(sd)) == ["a", "b", "c", "d", "e.module.f"]
    assert "module.a" in sd  # the input is left alone


def test_normalize_keys_keeps_module_versions(vgg_bn: nn.Module) -> None:
    # A real wrapper module, as DataParallel/torch.compile build, without compiling anything.
    wrapper = nn.Module()
    wrapper._orig_mod = nn.Module()
    wrapper._orig_mod.module = vgg_bn
    normalized = normalize_keys(wrapper.state_dict())
    assert list(normalized) == list(vgg_bn.state_dict())
    assert normalized._metadata["features.1"] == vgg_bn.state_dict()._metadata["features.1"]


def test_normalize_keys_refuses_collisions() -> None:
    with pytest.raises(UserError, match="twice"):
        normalize_keys({"module.a": torch.zeros(1), "a": torch.zeros(1)})


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("vgg", ("vgg16", {"num_classes": 10})),
        ("vgg_bn", ("vgg16_bn", {"num_classes": 10})),
        ("resnet", ("resnet50", {"num_classes": 10})),
        ("resnet_identity", ("resnet50", {"num_classes": 10, "identity_shortcut": True})),
    ],
)
def test_infer_architecture(fixture: str, expected, request: pytest.FixtureRequest) -> None:
    sd = request.getfixturevalue(fixture).state_dict()
    assert infer_architecture(sd) == expected
    assert infer_architecture({"module." + k: v for k, v in sd.items()}) == expected


def test_infer_architecture_reads_num_classes() -> None:
    sd = {"layer1.0.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(100, 1024)}
    assert infer_architecture(sd) == ("resnet50", {"num_classes": 100})


@pytest.mark.parametrize(
    "sd",
    [
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)},
        {"layer1.0.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)},
        # torchvision's VGG16 names its last layer classifier.6
        {"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.6.weight": torch.zeros(10, 9)},
        {},
    ],
)
def test_infer_architecture_refuses_other_files(sd) -> None:
    with pytest.raises(UserError, match="^x.pt does not hold a state dict of vgg16, vgg16_bn"):
        infer_architecture(sd, source="x.pt")
    with pytest.raises(UserError, match="^x.pt is not a state dict"):
        infer_architecture(list(sd), source="x.pt")


# --- load_weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [vgg16, resnet50])
def test_course_checkpoint_round_trip(factory, tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = factory().eval()
    sd = save_and_reload(trained.state_dict(), tmp_path / "course.ckpt")
    torch.manual_seed(2)
    fresh = factory().eval()
    assert load_weights(fresh, sd, "course.ckpt") == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_legacy_layer5_keys_ignored_and_reported(
    resnet: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = OrderedDict(resnet.state_dict())
    legacy.update({f"layer5.{k}": v for k, v in Bottleneck(1024, 256, 1024).state_dict().items()})
    sd = save_and_reload(legacy, tmp_path / "resnet50_epoch285.ckpt")
    with caplog.at_level(logging.WARNING, logger="models.weights"):
        ignored = load_weights(resnet50(), sd, "resnet50_epoch285.ckpt")
    assert ignored == [k for k in legacy if k.startswith("layer5.")] and len(ignored) == 28
    assert [r.getMessage() for r in caplog.records] == [
        "ignored 28 layer5.* keys of the old course skeleton in resnet50_epoch285.ckpt"
    ]


def test_unexpected_key_refused(resnet: nn.Module) -> None:
    sd = dict(resnet.state_dict(), **{"layer6.0.weight": torch.zeros(1)})
    expected = r"^cannot load a.ckpt: unexpected 1 key \(layer6.0.weight\)$"
    with pytest.raises(UserError, match=expected):
        load_weights(resnet50(), sd, "a.ckpt")


def test_missing_keys_refused(vgg: nn.Module) -> None:
    sd = dict(vgg.state_dict())
    for key in ("features.0.weight", "features.0.bias", "features.2.weight", "classifier.5.bias"):
        del sd[key]
    with pytest.raises(UserError) as info:
        load_weights(vgg16(), sd, "a.ckpt")
    assert str(info.value) == (
        "cannot load a.ckpt: missing 4 keys "
        "(features.0.weight, features.0.bias, features.2.weight, ...)"
    )


def test_other_num_classes_refused(resnet: nn.Module) -> None:
    with pytest.raises(UserError) as info:
        load_weights(resnet50(num_classes=100), resnet.state_dict(), "a.ckpt")
    assert str(info.value) == (
        "cannot load a.ckpt: "
        "size mismatch for fc.weight: checkpoint [10, 1024], model [100, 1024]; "
        "size mismatch for fc.bias: checkpoint [10], model [100]"
    )


def test_other_architecture_refused(vgg: nn.Module, resnet_identity: nn.Module) -> None:
    expected = r"^cannot load vgg.ckpt: missing \d+ keys .*; unexpected \d+ keys"
    with pytest.raises(UserError, match=expected):
        load_weights(resnet50(), vgg.state_dict(), "vgg.ckpt")
    # The identity variant lacks projections that the course layout requires.
    with pytest.raises(UserError, match=r"missing 56 keys \(layer2.1.make_equal_channel"):
        load_weights(resnet50(), resnet_identity.state_dict(), "id.ckpt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(vgg: nn.Module, bad: float) -> None:
    sd = {k: v.clone() for k, v in vgg.state_dict().items()}
    sd["classifier.1.weight"][3, 4] = bad
    target = vgg16()
    before = target.classifier[1].weight.clone()
    expected = "^cannot load a.ckpt: tensor classifier.1.weight holds NaN"
    with pytest.raises(UserError, match=expected):
        load_weights(target, sd, "a.ckpt")
    assert torch.equal(target.classifier[1].weight, before)


def test_not_a_state_dict_refused() -> None:
    with pytest.raises(UserError, match="^a.ckpt is not a state dict"):
        load_weights(vgg16(), [torch.zeros(1)], "a.ckpt")


def test_wrapper_prefixes_loaded(vgg_bn: nn.Module) -> None:
    sd = vgg_bn.state_dict()
    wrapped = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    target = vgg16_bn()
    assert load_weights(target, wrapped, "ddp.ckpt") == []
    assert all(torch.equal(v, sd[k]) for k, v in target.state_dict().items())


def test_a_zeroed_last_batchnorm_would_kill_a_course_bottleneck_branch():
    """Why resnet50_fast does not zero-initialise each residual branch's last BatchNorm (Goyal et al.,
    2017; torchvision's zero_init_residual): the course's branch ends with a ReLU after that
    BatchNorm, so with its scale and shift at 0 the ReLU sees exactly 0, passes no gradient, and
    the branch never learns. If the block loses that ReLU, revisit docs/results.md."""
    from models.resnet import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(8, 4, 8)
    last_bn = block.layer[-1][1]
    assert isinstance(last_bn, nn.BatchNorm2d) and isinstance(block.layer[-1][2], nn.ReLU)
    nn.init.zeros_(last_bn.weight)
    block(torch.randn(4, 8, 6, 6)).square().sum().backward()
    assert last_bn.weight.grad.abs().max() == 0 and last_bn.bias.grad.abs().max() == 0
    assert all(p.grad.abs().max() == 0 for p in block.layer.parameters())
    # The shortcut alone learns.
    assert block.make_equal_channel[0].weight.grad.abs().max() > 0
