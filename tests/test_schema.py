"""The option schema (base/schema.py): flags, YAML keys, RunConfig, hyper-parameters and the resume
rule all come from its groups, and adding an option is one field there."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from base.schema import DEFAULTS, FIELDS, GROUPS, DataOptions, NetworkOptions, OptimOptions, option_of
from cli.train import build_train_parser, parse_run_config
from run.config import FIXED_ON_RESUME, PER_INVOCATION, RunConfig

from conftest import copy_checkout
CPU = ["--accelerator", "cpu"]


def test_every_option_of_the_schema_is_a_flag_a_field_and_a_section_key():
    parser = build_train_parser()
    flags = {action.dest for action in parser._actions if action.option_strings} - {"help", "print_config"}
    assert flags == {name for name in FIELDS if option_of(name).flag}
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(FIELDS)
    sections = RunConfig().to_sections()
    assert list(sections) == list(GROUPS)
    assert {name for section in sections.values() for name in section} == set(FIELDS)
    assert FIXED_ON_RESUME == {name: option_of(name).fixed for name in FIELDS if option_of(name).fixed}
    assert PER_INVOCATION == {name for name in FIELDS if option_of(name).per_invocation}
    assert all(DEFAULTS[name] == getattr(RunConfig(), name) for name in FIELDS)


def test_the_groups_are_what_the_module_and_the_datamodule_take(tiny_data):
    from lit_modules import ImageClassifier
    from run.build import build_datamodule, build_module

    config = parse_run_config(["--model", "vgg16", "--lr", "0.05", "--label-smoothing", "0.1", "--batch-size", "7",
                               "--data-dir", str(tiny_data), *CPU])
    module = build_module(config, build_datamodule(config).dataset_info)
    assert isinstance(module, ImageClassifier)
    assert module.network == config.group(NetworkOptions) and module.network.label_smoothing == 0.1
    assert module.optim == config.group(OptimOptions) and module.optim.lr == 0.05
    assert module.hparams["optim"]["lr"] == 0.05 and module.hparams["network"]["model"] == "vgg16"
    datamodule = build_datamodule(config)
    assert datamodule.options == config.group(DataOptions) and datamodule.batch_size == 7


def test_a_value_means_the_same_as_a_flag_a_flat_key_and_a_section_key(tmp_path):
    flat, sectioned = tmp_path / "flat.yaml", tmp_path / "sectioned.yaml"
    flat.write_text("lr: 0.05\nbatch_size: 64\nlogger: [tensorboard, csv]\n")
    sectioned.write_text("optim:\n  lr: 0.05\ndata:\n  batch_size: 64\nrun:\n  logger: tensorboard,csv\n")
    by_flags = parse_run_config(["--lr", "0.05", "--batch-size", "64", "--logger", "tensorboard,csv", *CPU])
    for path in (flat, sectioned):
        from_file = parse_run_config(["--config", str(path), *CPU])
        assert dataclasses.replace(from_file, config=None) == by_flags
    assert by_flags.logger == ("tensorboard", "csv")


def test_print_config_is_a_config_file_that_runs_the_same_options(cli, tmp_path):
    shown = cli("train", "--print-config", "--lr", "0.02", "--optimizer", "sgd", "--logger", "csv", "--output-dir",
                str(tmp_path / "runs"), *CPU)
    assert shown.code == 0, shown.err
    printed = yaml.safe_load(shown.out)
    assert list(printed) == list(GROUPS)
    assert printed["optim"]["lr"] == 0.02 and printed["run"]["logger"] == ["csv"]
    assert printed["hardware"]["accelerator"] == "cpu"  # resolved: never auto
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained
    saved = tmp_path / "printed.yaml"
    saved.write_text(shown.out)
    again = cli("train", "--print-config", "--config", str(saved))
    assert again.code == 0, again.err
    second = yaml.safe_load(again.out)
    second["run"]["config"] = printed["run"]["config"]
    # The precision is the file's now, and said so: why auto chose it was the first command's reason.
    assert second["hardware"].pop("precision_reason") == "asked for"
    printed["hardware"].pop("precision_reason")
    assert second == printed


def test_a_key_in_another_groups_section_is_refused_at_its_line(cli, tmp_path):
    config = tmp_path / "wrong.yaml"
    config.write_text("network:\n  model: vgg16\noptim:\n  batch_size: 5\n")
    result = cli("train", "--config", str(config), *CPU)
    assert result.code == 2 and result.err.count("\n") == 1
    assert "line 3" in result.err and "'batch_size' is not an option of the optim section" in result.err
    assert "data" in result.err


@pytest.mark.slow
def test_an_option_is_one_field_in_the_schema(tmp_path):
    """docs/development.md's recipe: a field added to a group of base/schema.py is a flag with its help, a YAML key of
    its section, a RunConfig field, a hyper-parameter of the checkpoints, and obeys its resume rule."""
    checkout = copy_checkout(tmp_path, "base")
    schema = checkout / "base" / "schema.py"
    text = schema.read_text()
    anchor = '    step_size: int = option(20, '
    assert anchor in text
    schema.write_text(text.replace(anchor, '    warmup_epochs: int = option(0, "epochs of linear warm-up", '
                                           'parse=non_negative_int, fixed=SCHEDULE)\n' + anchor, 1))
    env = {**os.environ, "PYTHONPATH": str(checkout)}

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(checkout / "train.py"), *args], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=120)

    helped = train("--help")
    assert "--warmup-epochs WARMUP_EPOCHS" in helped.stdout and "epochs of linear warm-up" in helped.stdout
    bad = train("--warmup-epochs", "-1")
    assert bad.returncode == 2 and "--warmup-epochs: must be >= 0" in bad.stderr
    config = tmp_path / "recipe.yaml"
    config.write_text("optim:\n  warmup_epochs: 3\n")
    shown = train("--print-config", "--config", str(config), *CPU)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["optim"]["warmup_epochs"] == 3
    probe = subprocess.run(
        [sys.executable, "-c",
         "from base.schema import OptimOptions; from run.config import FIXED_ON_RESUME, RunConfig; "
         "from lit_modules import ImageClassifier; "
         "m = ImageClassifier('vgg16', OptimOptions(warmup_epochs=2)); "
         "print(m.hparams['optim']['warmup_epochs'], RunConfig().warmup_epochs, 'warmup_epochs' in FIXED_ON_RESUME)"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["2", "0", "True"]
