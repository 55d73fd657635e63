"""Export a checkpoint's network to ONNX, TorchScript or safetensors, for use outside this project.

    python export.py --ckpt runs/vgg16/version_0/checkpoints/best.ckpt --format onnx
    python export.py --ckpt resnet50_epoch285.ckpt --format safetensors --output models/resnet50.safetensors

The output defaults to the checkpoint's path with the format's suffix (.onnx, .torchscript.pt,
.safetensors). A checkpoint trained with --tta flip (or flip-translate) is exported with it: the ONNX and TorchScript
graphs output the mean logits of each image and its mirror, and a safetensors file records it in
its metadata (--tta none exports the plain network). An existing file is only replaced with --force, and the file appears complete or
not at all: it is written under a temporary name in the same folder, then renamed.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from base.files import atomic_write, printable
from base.schema import EXPORT_FORMATS as FORMATS
from cli.flags import Parser, add_options, one_line_errors, program
from run.preflight import check_export


def build_parser() -> Parser:
    parser = Parser(prog=program("export.py"), description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", required=True, help="a .ckpt written by train.py, a course state dict, or an exported .safetensors"
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx: dynamic batch, input 'images' N,3,32,32 (normalised), output 'logits'; "
        "torchscript: for torch.jit.load (deprecated by PyTorch, prefer onnx); "
        "safetensors: the weights plus the metadata to rebuild the network",
    )
    parser.add_argument("--output", type=Path, help="where to write (default: beside the checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    add_options(
        parser,
        ("tta",),
        help={"tta": "test-time augmentation the export scores with; flip: onnx and torchscript graphs output the mean "
              "logits of each image and its mirror (flip-translate: also of both moved a pixel up-left and "
              "down-right), safetensors records it in its metadata (default: what the "
              "checkpoint's training run validated and tested with; none for course state dicts)"},
        defaults={"tta": None},
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        args = build_parser().parse_args(argv)
        checkpoint = Path(args.ckpt)
        output = check_export(checkpoint, args.format, args.output, args.force)
        # torch loads only now: --help and a mistaken flag answer at once.
        from run.checkpoints import build_backbone
        from run.checkpoints import load_any_checkpoint
        from run.exporting import EXPORTERS, describe_export, export_metadata
        from run.inference import checkpoint_tta, class_names

        contents = load_any_checkpoint(checkpoint)
        model = build_backbone(contents).eval()
        # What the run measured is what is deployed: its test-time augmentation goes with the export.
        metadata = export_metadata(contents, class_names(contents), args.tta or checkpoint_tta(contents))
        atomic_write(output, lambda file: EXPORTERS[args.format](model, file, metadata))
        print(f"{contents.model_name} ({contents.num_classes} classes) exported to {printable(output)} ({args.format}, "
              f"{output.stat().st_size / 2**20:.1f} MiB){describe_export(metadata, args.format)}")
        return 0
