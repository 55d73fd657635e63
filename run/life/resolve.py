"""Resolving a training run's options: what a resume or a ``--weights`` start brings, checked.

See ``run.config`` for the order of precedence; this part reads checkpoints and run folders.
Every check that needs neither torch nor a checkpoint's contents comes first, so that a mistake
in the flags is refused before torch loads.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from base.errors import UserError
from run.config import (
    FIELDS,
    PER_INVOCATION,
    RunConfig,
    absolute_path,
    build_config,
    changed_fixed_options,
    complete,
    merge,
    read_config,
    settle,
)
from models.catalog import option_defaults
from run.life.folder import CONFIG_NAME, RESUMED_CONFIG_NAME, check_new_run_name, check_resumable, find_resume, inherited_resume
from run.hardware import Machine, certainly_without_gpu
from run.life.history import check_resume
from run.life.start import NewRun, Start
from run.paths import (
    RUN_FOLDER_INSIDE,
    check_checkpoint_file,
    check_input_name,
    check_name_lengths,
    check_output_file,
    check_writable,
)


def resolve_run_config(config_file: Mapping[str, Any], typed: Mapping[str, Any]) -> RunConfig:
    """The options of :func:`resolve_run`, without its start plan."""
    return resolve_run(config_file, typed)[0]


def resolve_run(config_file: Mapping[str, Any], typed: Mapping[str, Any]) -> tuple[RunConfig, Start]:
    """The run that ``config_file``'s options and the ``typed`` flags ask for, resolved and checked,
    and how it starts (``run.life.start``: new, from weights, resume; the file of either read here, once).

    A resume continues the run it names with that run's saved options, overlaid by the config
    file and the flags; options that may not change mid-run are refused in one line. A new run
    with ``--weights`` takes its network from that checkpoint.
    """
    asked = merge(config_file, typed)
    if asked["resume"] is not None:
        _refuse_with_resume(asked)
    elif asked["rewind"]:
        raise UserError(
            "--rewind goes with --resume CHECKPOINT (an earlier checkpoint of a run, such as its best.ckpt); "
            "add --resume, or leave out --rewind"
        )
    model = asked["model"] if "model" in typed or "model" in config_file else None
    output_dir = absolute_path(asked["output_dir"])
    if asked["resume"] not in (None, "last"):
        check_input_name(absolute_path(asked["resume"]), "--resume")
    inherited, resume = inherited_resume()
    if asked["resume"] and inherited:
        # A DDP worker: the checkpoint rank 0 resolved. Resolved again, `last` could be another run
        # that a job writing into the same output folder saved in between.
        resume = check_resumable(resume) if resume is not None else None
    else:
        resume = find_resume(asked["resume"], output_dir, model, asked["run_name"]) if asked["resume"] else None
    if resume is None:
        values = {**asked, "resume": None}
        if asked["weights"] is None:
            settled = settle(values)
            _check_outputs(settled, model_known=True)
            return complete(settled), NewRun()
        # The network comes from the checkpoint, with the options its weights show, whatever the flags say.
        _check_outputs(settle({**values, **option_defaults(in_state_dict=True)}), model_known=model is not None)
        weights = check_checkpoint_file(absolute_path(asked["weights"]), safetensors=True)
        # torch loads here: the file is read once, for its network and the weights the module starts from.
        from run.life.start import read_weights

        start = read_weights(weights, expected_model=model)
        return build_config(values, start.weights.model_name, start.weights.model_options), start
    run_dir = resume.parent.parent
    if asked["run_name"] not in (None, run_dir.name):
        raise UserError(
            f"--run-name {asked['run_name']} with --resume {asked['resume']}: that is the run {run_dir.name}; "
            "leave out --run-name, or continue a named run with --resume last --run-name NAME"
        )
    # The run's options as its latest start or resume used them: what a resume changed stays changed.
    latest = run_dir / RESUMED_CONFIG_NAME if (run_dir / RESUMED_CONFIG_NAME).is_file() else run_dir / CONFIG_NAME
    saved_file = {k: v for k, v in read_config(latest).items() if k in FIELDS and k not in PER_INVOCATION}
    saved = merge(saved_file)
    values = merge(saved_file, config_file, typed)
    # The run stays in its folder, wherever that folder is now (moved, copied, requeued).
    values.update(resume=resume, output_dir=run_dir.parent.parent, run_name=run_dir.name)
    settled = settle(values)
    # Devices are compared once torch knows the GPUs, unless the run is certainly on the CPU.
    cpu_only = Machine() if settled["accelerator"] == "cpu" or certainly_without_gpu() else None
    _refuse_changes(run_dir, resume, changed_fixed_options(saved, settled, cpu_only))
    _check_outputs(settled)
    # torch loads here, and the checkpoint is read, the one time it is.
    from run.life.start import read_resume

    start = read_resume(resume)
    trained = start.point.epochs_done
    machine = Machine.probe()
    config = complete(settled, machine)
    _refuse_changes(run_dir, resume, changed_fixed_options(saved, dataclasses.asdict(config), machine))
    if config.epochs < trained:
        raise UserError(
            f"--epochs {config.epochs}: {run_dir} has already trained {trained} epochs; give more to train "
            f"further, or test it: python test.py --ckpt {shlex.quote(str(run_dir / 'checkpoints' / 'best.ckpt'))}"
        )
    # A resume from an earlier checkpoint goes back in time; one of a finished run has nothing to do.
    check_resume(resume, config.epochs, config.scheduler, config.rewind, start.point)
    if "precision" not in typed and "precision" not in config_file and config.precision == saved["precision"]:
        # Kept from the run, not asked for now: the run's reason for it still holds.
        config = dataclasses.replace(config, precision_reason=saved["precision_reason"] or config.precision_reason)
    return config, start


def _refuse_with_resume(asked: Mapping[str, Any]) -> None:
    """Options that start a run differently, which a resumed run cannot take."""
    if asked["lr"] == "find" or asked["find_lr"]:
        raise UserError(
            "--lr find / --find-lr with --resume: a resumed run keeps its learning rate and optimiser state; "
            "run the range test without --resume, or start a new run from these weights with --weights"
        )
    if asked["weights"] is not None:
        raise UserError(
            f"--weights with --resume: a resumed run continues from its own checkpoint; leave out --weights, "
            f"or start a new run from {asked['weights']} without --resume"
        )


def _check_outputs(values: Mapping[str, Any], model_known: bool = True) -> None:
    """Refuse output paths where nothing can be written, and a named run's folder that another run
    has (the free space is checked once the network is built; with ``--weights`` the network, hence
    the run's folder, is known only once torch reads the checkpoint: ``model_known``)."""
    # Below it: MODEL/RUN_NAME (checked next for a named run), then the run's own files.
    check_writable(values["output_dir"], "--output-dir", inside=RUN_FOLDER_INSIDE + 32)
    if values["run_name"] is not None and values["resume"] is None:
        # Before the folder is looked into: pathlib raises for a name too long, where it could answer.
        check_name_lengths(values["output_dir"] / values["model"] / values["run_name"], "--run-name",
                           inside=RUN_FOLDER_INSIDE)
        if model_known:
            check_new_run_name(values["output_dir"] / values["model"] / values["run_name"])
    if values["results_json"] is not None:
        check_output_file(values["results_json"], "--results-json")
        _check_results_json_is_free(values)


def _check_results_json_is_free(values: Mapping[str, Any]) -> None:
    """Refuse a ``--results-json`` file that holds another run's results (a new run never writes
    over another run's outputs); a resume may rewrite its own run's."""
    path = values["results_json"]
    if not path.exists():
        return
    try:
        best = json.loads(path.read_text(encoding="utf-8")).get("best_checkpoint")
        owner = Path(best).parent.parent if best else None
    except (OSError, ValueError, AttributeError, TypeError):
        owner = None
    if values["resume"] is not None and owner is not None and owner == values["resume"].parent.parent:
        return
    whose = f"the results of the run {owner}" if owner else "not this run's results"
    raise UserError(
        f"--results-json {path} already exists ({whose}); a run does not write over another's results: "
        "name another file, or remove that one first"
    )


def _refuse_changes(run_dir: Any, resume: Any, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more option(s))" if len(problems) > 1 else ""
        raise UserError(
            f"cannot resume {run_dir} with {problems[0]}{more}; resume without changing it, "
            f"or start a new run from these weights with --weights {shlex.quote(str(resume))}"
        )
