#!/usr/bin/env python
"""Per-epoch training and validation curves of a run folder, read from its TensorBoard events, as TSV.

    python benchmarks/curves.py runs/accuracy/vgg16/version_0 > curves.tsv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ("acc/train", "loss/train_epoch", "acc/val", "loss/val")


def epoch_curves(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch counted from 1: {tag: value}}; each tag is logged once an epoch, the epoch beside it."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    epoch_at = {event.step: int(event.value) + 1 for event in events.Scalars("epoch")}
    curves: dict[int, dict[str, float]] = {}
    for tag in TAGS:
        for event in events.Scalars(tag):
            curves.setdefault(epoch_at[event.step], {})[tag] = event.value
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of train.py (runs/MODEL/version_N)")
    run_dir = parser.parse_args().run_dir
    if not any(run_dir.glob("events.out.tfevents.*")):
        parser.exit(2, f"{parser.prog}: error: {run_dir} holds no TensorBoard events; give a run folder of "
                       "train.py (the one that holds its config.yaml)\n")
    curves = epoch_curves(run_dir)
    print("\t".join(("epoch", *TAGS)))
    for epoch, values in sorted(curves.items()):
        print("\t".join((str(epoch), *(f"{values[tag]:.4f}" if tag in values else "" for tag in TAGS))))


if __name__ == "__main__":
    main()
