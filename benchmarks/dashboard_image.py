#!/usr/bin/env python
"""Save one picture of a run's TensorBoard dashboards as a PNG file (for docs and reports).

    python benchmarks/dashboard_image.py runs/resnet50/version_0 misclassified/test docs/images/gradcam-misclassified.png

Takes the last image logged under TAG (TensorBoard's Images tab: ``confusion_matrix/val``,
``confusion_matrix/test``, ``misclassified/test``) from the run's event files, as logged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a train.py run folder")
    parser.add_argument("tag", help="the image's TensorBoard tag, e.g. misclassified/test")
    parser.add_argument("out", type=Path, help="the PNG file to write")
    args = parser.parse_args()
    events = EventAccumulator(str(args.run_dir), size_guidance={"images": 0})
    events.Reload()
    if args.tag not in events.Tags()["images"]:
        print(f"dashboard_image: error: no image tagged {args.tag} in {args.run_dir}; "
              f"it has: {', '.join(events.Tags()['images']) or 'none'}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(events.Images(args.tag)[-1].encoded_image_string)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
