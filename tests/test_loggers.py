"""A choice of loggers (``--logger tensorboard,csv,mlflow``, run/loggers.py): every one gets the curves,
the hparams and the ``hp/`` results, pictures go to those that show them, all inside the run folder.

Each logger's output is read back with its own tools: TensorBoard's EventAccumulator, Python's csv
module on Lightning's ``metrics.csv``, and MLflow's own ``MlflowClient`` on the run's file store.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_VGG
from PIL import Image
from robustness import assert_one_line_error
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from base.errors import UserError
from run.loggers import MLFLOW_RUN_NAME, check_loggers, mlflow_tracking_uri, recorded_loggers

EPOCHS = 2
IMAGE_TAGS = ("confusion_matrix/val", "confusion_matrix/test", "misclassified/test")


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` over all of the run's TensorBoard events files, in step order."""
    points = []
    for events in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(points)


def csv_column(metrics_csv: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) of the rows of Lightning's ``metrics.csv`` that have ``column``."""
    with metrics_csv.open(newline="") as file:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(file) if row.get(column)]


def same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps and, to float32's precision (TensorBoard's), the same values."""
    return [step for step, _ in actual] == [step for step, _ in expected] and [value for _, value in actual] == pytest.approx(
        [value for _, value in expected], rel=1e-6)


def mlflow_client(run_dir: Path):
    mlflow = pytest.importorskip("mlflow")
    assert mlflow  # the extra is installed where these run (pip install -e ".[dev]")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))


def only_mlflow_run(run_dir: Path, model: str = "vgg16"):
    """The one MLflow run of ``run_dir``'s file store, checked to be the one the run folder records."""
    client = mlflow_client(run_dir)
    experiment = client.get_experiment_by_name(model)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    assert runs[0].info.run_id == json.loads((run_dir / MLFLOW_RUN_NAME).read_text())["run_id"]
    return client, runs[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path):
    """One vgg16 run of 2 epochs on the tiny data, logging to TensorBoard, CSV and MLflow: its folder."""
    pytest.importorskip("mlflow")
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*QUICK_VGG, "--data-dir", str(tiny_data), "--epochs", str(EPOCHS),
                                            "--logger", "tensorboard,csv,mlflow", "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    yield output / "vgg16" / "version_0"
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


@pytest.mark.slow
def test_every_logger_gets_the_curves_the_results_and_its_pictures(run: Path, tmp_path: Path) -> None:
    # TensorBoard as before: the curves, one point per epoch for the epoch values.
    acc_val = scalars(run, "acc/val")
    assert len(acc_val) == EPOCHS and scalars(run, "loss/train_step") and len(scalars(run, "loss/train_epoch")) == EPOCHS
    assert recorded_loggers(run) == ("tensorboard", "csv", "mlflow")

    # CSV: Lightning's metrics.csv in RUN/csv/version_0, the same numbers at the same steps.
    metrics_csv = run / "csv" / "version_0" / "metrics.csv"
    assert same_points(csv_column(metrics_csv, "acc/val"), acc_val)
    assert same_points(csv_column(metrics_csv, "loss/train_epoch"), scalars(run, "loss/train_epoch"))
    assert same_points(csv_column(metrics_csv, "loss/train_step"), scalars(run, "loss/train_step"))
    assert same_points(csv_column(metrics_csv, "grad_norm/train"), scalars(run, "grad_norm/train"))
    assert csv_column(metrics_csv, "hp/test_acc")[0][1] == pytest.approx(scalars(run, "acc/test")[0][1])
    assert yaml.safe_load((metrics_csv.parent / "hparams.yaml").read_text())["model"] == "vgg16"

    # MLflow, read by its own client: one run named after the run folder, in an experiment named
    # after the model, holding the options, the curves' histories, the results and the pictures.
    client, mlflow_run = only_mlflow_run(run)
    assert mlflow_run.info.run_name == run.name and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["model"] == "vgg16" and params["epochs"] == str(EPOCHS) and float(params["lr"]) == pytest.approx(1e-3)
    history = client.get_metric_history(mlflow_run.info.run_id, "acc/val")
    assert same_points(sorted((point.step, point.value) for point in history), acc_val)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "loss/train_step")) == len(scalars(run, "loss/train_step"))
    results = mlflow_run.data.metrics
    assert results["hp/test_acc"] == pytest.approx(scalars(run, "acc/test")[0][1])
    assert results["hp/best_val_acc"] == pytest.approx(max(value for _, value in acc_val))
    assert {"hp/best_epoch", "hp/test_loss"} <= set(results)
    pictures = [artifact.path for artifact in client.list_artifacts(mlflow_run.info.run_id, "images")
                if artifact.path.endswith(".png")]
    for tag in IMAGE_TAGS:
        named = [path for path in pictures if Path(path).name.startswith(tag.replace("/", "~") + "+")]
        assert len(named) == (EPOCHS if tag.endswith("/val") else 1), (tag, pictures)
        with Image.open(client.download_artifacts(mlflow_run.info.run_id, named[-1], str(tmp_path))) as picture:
            assert picture.width >= 400 and picture.height >= 400, (tag, picture.size)
    # Everything inside the run folder.
    assert str(run / "mlruns") in mlflow_run.info.artifact_uri


@pytest.mark.slow
def test_test_py_log_to_run_writes_to_the_loggers_the_run_records(cli, run: Path, tiny_data: Path) -> None:
    client, before = only_mlflow_run(run)
    tested = len(client.get_metric_history(before.info.run_id, "acc/test"))
    best = run / "checkpoints" / "best.ckpt"
    result = cli("test", "--ckpt", str(best), "--log-to-run", "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0")
    assert result.code == 0, result.err
    assert f"tensorboard --logdir {run}" in result.out and f"mlflow ui --backend-store-uri file:{run / 'mlruns'}" in result.out
    import torch

    step = torch.load(best, weights_only=True, map_location="cpu")["global_step"]
    # MLflow: the same run, one more test point at the tested weights' step; CSV: a file of its own.
    client, after = only_mlflow_run(run)
    history = client.get_metric_history(after.info.run_id, "acc/test")
    assert len(history) == tested + 1 and step in {point.step for point in history}
    newest = max((run / "csv").iterdir(), key=lambda folder: int(folder.name.removeprefix("version_")))
    assert [point for point, _ in csv_column(newest / "metrics.csv", "acc/test")] == [step]


@pytest.mark.slow
def test_a_resume_continues_the_same_mlflow_run(cli, run: Path, tiny_data: Path) -> None:
    client, before = only_mlflow_run(run)
    earlier = client.get_metric_history(before.info.run_id, "loss/train_step")
    result = cli("train", "--resume", str(run), "--epochs", str(EPOCHS + 1), "--data-dir", str(tiny_data),
                 "--accelerator", "cpu", "--workers", "0")
    assert result.code == 0, result.err
    client, after = only_mlflow_run(run)  # still one MLflow run, the same one
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert len(client.get_metric_history(after.info.run_id, "acc/val")) == EPOCHS + 1
    history = client.get_metric_history(after.info.run_id, "loss/train_step")
    assert len(history) > len(earlier) and max(point.step for point in history) > max(point.step for point in earlier)
    # The changed options are kept beside the first values (MLflow never changes a parameter).
    assert after.data.params["epochs"] == str(EPOCHS) and after.data.tags["resumed/epochs"] == str(EPOCHS + 1)
    # TensorBoard continues in the run folder; CSV writes the resume's own file.
    assert len(scalars(run, "acc/val")) == EPOCHS + 1
    assert any(csv_column(folder / "metrics.csv", "acc/val") for folder in (run / "csv").iterdir() if folder.name != "version_0")


@pytest.mark.slow
def test_csv_alone_writes_no_tensorboard_files_and_no_pictures(cli, tiny_data: Path, tmp_path: Path) -> None:
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--epochs", "1", "--logger", "csv",
                 "--output-dir", str(tmp_path))
    assert result.code == 0, result.err
    run = tmp_path / "vgg16" / "version_0"
    assert not list(run.rglob("events.out.tfevents.*")) and not (run / "mlruns").exists()
    metrics_csv = run / "csv" / "version_0" / "metrics.csv"
    assert len(csv_column(metrics_csv, "acc/val")) == 1 and csv_column(metrics_csv, "loss/train_step")
    assert csv_column(metrics_csv, "hp/test_acc")  # the results, as numbers (CSV takes no pictures)
    dashboards = next(line for line in result.out.splitlines() if line.startswith("dashboards"))
    assert str(run / "csv") in dashboards and "tensorboard" not in dashboards
    shutil.rmtree(tmp_path / "vgg16", ignore_errors=True)


def _without_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if MLflow were not installed: find_spec finds no ``mlflow``."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "mlflow" else real(name, *args))


def test_logger_mlflow_without_mlflow_is_one_line_before_the_data_is_read(cli, tiny_data, tmp_path, monkeypatch):
    """--logger mlflow where MLflow is not installed: one line naming the extra, exit 2, nothing read or written."""
    from run import training

    _without_mlflow(monkeypatch)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the loggers were checked")

    monkeypatch.setattr(training, "build_data_and_module", no_data)
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--epochs", "1", "--logger", "tensorboard,mlflow",
                 "--output-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "--logger mlflow: MLflow is not installed", 'pip install "cifar10-lightning[mlflow]"',
                          "leave mlflow out of --logger")
    assert not (tmp_path / "runs" / "vgg16").exists()


def test_check_loggers_names_the_missing_library(monkeypatch) -> None:
    check_loggers(["tensorboard", "csv"])  # the project's own dependencies: always there
    _without_mlflow(monkeypatch)
    check_loggers(["tensorboard", "csv"])
    with pytest.raises(UserError, match=r"^--log-to-run: the run R logs to mlflow: MLflow is not installed.*leave out --log-to-run$"):
        check_loggers(["csv", "mlflow"], "--log-to-run: the run R logs to", "leave out --log-to-run")


def test_runs_from_before_the_logger_option_logged_to_tensorboard(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: vgg16\nepochs: 2\n")
    assert recorded_loggers(tmp_path) == ("tensorboard",)
    (tmp_path / "config.yaml").write_text("model: vgg16\nlogger: [csv, mlflow]\n")
    assert recorded_loggers(tmp_path) == ("csv", "mlflow")
    (tmp_path / "config.resumed.yaml").write_text("model: vgg16\nlogger: [tensorboard]\n")
    assert recorded_loggers(tmp_path) == ("tensorboard",)  # the latest start's


def test_log_to_run_into_an_mlflow_run_without_mlflow_is_one_line(cli, tmp_path, monkeypatch) -> None:
    """test.py --log-to-run of a run that logs to MLflow, where MLflow is not installed: refused before the test."""
    import torch

    run = tmp_path / "runs" / "vgg16" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vgg16\nlogger: [tensorboard, mlflow]\n")
    torch.save({"global_step": 4, "state_dict": {}}, run / "checkpoints" / "best.ckpt")
    before = sorted(path.name for path in run.rglob("*"))
    _without_mlflow(monkeypatch)
    result = cli("test", "--ckpt", str(run / "checkpoints" / "best.ckpt"), "--log-to-run", "--accelerator", "cpu")
    assert_one_line_error(result, f"--log-to-run: the run {run} logs to mlflow: MLflow is not installed",
                          "leave out --log-to-run")
    assert sorted(path.name for path in run.rglob("*")) == before
