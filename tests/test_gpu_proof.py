"""scripts/gpu_proof.py without a GPU and without training: its plan, its outcomes, its archive, its children.

The planner gets measured costs and a fake clock; the commands are replaced by fakes that write
what the real ones would, or (for the process-group kill) by tiny shell commands that sleep.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_proof.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_proof"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


proof = _load()
ALL_PARTS = list(proof.PARTS)


def items_for(tmp_path: Path, parts=ALL_PARTS, sizes=None, seed_loop=True, budget_s=360.0):
    paths = {"results": tmp_path / "results", "runs": tmp_path / "runs", "data": tmp_path / "data.tar.gz"}
    return proof.build_items(parts, sizes or proof.GPU, paths, Path("seed_loop.py") if seed_loop else None, budget_s)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- the plan ------------------------------------------------------------------------------------


def test_items_come_most_valuable_first_and_import_the_checkout(tmp_path):
    items = items_for(tmp_path)
    assert [item.name for item in items] == [
        "cuda-tests", "throughput", "vgg16_bn-seed0", "vgg16-seed0", "resnet50-seed0", "sweep-1", "sweep-2", "sweep-3",
        "vgg16_bn-seed1", "vgg16_bn-seed2", "vgg16-seed1", "vgg16-seed2", "resnet50-seed1", "resnet50-seed2"]
    throughput = items[1].command
    assert throughput[1:3] == ["-m", "benchmarks.throughput"] and "seed_loop" in throughput
    run = items[2].command
    assert run[1:3] == ["-m", "benchmarks.accuracy"]
    # Checkpoints go to the run folders, never into the results that are packed.
    assert run[run.index("--runs-dir") + 1] == str(tmp_path / "runs" / "accuracy")
    assert items[0].cap_s == pytest.approx(proof.TESTS_SHARE * 360)
    assert [item.name for item in items_for(tmp_path, parts=["recipe-sweep", "cuda-tests"])] == [
        "cuda-tests", "sweep-1", "sweep-2", "sweep-3"]
    # A sweep group: its screening candidates trained at once, one accuracy.py over all of them.
    group = {item.name: item for item in items}["sweep-1"].command
    configs = group[group.index("--configs") + 1:group.index("--seeds")]
    assert len(configs) == 3 and all(config.startswith("benchmarks/screening/vgg16_bn-") for config in configs)
    assert all((ROOT / config).is_file() for item in items if item.part == "recipe-sweep" for config in
               item.command[item.command.index("--configs") + 1:item.command.index("--seeds")])
    assert group[group.index("--parallel") + 1] == "3"
    # Every run trains the epochs its estimate assumes, the candidates too (they hold no epoch count).
    for item in items[2:]:
        flags = item.command[item.command.index("--") + 1:]
        assert flags[flags.index("--epochs") + 1] == str(proof.GPU.epochs) == "40"
    assert "seed_loop" not in items_for(tmp_path, seed_loop=False)[1].command


def test_estimates_come_from_measured_throughput_then_measured_runs(tmp_path):
    items = {item.name: item for item in items_for(tmp_path)}
    costs = proof.Costs()
    # Nothing measured: a conservative assumed speed, said so, far too long for the budget.
    seconds, basis = proof.estimate(items["vgg16-seed0"], costs, proof.GPU)
    assert "assumed" in basis and seconds > 600
    # From this GPU's measured images/s: within the 150-350 s that one fast VGG16 run really takes.
    costs.images_per_s = {"vgg16": 30_000.0, "resnet50": 9_000.0}
    seconds, basis = proof.estimate(items["vgg16-seed0"], costs, proof.GPU)
    assert 150 < seconds < 350 and "30,000 img/s measured" in basis
    # A finished run: the same config costs what it took (with a margin) ...
    costs.runs.append({"item": "vgg16-seed0", "model": "vgg16", "config": "configs/vgg16_fast.yaml",
                       "epochs": 40, "seconds": 240.0})
    assert proof.estimate(items["vgg16-seed1"], costs, proof.GPU)[0] == pytest.approx(240 * proof.MEASURED_MARGIN)
    # A sweep group: its runs one after the other, until a group was measured.
    group = items["sweep-1"]
    assert proof.estimate(group, costs, proof.GPU)[0] == pytest.approx(
        sum(proof._run_estimate(run, costs, proof.GPU)[0] for run in group.runs))
    # vgg16_bn, which the throughput part does not time, at vgg16's measured speed.
    assert "30,000 img/s measured" in proof.estimate(items["vgg16_bn-seed0"], costs, proof.GPU)[1]
    # ... and another network's run its measured everything-else plus its own measured speed.
    seconds, basis = proof.estimate(items["resnet50-seed0"], costs, proof.GPU)
    per_image = 40 * (45_000 + 25_000 / proof.EVAL_SPEEDUP)
    rest = 240 - per_image / 30_000
    assert seconds == pytest.approx(proof.FORMULA_MARGIN * (per_image / 9_000 + rest))
    assert "vgg16_fast.yaml's measured run" in basis
    # Throughput: its processes at the measured seconds each.
    costs.throughput_child_s = 10.0
    assert proof.estimate(items["throughput"], costs, proof.GPU)[0] == pytest.approx(12 * 10 * proof.MEASURED_MARGIN)


def fake_executor(clock: Clock, results: Path, took: dict[str, float], costs, ran: list[str]):
    """Runs nothing: advances the clock, writes what the real command writes, learns from it."""
    def execute(item, stop_at):
        ran.append(item.name)
        clock.t += took[item.name]
        item.seconds, item.outcome = took[item.name], "done"
        if item.part == "throughput":
            results.mkdir(parents=True, exist_ok=True)
            (results / "throughput.json").write_text(json.dumps({
                "settings": {"repeats": 2}, "models": {
                    "vgg16": {"seed_loop": {"images_per_s": 3000}, "lightning": {"images_per_s": 30000},
                              "bare": {"images_per_s": 31000}, "ratios": {}},
                    "resnet50": {"seed_loop": {"images_per_s": 2500}, "lightning": {"images_per_s": 9000},
                                 "bare": {"images_per_s": 9100}, "ratios": {}}}}))
        for run in item.runs:
            path, _ = proof.run_files(run, results)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"epochs_trained": 40, "runner": {"wall_s": took[item.name]}}))
        proof.learn(item, results, costs)
    return execute


def test_the_plan_skips_what_no_longer_fits_saying_why(tmp_path):
    """Slow tests leave too little for a 40-epoch run: it is skipped with its measured-based estimate."""
    clock, costs, ran, seen = Clock(), proof.Costs(), [], []
    items = items_for(tmp_path)
    took = {"cuda-tests": 100.0, "throughput": 80.0}
    proof.run_plan(items, costs, proof.GPU, 352.0, fake_executor(clock, tmp_path / "results", took, costs, ran),
                   lambda item: seen.append(item.name), now=clock)
    assert ran == ["cuda-tests", "throughput"]
    assert seen == [item.name for item in items]  # the table and archive after every item, run or not
    assert costs.images_per_s == {"vgg16": 30000.0, "resnet50": 9000.0}
    assert costs.throughput_child_s == pytest.approx(80 / 12)
    vgg = items[2]
    assert vgg.outcome == f"skipped: needs about {vgg.estimate_s:.0f} s, 172 s left"
    assert "30,000 img/s measured" in vgg.basis
    assert all(item.outcome.startswith("skipped") for item in items[2:])


def test_a_cheaper_item_still_runs_after_a_dearer_one_is_skipped(tmp_path):
    clock, ran = Clock(), []
    costs = proof.Costs(images_per_s={"vgg16": 30000.0, "resnet50": 9000.0}, runs=[
        {"item": "vgg16-seed0", "model": "vgg16", "config": "configs/vgg16_fast.yaml", "epochs": 40, "seconds": 100.0},
        {"item": "resnet50-seed0", "model": "resnet50", "config": "configs/resnet50_fast.yaml", "epochs": 40,
         "seconds": 300.0}])
    items = items_for(tmp_path, parts=["vgg16-seeds", "resnet50-seeds"])
    assert [item.name for item in items] == ["vgg16-seed0", "resnet50-seed0", "vgg16-seed1", "vgg16-seed2",
                                             "resnet50-seed1", "resnet50-seed2"]
    took = {name: 100.0 for name in ("vgg16-seed0", "vgg16-seed1", "vgg16-seed2")}
    proof.run_plan(items, costs, proof.GPU, 250.0, fake_executor(clock, tmp_path / "results", took, costs, ran),
                   lambda item: None, now=clock)
    assert ran == ["vgg16-seed0", "vgg16-seed1"]
    outcomes = {item.name: item.outcome for item in items}
    assert outcomes["resnet50-seed0"] == "skipped: needs about 330 s, 150 s left"
    assert outcomes["vgg16-seed2"] == "skipped: needs about 110 s, 50 s left"


def test_cuda_tests_stop_at_their_cap_not_at_the_deadline(tmp_path):
    clock, stops = Clock(), []
    items = items_for(tmp_path, parts=["cuda-tests"])

    def execute(item, stop_at):
        stops.append(stop_at)
        item.outcome = "cut off at the deadline (all its processes stopped)"

    proof.run_plan(items, proof.Costs(), proof.GPU, 352.0, execute, lambda item: None, now=clock)
    assert stops == [pytest.approx(proof.TESTS_SHARE * 360)]
    assert items[0].outcome == "cut off at its cap of 144 s (all its processes stopped)"


# --- outcomes ------------------------------------------------------------------------------------

DIVERGED = ("train.py: error: training diverged: the loss became NaN or infinite at step 2 (epoch 0); "
            "stopped without saving the diverged weights; lower the learning rate (e.g. --lr 0.04, now 0.4)\n")
SWEPT = "vgg16_bn-b512-lr0.8-cutout8"
SWEPT_GROUP = next(f"sweep-{n}" for n, (names, _) in enumerate(proof.GPU.sweep, 1) if SWEPT in names)
ACCURACY_FAILED = (f"    {SWEPT}-seed0 FAILED (exit code 2, 31 s); end of recipe-sweep/{SWEPT}-seed0.log:\n"
                   + DIVERGED)


def test_a_diverged_candidate_is_a_result_other_failures_are_not(tmp_path):
    items = {item.name: item for item in items_for(tmp_path)}
    sweep, seed = items[SWEPT_GROUP], items["vgg16-seed0"]
    logs = {run.config: "" for run in sweep.runs}
    swept = f"benchmarks/screening/{SWEPT}.yaml"
    assert proof.classify(sweep, 1, False, ACCURACY_FAILED, {**logs, swept: DIVERGED}) == (
        f"diverged: {SWEPT} (the loss became NaN or infinite at step 2 (epoch 0))")
    # A fast recipe diverging is a failure of the recipe, not a sweep result.
    own = ACCURACY_FAILED.replace(f"{SWEPT}-seed0", "vgg16_fast-seed0")
    assert proof.classify(seed, 1, False, own, {"configs/vgg16_fast.yaml": DIVERGED}) == "failed (exit code 1)"
    # Another exit code of train.py (a crash) is a failure even in the sweep; so is a second failure.
    crashed = ACCURACY_FAILED.replace("exit code 2", "exit code 1")
    assert proof.classify(sweep, 1, False, crashed, {**logs, swept: "Traceback ...\n"}) == "failed (exit code 1)"
    two = ACCURACY_FAILED + "    vgg16_bn-b512-lr0.2-cutout8-seed0 FAILED (exit code 1, 3 s); end of ...\n"
    assert proof.classify(sweep, 1, False, two, {**logs, swept: DIVERGED}) == "failed (exit code 1)"
    assert proof.classify(sweep, 0, False, "", logs) == "done"
    assert proof.classify(sweep, -15, True, "", logs).startswith("cut off")
    # The dry run's group that must diverge, and did not: its check of that path fails.
    dry = {item.name: item for item in items_for(tmp_path, sizes=proof.DRY)}["sweep-2"]
    assert dry.runs[0].expect_diverge and dry.command[-2:] == ["--lr", "1e30"]
    failed = ACCURACY_FAILED.replace(f"{SWEPT}-seed0", f"{SWEPT}-lr1e30-seed0")
    assert proof.classify(dry, 0, False, "", {swept: ""}).startswith(f"failed: {SWEPT} was expected to diverge")
    assert proof.classify(dry, 1, False, failed, {swept: DIVERGED}).startswith(f"diverged: {SWEPT}")


# --- child processes -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_part_cut_off_at_the_deadline_leaves_no_process_running(tmp_path):
    """The child and its grandchild, both deaf to SIGTERM, are gone right after the deadline."""
    pid_file, log = tmp_path / "pid", tmp_path / "log"
    command = ["sh", "-c", f'trap "" TERM; sleep 60 & echo $! > {pid_file}; wait']
    start = time.monotonic()
    code, cut_off, seconds = proof.run_command(command, log, time.monotonic() + 1.0, grace_s=0.5)
    assert cut_off and code is not None and code < 0
    assert time.monotonic() - start < 5
    grandchild = int(pid_file.read_text())
    assert not _alive(grandchild), "the sleeping grandchild survived the cut-off"
    assert log.read_text().startswith("\n$ sh -c")


def test_a_finished_part_leaves_no_process_behind(tmp_path):
    pid_file = tmp_path / "pid"
    code, cut_off, _ = proof.run_command(["sh", "-c", f"sleep 60 & echo $! > {pid_file}"], tmp_path / "log",
                                         time.monotonic() + 30)
    assert (code, cut_off) == (0, False)
    assert not _alive(int(pid_file.read_text()))


def test_children_import_this_checkout_first(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/opt/wheels")
    env = proof.child_env(False, tmp_path)
    assert env["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/opt/wheels"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env.get("XDG_CACHE_HOME") == os.environ.get("XDG_CACHE_HOME")  # a real run keeps the user's cache
    assert proof.child_env(True, tmp_path)["XDG_CACHE_HOME"] == str(tmp_path / "cache")


# --- inputs and the archive ----------------------------------------------------------------------


def _args(*argv: str):
    return proof.build_parser().parse_args(list(argv))


def test_bad_inputs_are_one_line_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    data = tmp_path / "data.tar.gz"
    data.write_bytes(b"")
    loop = tmp_path / "seed_loop.py"
    loop.write_text("")
    cases = {
        ("--data", str(data), "--seed-loop", str(loop)): "pass --archive",
        ("--archive", "a.tgz", "--data", str(tmp_path / "nope"), "--seed-loop", str(loop)): "CIFAR-10 not found",
        ("--archive", "a.tgz", "--data", str(data), "--seed-loop", str(tmp_path / "nope.py")): "--no-seed-loop",
        ("--archive", "a.tgz", "--data", str(data), "--no-seed-loop", "--budget-s", "0"): "positive",
        ("--archive", "a.tgz", "--data", str(data), "--no-seed-loop", "--costs", str(data)): "costs.json",
    }
    for argv, message in cases.items():
        with pytest.raises(proof.ProofError, match=message):
            proof.check_inputs(_args(*argv))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    archive, seed_loop, _ = proof.check_inputs(_args("--data", str(data), "--seed-loop", str(loop)))
    assert archive == (tmp_path / "out" / "proof.tar.gz").resolve() and seed_loop == loop.resolve()
    with pytest.raises(proof.ProofError, match="inside"):
        proof.check_inputs(_args("--data", str(data), "--no-seed-loop", "--work-dir", str(tmp_path / "out" / "w")))
    done = subprocess.run([sys.executable, str(SCRIPT), "--parts", "everything"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--parts" in done.stderr


def test_the_archive_after_every_part_holds_what_finished_and_no_checkpoint(tmp_path, monkeypatch):
    """main() with the children faked: one archive, rewritten after each part; a diverged rate is a pass."""
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    data = tmp_path / "data.tar.gz"
    data.write_bytes(b"")
    info = {"python": "3.12.3", "versions": {"torch": "2.11.0", "lightning": "2.6.6"}, "captum": None,
            "cli": str(ROOT / "cli" / "__init__.py"), "installed": None,
            "cuda": {"available": True, "torch_cuda": "13.0", "name": "NVIDIA H200"}}
    monkeypatch.setattr(proof, "preflight", lambda env, dry_run, require_bare: info)
    seen_in_archive: list[str] = []

    def fake_run(command, log, stop_at, env=None, grace_s=0):
        archive = out / "proof.tar.gz"
        if archive.exists():
            with tarfile.open(archive) as tar:
                seen_in_archive.append(tar.extractfile("proof/results.md").read().decode())
        log.write_text(f"$ {' '.join(command)}\n")
        if "benchmarks.throughput" in command:
            Path(command[command.index("--out") + 1]).write_text(json.dumps({
                "device": "NVIDIA H200", "settings": {"batch_size": 100, "precision": "bf16-mixed", "repeats": 2},
                "models": {"vgg16": {"lightning": {"images_per_s": 1e6}, "bare": {"images_per_s": 1e6}},
                           "resnet50": {"lightning": {"images_per_s": 1e6}, "bare": {"images_per_s": 1e6}}}}))
        if "benchmarks.accuracy" in command:
            folder = Path(command[command.index("--out") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "best.ckpt").write_bytes(b"0" * 1000)  # must never be packed
            if f"benchmarks/screening/{SWEPT}.yaml" in command:
                log.write_text(ACCURACY_FAILED)
                (folder / f"{SWEPT}-seed0.log").write_text(DIVERGED)
                return 1, False, 0.1
        return 0, False, 0.1

    monkeypatch.setattr(proof, "run_command", fake_run)
    # A budget that fits every item's conservative estimate (a sweep group counts its runs in turn).
    code = proof.main(["--data", str(data), "--no-seed-loop", "--work-dir", str(tmp_path / "work"), "--budget-s", "3000"])
    assert code == 0
    assert len(seen_in_archive) == 13  # before items 2..14: each saw its predecessors' outcomes
    assert "| cuda-tests | done |" in seen_in_archive[0] and "| throughput | not run |" in seen_in_archive[0]
    assert "| throughput | done |" in seen_in_archive[1]
    assert list(out.iterdir()) == [out / "proof.tar.gz"]  # one file comes back, no partial one
    with tarfile.open(out / "proof.tar.gz") as tar:
        names = set(tar.getnames())
        table = tar.extractfile("proof/results.md").read().decode()
        costs = json.loads(tar.extractfile("proof/costs.json").read())
    assert {"proof/results.md", "proof/costs.json", "proof/throughput.json", "proof/logs/cuda-tests.log",
            "proof/logs/sweep-1.log"} <= names
    assert not [name for name in names if name.endswith(".ckpt")]
    assert f"| {SWEPT_GROUP} | diverged: {SWEPT} (the loss became NaN or infinite at step 2 (epoch 0)) |" in table
    assert "torch 2.11.0" in table and "NVIDIA H200" in table and "captum absent" in table
    assert costs["images_per_s"] == {"vgg16": 1e6, "resnet50": 1e6}
    # The run folders stayed in the work folder, outside $OUT.
    assert (tmp_path / "work" / "runs").is_dir()


def test_the_gpu_runs_the_cuda_cases_and_the_dry_run_their_cpu_rehearsals(tmp_path):
    """The same tests/test_gpu.py bodies: on the GPU its CUDA cases under a share of the budget, in a
    dry run their CPU rehearsals under a cap of their own (measured on 2 CPU cores)."""
    gpu = items_for(tmp_path, parts=["cuda-tests"])[0]
    dry = items_for(tmp_path, parts=["cuda-tests"], sizes=proof.DRY)[0]
    for item, selected in ((gpu, "not rehearsal"), (dry, "rehearsal")):
        assert item.command[item.command.index("-k") + 1] == selected and item.command[-1] == "tests/test_gpu.py"
    assert (gpu.cap_s, dry.cap_s) == (pytest.approx(proof.TESTS_SHARE * 360), proof.DRY.tests_cap_s)
