#!/usr/bin/env python
"""Per-epoch training and validation curves of a run folder, read from its TensorBoard events, as TSV.

    python benchmarks/curves.py runs/accuracy/vgg16/version_0 > curves.tsv
    python benchmarks/curves.py --steps runs/accuracy/vgg16/version_0 > steps.tsv

``--steps``: the per-step curves instead, one row per logging step (every --log-every-n-steps):
the batch's training loss, the gradients' norm before clipping and the learning rate (where the run
logs it per step: per-step schedules).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ("acc/train", "loss/train_epoch", "acc/val", "loss/val")
STEP_TAGS = ("loss/train_step", "grad_norm/train", "lr")


def epoch_curves(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch counted from 1: {tag: value}}; each tag is logged once an epoch, the epoch beside it."""
    events = _events(run_dir)
    epoch_at = {event.step: int(event.value) + 1 for event in events.Scalars("epoch")}
    curves: dict[int, dict[str, float]] = {}
    for tag in TAGS:
        for event in events.Scalars(tag):
            curves.setdefault(epoch_at[event.step], {})[tag] = event.value
    return curves


def step_curves(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step as logged: {tag: value}} of :data:`STEP_TAGS`, at the logging steps (those of
    ``loss/train_step``); a tag not logged at a step is left out (``lr`` of a per-epoch schedule,
    logged at each epoch's start; ``grad_norm/train`` of runs from before it was logged)."""
    events = _events(run_dir)
    logged = events.Tags()["scalars"]
    curves = {event.step: {STEP_TAGS[0]: event.value} for event in events.Scalars(STEP_TAGS[0])}
    for tag in STEP_TAGS[1:]:
        for event in events.Scalars(tag) if tag in logged else ():
            if event.step in curves:
                curves[event.step][tag] = event.value
    return curves


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of train.py (runs/MODEL/version_N)")
    parser.add_argument("--steps", action="store_true", help="per-step curves: " + ", ".join(STEP_TAGS))
    args = parser.parse_args()
    run_dir = args.run_dir
    if not any(run_dir.glob("events.out.tfevents.*")):
        parser.exit(2, f"{parser.prog}: error: {run_dir} holds no TensorBoard events; give a run folder of "
                       "train.py (the one that holds its config.yaml)\n")
    # Step values span decades (a norm of 170 and a rate of 4e-7): significant digits, not decimals.
    key, tags, form = ("step", STEP_TAGS, "{:.4g}") if args.steps else ("epoch", TAGS, "{:.4f}")
    curves = (step_curves if args.steps else epoch_curves)(run_dir)
    print("\t".join((key, *tags)))
    for index, values in sorted(curves.items()):
        print("\t".join((str(index), *(form.format(values[tag]) if tag in values else "" for tag in tags))))


if __name__ == "__main__":
    main()
