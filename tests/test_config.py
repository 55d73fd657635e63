"""The shipped configs are the course recipe, and the order of precedence is flags > config > defaults."""
from __future__ import annotations

import pytest

from conftest import load_script

train = load_script("train")


@pytest.mark.parametrize("model", ["vgg16", "resnet50"])
def test_shipped_config_equals_the_built_in_course_defaults(model):
    from_config = vars(train.parse_args(["--config", f"configs/{model}.yaml"]))
    built_in = vars(train.parse_args(["--model", model]))
    assert from_config.pop("config") == f"configs/{model}.yaml" and built_in.pop("config") is None
    assert from_config.pop("epochs") == train.COURSE_EPOCHS[model] and built_in.pop("epochs") is None
    assert from_config == built_in
    assert (built_in["optimizer"], built_in["lr"], built_in["batch_size"]) == ("adam", 1e-3, 100)
    assert (built_in["scheduler"], built_in["step_size"], built_in["gamma"]) == ("step", 20, pytest.approx(1 / 3))


def test_flags_override_the_config_whatever_their_order(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model: resnet50\nbatch_size: 64\nnesterov: true\noptimizer: sgd\n")
    args = train.parse_args(["--batch-size", "32", "--config", str(config)])
    assert (args.model, args.batch_size, args.nesterov, args.optimizer) == ("resnet50", 32, True, "sgd")
    assert train.parse_args(["--config", str(config), "--no-nesterov"]).nesterov is False
