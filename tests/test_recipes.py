"""The fast recipes: EMA of the weights, test-time augmentation, the *_fast configs, the accuracy runner."""
from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, load_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from robustness import assert_one_line_error
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_modules import ImageClassifier
from callbacks.checkpoints import FiniteLossGuard
from callbacks.recipes import TimeToAccuracy, WeightEMA
from models import build_model

# Tiny runs: 40 training images in 2 batches, 20 for validation, on the CPU in this process.
QUICK = ["--model", "vgg16", "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--train-limit", "40",
         "--val-size", "20", "--eval-batch-size", "50", "--log-every-n-steps", "1"]
FAST_CONFIGS = ("configs/vgg16_fast.yaml", "configs/vgg16_bn_fast.yaml", "configs/resnet50_fast.yaml")


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


# --- EMA of the weights ------------------------------------------------------------------------


class _TinyNet(L.LightningModule):
    """A linear layer and a BatchNorm: parameters and running statistics both move every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _RecordWeights(Callback):
    """The raw float weights and buffers after every optimiser step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()})


def test_ema_is_the_moving_average_of_weights_and_batchnorm_statistics(tmp_path):
    """WeightEMA: e1 = w1, e_k = d_k e_(k-1) + (1 - d_k) w_k with d_k = min(d, k / (9 + k)), for parameters and BatchNorm statistics."""
    torch.manual_seed(0)
    decay = 0.3  # below the warm-up's 4/13 at the 4th step: both branches of the min are used
    record, ema = _RecordWeights(), WeightEMA(decay)
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    data = DataLoader(TensorDataset(torch.randn(24, 4), torch.randn(24, 3)), batch_size=6)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_model_summary=False,
                        enable_progress_bar=False, callbacks=[record, ema, last])
    module = _TinyNet()
    trainer.fit(module, train_dataloaders=data)

    assert len(record.steps) == 4
    expected = dict(record.steps[0])
    for averaged, weights in enumerate(record.steps[1:], 1):
        d = min(decay, (1 + averaged) / (10 + averaged))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    assert {k for k in expected if "running" in k} == {"net.1.running_mean", "net.1.running_var"}
    checkpoint = load(tmp_path / "last.ckpt")
    for key, value in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value)  # the average is what is saved
        torch.testing.assert_close(checkpoint["current_model_state"][key], record.steps[-1][key])  # raw, for resume
        torch.testing.assert_close(module.state_dict()[key], value)  # and what the module holds after fitting
    assert not torch.equal(expected["net.0.weight"], record.steps[-1]["net.0.weight"])


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_data) -> dict:
    """train.py with EMA, flip TTA and time-to-accuracy: its run folder and results JSON."""
    output = tmp_path_factory.mktemp("ema")
    results = output / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*QUICK, "--data-dir", str(tiny_data), "--epochs", "2", "--output-dir",
                                            str(output), "--ema-decay", "0.5", "--tta", "flip",
                                            "--time-to-accuracy", "0.05", "--results-json", str(results)]))
    assert exit_info.value.code == 0
    yield {"run": output / "vgg16" / "version_0", "results": json.loads(results.read_text())}
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


def _test_py(cli, tmp_path: Path, tiny_data: Path, ckpt: Path, *flags: str) -> dict:
    report = tmp_path / f"{ckpt.stem}{''.join(flags)}.json"
    result = cli("test", "--ckpt", str(ckpt), "--data-dir", str(tiny_data), "--accelerator", "cpu", "--workers", "0",
                 "--eval-batch-size", "50", "--json", str(report), *flags)
    assert result.code == 0, result.err
    return json.loads(report.read_text())


@pytest.mark.slow
def test_checkpoints_hold_the_averaged_weights_that_both_tests_evaluate(cli, ema_run, tiny_data, tmp_path):
    """best.ckpt's state_dict is the EMA; train.py's final test and test.py both evaluate it, not the raw weights."""
    best_path = ema_run["run"] / "checkpoints" / "best.ckpt"
    best = load(best_path)
    averaged, raw = best["state_dict"], best["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())

    from_test_py = _test_py(cli, tmp_path, tiny_data, best_path)
    trained = ema_run["results"]
    assert from_test_py["tta"] == "flip"  # the checkpoint's own, with no --tta given
    assert (from_test_py["accuracy"], from_test_py["loss"]) == pytest.approx(
        (trained["test_accuracy"], trained["test_loss"]), abs=1e-6)

    # The same checkpoint with the raw weights in its state_dict tests differently: so the figures
    # above are the average's.
    raw_path = tmp_path / "raw.ckpt"
    torch.save({**best, "state_dict": raw}, raw_path)
    assert _test_py(cli, tmp_path, tiny_data, raw_path)["loss"] != pytest.approx(trained["test_loss"], abs=1e-6)


@pytest.mark.slow
def test_time_to_accuracy_evaluates_the_weights_the_checkpoint_holds(cli, ema_run, tiny_data, tmp_path):
    """The per-epoch test accuracy of --time-to-accuracy is that of the epoch's checkpoint (EMA, TTA)."""
    clock = ema_run["results"]["time_to_accuracy"]
    assert [epoch["epoch"] for epoch in clock["epochs"]] == [1, 2]
    assert clock["reached"] and clock["epoch"] == 1 and clock["target"] == 0.05 and clock["startup_s"] > 0
    assert 0 < clock["epochs"][0]["train_s"] < clock["epochs"][1]["train_s"]
    last = _test_py(cli, tmp_path, tiny_data, ema_run["run"] / "checkpoints" / "last.ckpt")
    assert clock["epochs"][-1]["test_acc"] == pytest.approx(last["accuracy"], abs=1e-6)


def test_time_to_accuracy_must_come_before_the_ema():
    """Placed after the EMA callback, the benchmark would see the raw weights: refused at setup."""
    ema, clock = WeightEMA(0.9), TimeToAccuracy(0.9)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ema, clock])
    module = ImageClassifier(backbone=build_model("vgg16"), model_name="vgg16")
    with pytest.raises(ValueError, match="TimeToAccuracy must come before WeightEMA"):
        clock.setup(trainer, module, "fit")


def test_ema_decay_out_of_range_is_one_line(cli, tiny_data, tmp_path):
    """--ema-decay 1.5: one-line error, nothing trained."""
    result = cli("train", *QUICK, "--data-dir", str(tiny_data), "--ema-decay", "1.5", "--output-dir", str(tmp_path))
    assert_one_line_error(result, "--ema-decay", "between 0 and 1")
    assert not (tmp_path / "vgg16").exists()


@pytest.mark.slow
def test_resume_with_ema_is_exact(cli, tiny_data, tmp_path):
    """With EMA on, 1 epoch then resumed to 2 equals 2 straight: averaged and raw weights, average state, optimiser;
    --time-to-accuracy's curve and clock continue across the resume."""
    # A step schedule, whose rates do not depend on the run length, so that 1 epoch then 2 is
    # the same recipe as 2 straight (a one-cycle schedule is fixed by the --epochs it started with).
    recipe = [*QUICK, "--data-dir", str(tiny_data), "--ema-decay", "0.7", "--optimizer", "sgd", "--lr", "0.01",
              "--nesterov", "--step-size", "1", "--gamma", "0.5", "--time-to-accuracy", "0.99"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", *recipe, "--epochs", "2", "--output-dir", str(straight),
               "--results-json", str(tmp_path / "straight.json")).code == 0
    assert cli("train", *recipe, "--epochs", "1", "--output-dir", str(split)).code == 0
    resumed = cli("train", *recipe, "--epochs", "2", "--output-dir", str(split), "--resume", "last",
                  "--results-json", str(tmp_path / "split.json"))
    assert resumed.code == 0, resumed.err
    clocks = [json.loads((tmp_path / f"{name}.json").read_text())["time_to_accuracy"] for name in ("straight", "split")]
    assert [clock["resumes"] for clock in clocks] == [0, 1]
    for clock in clocks:
        assert [epoch["epoch"] for epoch in clock["epochs"]] == [1, 2]
        assert 0 < clock["epochs"][0]["train_s"] < clock["epochs"][1]["train_s"]
    assert [e["test_acc"] for e in clocks[0]["epochs"]] == [e["test_acc"] for e in clocks[1]["epochs"]]

    a = load(straight / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    b = load(split / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert a[part].keys() == b[part].keys() and a[part]
        assert all(torch.equal(a[part][key], b[part][key]) for key in a[part]), part
    assert int(a["averaging_state"]["n_averaged"]) == 4
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        assert all(torch.equal(state_a[index][name], state_b[index][name]) for name in state_a[index])
    assert a["lr_schedulers"] == b["lr_schedulers"]


# --- gradient clipping and the gradient norm's curve ------------------------------------------


class _SteepNet(L.LightningModule):
    """A linear layer under a steep loss: every gradient's norm is far above 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 100 * nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _norms_and_steps(tmp_path: Path, network: type[L.LightningModule], **trainer_options) -> list[tuple[float, float]]:
    """Trains a seeded ``network()`` (SGD at lr 0.1, no momentum) 4 steps, logging every 2nd: for each
    logged step, the grad_norm/train logged and the norm of the step the weights took over the rate."""
    torch.manual_seed(0)
    module, record = network(), _RecordWeights()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    data = DataLoader(TensorDataset(torch.randn(24, 4), 10 * torch.randn(24, 3)), batch_size=6)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path, name="", version=""),
                        log_every_n_steps=2, callbacks=[record, FiniteLossGuard()], enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, **trainer_options)
    trainer.fit(module, train_dataloaders=data)
    with open(tmp_path / "metrics.csv", newline="") as file:
        norms = {int(row["step"]): float(row["grad_norm/train"]) for row in csv.DictReader(file) if row.get("grad_norm/train")}
    assert sorted(norms) == [1, 3]  # the 2nd and 4th of 4 steps, at the count before each, as Lightning logs
    weights = [before, *record.steps]
    steps = [torch.cat([(weights[step + 1][k] - weights[step][k]).flatten() for k in before]) for step in sorted(norms)]
    return [(norms[step], float(moved.norm()) / 0.1) for step, moved in zip(sorted(norms), steps)]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_norm_is_the_norm_before_clipping_and_clipping_bounds_the_step(tmp_path, clip):
    """grad_norm/train at each logging step is the gradients' global L2 norm before clipping: plain
    SGD moves the weights by lr times that norm, or by lr times the clipping limit under it."""
    for norm, step in _norms_and_steps(tmp_path, _SteepNet, gradient_clip_val=clip):
        assert norm > 5
        assert step == pytest.approx(norm if clip is None else clip, rel=1e-3)


class _ScaledLossNet(_SteepNet):
    """A gentler loss (no overflow in float16 at a loss scale of 1024) and a fused optimiser, which
    unscales the gradients inside its own step."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, fused=True)


def test_grad_norm_of_a_fused_optimiser_under_a_loss_scale_is_the_unscaled_norm(tmp_path):
    """16-mixed with a fused optimiser (a GPU's, here with a CPU GradScaler): Lightning hands the hook
    gradients still multiplied by the loss scale; the logged norm is without it."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    for norm, step in _norms_and_steps(tmp_path, _ScaledLossNet, plugins=[scaled]):
        assert step == pytest.approx(norm, rel=1e-3)
    assert float(scaled.scaler.get_scale()) == 1024.0  # no step was skipped


@pytest.mark.slow
def test_gradient_clip_val_reaches_the_trainer_the_records_and_the_resume_check(cli, tiny_data, tmp_path):
    """--gradient-clip-val reaches the run's records; a resume that would change it is refused.

    Under bf16-mixed, where Lightning refuses to clip for a fused optimiser: the run trains, logs
    grad_norm/train, states the limit on its first line and records it in config.yaml, the results
    JSON and the checkpoint's hyper-parameters."""
    common = [*QUICK, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--optimizer", "sgd",
              "--lr", "0.01", "--precision", "bf16-mixed", "--logger", "csv", "--epochs", "1"]
    result = cli("train", *common, "--gradient-clip-val", "0.5", "--results-json", str(tmp_path / "results.json"))
    assert result.code == 0, result.err
    assert "gradient norm clipped to 0.5" in result.out.splitlines()[0]
    assert json.loads((tmp_path / "results.json").read_text())["gradient_clip_val"] == 0.5
    run = tmp_path / "vgg16" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["gradient_clip_val"] == 0.5
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["hyper_parameters"]["optim"]["gradient_clip_val"] == 0.5
    assert last["optimizer_states"][0]["param_groups"][0]["fused"] is False
    metrics = next(run.glob("csv/*/metrics.csv")).read_text()
    assert "grad_norm/train" in metrics.splitlines()[0]

    refused = cli("train", *common, "--epochs", "2", "--resume", str(run), "--gradient-clip-val", "1")
    assert_one_line_error(refused, "--gradient-clip-val")


# --- flip test-time augmentation -------------------------------------------------------------


def test_flip_tta_logits_are_the_mean_of_the_image_and_its_mirror():
    """tta=flip: the logits are exactly (f(x) + f(mirrored x)) / 2; tta=none: f(x)."""
    torch.manual_seed(0)
    module = ImageClassifier(backbone=build_model("resnet50"), model_name="resnet50", tta="flip").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = module.backbone(images), module.backbone(images.flip(3))
        flipped = module._eval_logits(images)
        module.tta = "none"
        untouched = module._eval_logits(images)
    assert torch.equal(flipped, (plain + mirrored) / 2)
    assert torch.equal(untouched, plain)
    assert not torch.allclose(flipped, plain)
    assert module.hparams.network["tta"] == "flip"


@pytest.mark.slow
def test_test_py_tta_flag_overrides_the_checkpoint(cli, ema_run, tiny_data, tmp_path):
    """test.py --tta none on a checkpoint trained with flip evaluates without it."""
    best = ema_run["run"] / "checkpoints" / "best.ckpt"
    without = _test_py(cli, tmp_path, tiny_data, best, "--tta", "none")
    with_flip = _test_py(cli, tmp_path, tiny_data, best)
    assert (without["tta"], with_flip["tta"]) == ("none", "flip")
    assert without["loss"] != pytest.approx(with_flip["loss"], abs=1e-6)


# --- the named configs -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config", FAST_CONFIGS)
def test_fast_config_is_an_sgd_recipe_of_at_most_40_epochs_and_runs(cli, tiny_data, tmp_path, config):
    """configs/*_fast.yaml: SGD Nesterov, one-cycle, label smoothing, weight decay 5e-4, EMA, TTA, <= 40 epochs; fast-dev-run works."""
    args = load_script("train").parse_run_config(["--config", str(ROOT / config), "--accelerator", "cpu"])
    assert (args.optimizer, args.nesterov, args.scheduler) == ("sgd", True, "onecycle")
    assert args.tta in ("flip", "flip-translate")
    # The rate per image of the evidence the recipes follow: 0.05 to 0.1 per 128 images.
    assert args.epochs <= 40 and 0.05 / 128 <= args.lr / args.batch_size <= 0.1 / 128
    assert 0.1 <= args.label_smoothing <= 0.2 and args.weight_decay == 5e-4 and 0.99 <= args.ema_decay < 1
    assert args.model == Path(config).stem.removesuffix("_fast")
    result = cli("train", "--config", str(ROOT / config), "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0", "--val-size", "20", "--fast-dev-run", "1", "--output-dir", str(tmp_path))
    assert result.code == 0, result.err


# --- the accuracy runner ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 2])
def test_accuracy_runner_writes_runs_summary_and_table(tiny_data, tmp_path, capsys, parallel):
    """benchmarks/accuracy.py over 2 seeds, one after the other or both at once: a JSON per run,
    mean/std/min/max, the Markdown table; a rerun skips."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_runner", ROOT / "benchmarks" / "accuracy.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = tmp_path / "out"
    command = ["--configs", "configs/vgg16_fast.yaml", "--seeds", "0", "1", "--data-dir", str(tiny_data),
               "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--parallel", str(parallel), "--",
               *QUICK[2:], "--epochs", "1", "--time-to-accuracy", "0.05"]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(runner.main(command))
    assert exit_info.value.code == 0, capsys.readouterr()

    runs = [json.loads((out / f"vgg16_fast-seed{seed}.json").read_text()) for seed in (0, 1)]
    assert [run["seed"] for run in runs] == [0, 1] and all(run["epochs_trained"] == 1 for run in runs)
    assert all(run["runner"]["parallel"] == parallel for run in runs)
    assert all(run["runner"]["wall_s"] > run["seconds"]["fit"] > 0 for run in runs)
    assert all(run["runner"]["command"].startswith("python train.py --config configs/vgg16_fast.yaml") for run in runs)
    assert all((out / f"vgg16_fast-seed{seed}.log").is_file() for seed in (0, 1))
    (row,) = json.loads((out / "summary.json").read_text())
    accuracies = [run["test_accuracy"] for run in runs]
    assert row["seeds"] == [0, 1] and row["model"] == "vgg16"
    assert row["test_accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert row["test_accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))
    assert (row["test_accuracy"]["min"], row["test_accuracy"]["max"]) == (min(accuracies), max(accuracies))
    table = (out / "results.md").read_text()
    assert "| vgg16 | configs/vgg16_fast.yaml | 1 | 0, 1 |" in table
    assert "`python train.py --config configs/vgg16_fast.yaml --seed S --data-dir" in table
    assert "| 5.00 % | 2/2 |" in table  # the time-to-accuracy table

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(runner.main(command))
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.count("skipped") == 2
