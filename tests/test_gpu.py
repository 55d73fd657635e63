"""On a CUDA GPU: bf16, channels_last, compile, the device data path, train -> resume -> test, and CPU loading.

Every test that does not need CUDA itself runs twice: on the GPU (id ``cuda``, skipped without
one) and as its CPU rehearsal (id ``rehearsal``), so that CI runs the very bodies the GPU runs
and they cannot rot unseen. Only CUDA's sync detector and the speed floor are CUDA alone.
``scripts/gpu_proof.py`` runs them on a lent GPU (``pytest -m gpu -k "not rehearsal"``) and its
``--dry-run`` the rehearsals (``-k rehearsal``).

In order of value, as the proof runs them under its time cap (most within the first minute; the
compiled run last, its inductor compiles the longest): the fast recipe, no host sync in its steps,
train -> resume -> test with CPU loading, auto precision, the device data path, the EMA's device,
resnet50, the range test, Grad-CAM, the speed floor, the compiled run.
"""
from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import QUICK_VGG

from base.schema import OptimOptions
from datamodules import CIFAR10DataModule
from models import build_model

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu]
# The CPU rehearsals that train are slow on a CPU (seconds to a minute each): CI's slow tier.
DEVICES = [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA), pytest.param("cpu", id="rehearsal", marks=pytest.mark.slow)]
QUICK_DEVICES = [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA), pytest.param("cpu", id="rehearsal")]


def on(device: str) -> list[str]:
    """train.py's flags for one ``device`` ("cuda" or "cpu")."""
    return ["--accelerator", "gpu" if device == "cuda" else "cpu", "--devices", "1"]


FAST = ["--config", "configs/vgg16_bn_fast.yaml", "--time-to-accuracy", "0.5", "--workers", "0", "--val-size", "50",
        "--eval-batch-size", "500", "--epochs", "2"]


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    """A python-archive CIFAR-10 of 600 training images: at batch 128 after 50 held out, four full
    batches and a short last one of 38."""
    from fakedata import make_python_archive

    return make_python_archive(tmp_path_factory.mktemp("gpu-data"), 600, 100)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_recipe_with_a_short_last_batch(cli, gpu_data, tmp_path, device):
    """configs/vgg16_bn_fast.yaml (batch 128, Cutout, reflected shifts, EMA, flip-translate TTA, one-cycle)
    with time to accuracy: trains,
    tests, and its results record the averaged model and the time-to-accuracy epochs."""
    report = tmp_path / "results.json"
    result = cli("train", *FAST, *on(device), "--data-dir", str(gpu_data), "--output-dir", str(tmp_path),
                 "--results-json", str(report))
    assert result.code == 0, result.err
    _check_fast_recipe(report, tmp_path)


def _check_fast_recipe(report, output) -> dict:
    results = json.loads(report.read_text())
    assert results["epochs_trained"] == 2 and len(results["time_to_accuracy"]["epochs"]) == 2
    assert results["test_accuracy"] is not None and results["tta"] == "flip-translate" and results["ema_decay"] == 0.998
    best = torch.load(output / "vgg16_bn" / "version_0" / "checkpoints" / "best.ckpt", map_location="cpu",
                      weights_only=True)
    # The options are saved grouped (base.schema): the network's with its test-time augmentation.
    assert "current_model_state" in best and best["hyper_parameters"]["network"]["tta"] == "flip-translate"
    assert best["datamodule_hyper_parameters"]["augmentation"] == {"translate": 4, "padding": "reflect", "cutout": 8}
    return best


@NEEDS_CUDA
def test_fast_recipe_training_steps_never_sync_with_the_host(cli, gpu_data, tmp_path, extra_callback):
    """CUDA's sync detector set to "error" from the third training step on: no step (EMA update, loss
    guard, metrics, batches) waits for the GPU. Logging steps are out of this window (--log-every-n-steps 50).
    (On the CPU, tests/test_host_syncs.py counts the same reads.)"""
    from lightning.pytorch.callbacks import Callback

    checked = []

    class _SyncsAreErrors(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2:
                torch.cuda.set_sync_debug_mode("error")
                checked.append(batch_idx)

    class _Back(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 >= trainer.num_training_batches:
                torch.cuda.set_sync_debug_mode("default")

        def on_exception(self, trainer, pl_module, exception):
            torch.cuda.set_sync_debug_mode("default")

    extra_callback(_Back, first=[_SyncsAreErrors])
    try:
        result = cli("train", *FAST, *on("cuda"), "--epochs", "1", "--batch-size", "32", "--log-every-n-steps", "50",
                     "--data-dir", str(gpu_data), "--output-dir", str(tmp_path))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.code == 0, result.err
    assert len(checked) >= 10  # 550 images at batch 32: 18 steps, 16 of them checked


@pytest.fixture(scope="module", params=DEVICES)
def gpu_run(request, tmp_path_factory, tiny_data):
    """A 2-epoch run on the device (``gpu_run.device``) with auto precision, trained 1 epoch then
    resumed; its run folder."""
    from conftest import load_script

    device = request.param
    output = tmp_path_factory.mktemp(f"{device}-runs")
    codes = []
    for epochs, resume in (("1", []), ("2", ["--resume", "last"])):
        with pytest.raises(SystemExit) as exit_info:
            sys.exit(load_script("train").main([*QUICK_VGG, *on(device), "--data-dir", str(tiny_data), "--epochs", epochs,
                                                 "--output-dir", str(output), *resume]))
        codes.append(exit_info.value.code)
    assert codes == [0, 0]
    yield SimpleNamespace(folder=output / "vgg16" / "version_0", device=device)
    shutil.rmtree(output, ignore_errors=True)


def test_train_resume_test_and_the_checkpoint_loads_on_the_cpu(cli, gpu_run, tiny_data, tmp_path):
    last = torch.load(gpu_run.folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # 2 epochs of 2 steps: the resume continued, not restarted
    report = tmp_path / "cpu.json"
    result = cli("test", "--ckpt", str(gpu_run.folder / "checkpoints" / "best.ckpt"), "--accelerator", "cpu",
                 "--data-dir", str(tiny_data), "--json", str(report))
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["images"] == 50


def test_auto_precision_and_channels_last(gpu_run):
    """bf16-mixed where the device runs it natively (a GPU that only emulates it, such as a T4 or
    V100, stays in fp32, as does a CPU without AMX or AVX512-BF16); channels_last on a GPU."""
    from run.hardware import cpu_has_native_bf16, cuda_bf16_native

    config, device = yaml.safe_load((gpu_run.folder / "config.resumed.yaml").read_text()), gpu_run.device
    native = cuda_bf16_native() if device == "cuda" else cpu_has_native_bf16() is not None
    assert config["accelerator"] == ("gpu" if device == "cuda" else "cpu")
    assert config["precision"] == ("bf16-mixed" if native else "32-true")
    assert config["channels_last"] is (device == "cuda" or native)


@pytest.mark.parametrize("where", QUICK_DEVICES)
def test_device_data_path_builds_batches_on_the_device(tiny_data, where):
    datamodule = CIFAR10DataModule(tiny_data, batch_size=8, val_size=20, download=False, data_path="auto",
                                   channels_last=True, device=where, workers=0)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.device.type == labels.device.type == where
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_ema_average_lives_on_the_training_device(gpu_data, extra_callback, cli, tmp_path, device):
    """After the strategy moved the module to the device, the EMA's average is there too."""
    from lightning.pytorch.callbacks import Callback

    from callbacks.recipes import WeightEMA

    seen = {}

    class _Where(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ema = next(c for c in trainer.callbacks if isinstance(c, WeightEMA))
            seen["average"] = {p.device.type for p in ema._average_model.parameters()}
            seen["module"] = {p.device.type for p in pl_module.parameters()}

    extra_callback(_Where)
    result = cli("train", *FAST, *on(device), "--epochs", "1", "--data-dir", str(gpu_data), "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    assert seen == {"average": {device}, "module": {device}}


@pytest.mark.parametrize("device", DEVICES)
def test_resnet50_trains(cli, gpu_data, tmp_path, device):
    result = cli("train", "--config", "configs/resnet50_fast.yaml", *on(device), "--epochs", "1", "--workers", "0",
                 "--val-size", "50", "--data-dir", str(gpu_data), "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    assert (tmp_path / "resnet50" / "version_0" / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("device", DEVICES)
def test_lr_find(cli, tiny_data, tmp_path, monkeypatch, device):
    from run import lr_find

    monkeypatch.setattr(lr_find, "STEPS", 20)
    result = cli("train", *QUICK_VGG, *on(device), "--data-dir", str(tiny_data), "--output-dir", str(tmp_path),
                 "--find-lr", "--batch-size", "4")
    assert result.code == 0, result.err
    suggestion = json.loads((tmp_path / "vgg16" / "lr_find" / "version_0" / "lr_find.json").read_text())["suggestion"]
    assert lr_find.MIN_LR <= suggestion <= lr_find.MAX_LR


@pytest.mark.parametrize("where", QUICK_DEVICES)
def test_grad_cam(where):
    """The network and its Grad-CAM layer on the device; the map itself needs captum, which a lent GPU
    machine may lack: only that part is skipped there."""
    from models.explain import cam_layer, grad_cam, grad_cam_available

    model = build_model("resnet50").to(where).eval()
    images, labels = torch.randn(2, 3, 32, 32, device=where), torch.tensor([1, 2], device=where)
    layer = cam_layer(model, "resnet50")
    assert next(layer.parameters()).device.type == where and model(images).shape == (2, 10)
    if not grad_cam_available():
        pytest.skip("captum is not installed: the Grad-CAM map itself is not drawn")
    maps = grad_cam(model, images, labels, layer)
    assert maps.device.type == where and maps.shape == (2, 32, 32)


@NEEDS_CUDA
def test_training_speed_floor_over_50_steps():
    """vgg16 at batch 512 in bf16 with channels_last, the device data path and Lightning: at least
    20,000 training images/s over 50 steps after 10 warm-up steps (the target is 100,000)."""
    import time

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from datamodules.augment import Placement, TrainBatches
    from lit_modules import ImageClassifier
    from models import prepare_backbone

    class _Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 10:
                torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    images = torch.randint(0, 256, (60 * 512, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (60 * 512,))
    batches = TrainBatches(images, labels, 512, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3,
                           placement=Placement(device="cuda", channels_last=True))
    module = ImageClassifier("vgg16", OptimOptions(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, scheduler="none"))
    prepare_backbone(module.backbone, channels_last=True, compile=False)
    clock = _Clock()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=60, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], benchmark=True, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=batches)
    rate = 50 * 512 / clock.seconds
    print(f"vgg16 bf16 channels_last: {rate:,.0f} training images/s over 50 steps")
    assert rate >= 20_000, f"{rate:,.0f} img/s"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fast_recipe_writes_checkpoints_that_load_uncompiled(cli, gpu_data, tmp_path, device):
    """The fast recipe under --compile (one run: its inductor compiles are the proof's longest wait):
    the same results as eager, and its best checkpoint loads into an uncompiled network."""
    report = tmp_path / "results.json"
    result = cli("train", *FAST, *on(device), "--compile", "--data-dir", str(gpu_data), "--output-dir", str(tmp_path),
                 "--results-json", str(report))
    assert result.code == 0, result.err
    best = _check_fast_recipe(report, tmp_path)
    model = build_model("vgg16_bn")
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in best["state_dict"].items() if k.startswith("backbone.")})
