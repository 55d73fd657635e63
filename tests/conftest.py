"""Fixtures shared by the end-to-end tests: offline, private cache, tiny data, in-process CLI runs."""
from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from lightning.pytorch.callbacks import Callback

import robustness
from fakedata import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 5

# Tiny CPU runs, defined once for every end-to-end test: no worker processes, small batches,
# a curve point at every step. A flag given again later on a command line wins (argparse).
CPU = ["--accelerator", "cpu", "--workers", "0"]
QUICK = [*CPU, "--batch-size", "20", "--val-size", "20", "--eval-batch-size", "50", "--log-every-n-steps", "1"]
# 40 training images in 2 batches of VGG16, 20 for validation.
QUICK_VGG = ["--model", "vgg16", *QUICK, "--train-limit", "40"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network; loopback stays open for DDP's process group."""
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network disabled in tests (tried {host})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


# The real CIFAR-10 archive, for the few tests that read it (as scripts/real_data_check.sh finds it).
REAL_ARCHIVE_ENV = "CIFAR10_DATA"
REAL_ARCHIVE_BESIDE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cifar10-data",
        metavar="PATH",
        help=f"the real CIFAR-10 archive (cifar10-jpeg.tar.gz) for the tests that read it (default: ${REAL_ARCHIVE_ENV}, "
        f"else {REAL_ARCHIVE_BESIDE} beside the checkout; those tests are skipped when there is none)",
    )


def find_real_archive(option: str | None, environ: dict[str, str]) -> tuple[Path, bool]:
    """(where the real archive is looked for, whether it was given): ``--cifar10-data``, else
    ``$CIFAR10_DATA``, else the copy beside the checkout (a clone elsewhere has none there)."""
    given = option or environ.get(REAL_ARCHIVE_ENV)
    return (Path(given).expanduser(), True) if given else (REAL_ARCHIVE_BESIDE, False)


@pytest.fixture
def real_archive(request: pytest.FixtureRequest) -> Path:
    """The real CIFAR-10 archive (:func:`find_real_archive`): skips the test when none was given and
    none is beside the checkout, fails it when the one given is not there."""
    path, given = find_real_archive(request.config.getoption("cifar10_data"), dict(os.environ))
    if not path.is_file():
        if given:
            pytest.fail(f"the real CIFAR-10 archive given ({path}) is not a file")
        pytest.skip(f"no real CIFAR-10 archive: pass --cifar10-data PATH or set {REAL_ARCHIVE_ENV} (none at {path})")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-folder CIFAR-10 of 120 training and 50 test images."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "cifar10", TRAIN_PER_CLASS, TEST_PER_CLASS)


def copy_checkout(tmp_path: Path, editable: str) -> Path:
    """A checkout in ``tmp_path/checkout`` whose package ``editable`` is a real copy a test may change;
    the rest links to this one (the top-level scripts copied: Python looks for a script's imports
    beside its real path). Run it with ``PYTHONPATH`` set to the returned folder."""
    import shutil

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for item in ROOT.iterdir():
        if item.name in (editable, "tests") or item.name.startswith("."):
            continue
        if item.suffix == ".py":
            shutil.copy(item, checkout / item.name)
        else:
            (checkout / item.name).symlink_to(item)
    shutil.copytree(ROOT / editable, checkout / editable, ignore=shutil.ignore_patterns("__pycache__"))
    return checkout


def load_script(name: str) -> ModuleType:
    """The command behind ``name``.py (train, test, predict, export): ``cli.<name>``, whose ``main`` it runs."""
    return importlib.import_module(f"cli.{name}")


class _SigtermAt(Callback):
    """Sends this process SIGTERM after training step ``step``, or at the end of epoch ``epoch``
    (counted from 1), as a cluster's preemption would; or, with ``during``, in the middle of
    something else: ``validation`` (after the first validation batch of epoch ``epoch``),
    ``sanity`` (after the first batch of the sanity check), ``test`` (after the first batch of
    the final test), ``save`` (while the first checkpoint from epoch ``epoch`` on is being saved)."""

    def __init__(self, step: int | None = None, epoch: int | None = None, during: str | None = None) -> None:
        if during not in (None, "validation", "sanity", "test", "save"):
            raise ValueError(f"unknown during={during!r}")
        self.step, self.during = step, during
        # The epoch-end signal is for a plain sigterm_at(epoch=n) only.
        self.epoch, self.at_epoch = (None, epoch) if during else (epoch, None)
        self.sent = False

    def _send_once(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0:
            return
        if self.during == "sanity" and trainer.sanity_checking:
            self._send_once()
        if self.during == "validation" and not trainer.sanity_checking and trainer.current_epoch + 1 == self.at_epoch:
            self._send_once()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during == "test" and batch_idx == 0:
            self._send_once()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # The first save from that epoch on: an epoch whose score did not improve saves nothing
        # (last.ckpt is written at most once a minute), so the kill lands in the next save.
        if self.during == "save" and trainer.current_epoch + 1 >= self.at_epoch:
            self._send_once()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def extra_callback(monkeypatch):
    """``extra_callback(make, ...)``: every later train.py run in this test also gets the callbacks
    ``make()``, new ones each time a run builds its callbacks, after the project's own (those given
    as ``first=[make, ...]`` before them). A later call replaces what an earlier one added."""
    from run import build as run_build

    real = run_build.build_callbacks

    def add(*last, first=()) -> None:
        def build_callbacks(*args, **kwargs):
            callbacks = real(*args, **kwargs)
            callbacks.all[:0] = [make() for make in first]
            callbacks.all.extend(make() for make in last)
            return callbacks

        monkeypatch.setattr(run_build, "build_callbacks", build_callbacks)

    return add


@pytest.fixture
def sigterm_at(extra_callback):
    """``sigterm_at(step=n)`` or ``sigterm_at(epoch=n)``: the next train.py run in this process is
    preempted there; ``sigterm_at()`` runs the next one undisturbed. ``sigterm_at(epoch=n,
    during="validation")`` and the other ``during`` values of ``_SigtermAt`` stop it elsewhere."""

    def arm(step: int | None = None, epoch: int | None = None, during: str | None = None) -> None:
        extra_callback(lambda: _SigtermAt(step, epoch, during))

    return arm


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    # What was run, so that tests/robustness.py can report the command.
    script: str = ""
    args: tuple[str, ...] = ()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``train`` or ``test`` in-process exactly as its ``__main__`` does; return code and output."""
    def run(script: str, *args: str) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            sys.exit(load_script(script).main(list(args)))
        captured = capsys.readouterr()
        sys.stdout.flush()
        return CliResult(int(exit_info.value.code or 0), captured.out, captured.err, script, args)

    return run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ROBUSTNESS_REPORT=path set, write the table of bad inputs tried (tests/robustness.py)."""
    target = os.environ.get(robustness.REPORT_ENV)
    if not target or not (robustness.CASES or robustness.FILE_CHECKS or robustness.RUN_CHECKS):
        return
    descriptions = {}
    for item in session.items:
        doc = getattr(getattr(item, "function", None), "__doc__", None)
        if doc:
            descriptions[item.originalname] = doc.strip().splitlines()[0].rstrip(".")
    recorded = robustness.recorded_tests()
    tests = sorted({str(item.path.relative_to(ROOT)) for item in session.items if item.originalname in recorded})
    command = f"{robustness.REPORT_ENV}={target} pytest {' '.join(tests)}"
    robustness.write_report(Path(target), command, descriptions)
