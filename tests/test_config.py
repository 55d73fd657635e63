"""One resolved run configuration: the shipped configs are the course recipe, flags > config > defaults."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from cli.train import build_train_parser, parse_run_config
from base.errors import UserError
from models.catalog import COURSE_EPOCHS
from run.config import DEFAULTS, RunConfig
from run.hardware import Machine, cpu_has_native_bf16, resolve_hardware

CPU = ["--accelerator", "cpu"]


@pytest.mark.parametrize("model", ["vgg16", "resnet50"])
def test_shipped_config_equals_the_built_in_course_defaults(model):
    from_config = dataclasses.asdict(parse_run_config(["--config", f"configs/{model}.yaml", *CPU]))
    built_in = dataclasses.asdict(parse_run_config(["--model", model, *CPU]))
    assert from_config.pop("config").name == f"{model}.yaml" and built_in.pop("config") is None
    assert from_config == built_in
    assert built_in["epochs"] == COURSE_EPOCHS[model]
    assert (built_in["optimizer"], built_in["lr"], built_in["batch_size"]) == ("adam", 1e-3, 100)
    assert (built_in["scheduler"], built_in["step_size"], built_in["gamma"]) == ("step", 20, pytest.approx(1 / 3))


def test_flags_override_the_config_whatever_their_order(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model: resnet50\nbatch_size: 64\nnesterov: true\noptimizer: sgd\n")
    resolved = parse_run_config(["--batch-size", "32", "--config", str(config), *CPU])
    assert (resolved.model, resolved.batch_size, resolved.nesterov, resolved.optimizer) == ("resnet50", 32, True, "sgd")
    assert parse_run_config(["--config", str(config), "--no-nesterov", *CPU]).nesterov is False


def test_the_parser_holds_no_defaults_and_help_shows_the_configs():
    """Every train.py default lives in the option schema; the parser only shows it."""
    parser = build_train_parser()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert {action.dest for action in flags} - {"print_config"} <= set(DEFAULTS)
    assert all(action.default is argparse.SUPPRESS for action in flags)
    text = parser.format_help()
    assert "DataLoader worker processes (--data-path loader) (default: 2)" in " ".join(text.split())
    assert DEFAULTS["workers"] == 2


def test_the_resolved_config_is_frozen_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_HOME", str(tmp_path / "d"))
    resolved = parse_run_config(["--data-dir", "$DATA_HOME/cifar", "--output-dir", "out", *CPU])
    assert resolved.data_dir == tmp_path / "d" / "cifar" and resolved.output_dir == tmp_path / "out"
    native = cpu_has_native_bf16()
    assert (resolved.accelerator, resolved.devices) == ("cpu", 1)
    assert resolved.precision == ("bf16-mixed" if native else "32-true") and "auto: " in resolved.precision_reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.lr = 0.5  # type: ignore[misc]
    assert isinstance(resolved, RunConfig)


def test_auto_precision_on_the_cpu_follows_its_native_bf16(monkeypatch):
    """--precision auto: bf16-mixed where PyTorch reports AMX or AVX512-BF16, fp32 elsewhere; the reason is kept."""
    import torch

    for amx, avx512_bf16, expected in ((True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        resolved = parse_run_config(CPU)
        assert resolved.precision == expected
        assert ("has native bfloat16" in resolved.precision_reason) == (expected == "bf16-mixed")
        assert resolved.to_dict()["precision_reason"] == resolved.precision_reason
    assert parse_run_config([*CPU, "--precision", "32-true"]).precision_reason == "asked for"


H100S = Machine(cuda_devices=2, cuda_bf16=True, cpu_bf16="AMX")
OLD_GPU = Machine(cuda_devices=1, cuda_bf16=False)
# A T4 or V100: torch.cuda.is_bf16_supported() says yes, but only by emulation (slower than fp32).
EMULATING_GPU = Machine(cuda_devices=1, cuda_bf16=False, cuda_bf16_emulated=True)


@pytest.mark.parametrize(
    ("machine", "request_", "expected"),
    [
        (H100S, ("auto", "auto", "auto"), ("gpu", 2, "bf16-mixed")),
        (H100S, ("gpu", "0,1", "16-mixed"), ("gpu", (0, 1), "16-mixed")),
        (H100S, ("cuda", "-1", "32-true"), ("gpu", 2, "32-true")),
        (H100S, ("cpu", "auto", "auto"), ("cpu", 1, "bf16-mixed")),
        (OLD_GPU, ("auto", "1", "auto"), ("gpu", 1, "32-true")),
        (EMULATING_GPU, ("auto", "1", "auto"), ("gpu", 1, "32-true")),
        (EMULATING_GPU, ("gpu", "1", "bf16-mixed"), ("gpu", 1, "bf16-mixed")),
        (Machine(), ("auto", "-1", "auto"), ("cpu", 1, "32-true")),
    ],
)
def test_hardware_resolves_for_the_machine_pytorch_reports(machine, request_, expected):
    """What auto means, and device lists, on machines this one is not (GPUs as PyTorch would report them)."""
    hardware = resolve_hardware(*request_, machine=machine)
    assert (hardware.accelerator, hardware.devices, hardware.precision) == expected


@pytest.mark.parametrize(
    ("machine", "request_", "fragment"),
    [
        (H100S, ("gpu", "0,2", "auto"), "GPU index 2 does not exist"),
        (H100S, ("gpu", "4", "auto"), "only 2 GPU(s) visible"),
        (OLD_GPU, ("gpu", "1", "bf16-mixed"), "no bfloat16 support"),
        (Machine(), ("gpu", "1", "auto"), "no CUDA GPU"),
        (Machine(), ("mps", "1", "auto"), "MPS backend is not available"),
        (H100S, ("cpu", "0,1", "auto"), "a list names GPU indices"),
        (H100S, ("cpu", "1", "16-mixed"), "needs a GPU"),
    ],
)
def test_hardware_that_cannot_run_is_refused(machine, request_, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve_hardware(*request_, machine=machine)


def test_no_gpu_device_nodes_means_no_gpu_without_asking_torch(monkeypatch):
    """Linux without /dev/nvidiactl, /dev/dxg, /dev/kfd...: a GPU request is refused before torch loads;
    with such a node the request is left to PyTorch."""
    import run.hardware as hardware

    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    assert hardware.certainly_without_gpu()
    with pytest.raises(UserError, match="no CUDA GPU"):
        hardware.check_hardware_request("gpu", "1", "auto")
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [pattern] if pattern == "/dev/nvidiactl" else [])
    assert not hardware.certainly_without_gpu()
    hardware.check_hardware_request("gpu", "8", "bf16-mixed")  # only PyTorch can say: not refused here
    with pytest.raises(UserError, match="GPU indices"):
        hardware.check_hardware_request("cpu", "0,1", "auto")  # on the CPU whatever the GPUs
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    assert not hardware.certainly_without_gpu()  # MPS: ask PyTorch


def test_probe_takes_only_native_gpu_bf16(monkeypatch):
    """A GPU that emulates bfloat16 (torch's is_bf16_supported() is true by default there) is not
    one that --precision auto runs bf16 on; an explicit bf16-mixed still may."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    machine = Machine.probe()
    assert (machine.cuda_bf16, machine.cuda_bf16_emulated) == (False, True)
    assert resolve_hardware("gpu", "1", "auto", machine=machine).precision == "32-true"
