"""Train a network of the catalog (--model) on CIFAR-10, the course recipe by default, then test the best checkpoint.

    python train.py --model vgg16 --accelerator gpu
    python train.py --config configs/resnet50.yaml --epochs 30 --data-dir ~/data/cifar10-jpeg.tar.gz
    python train.py --resume last

train.py's flags, turned (with ``--config``) into one resolved ``RunConfig``, and its ``main``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import yaml

from base.schema import FIELDS, option_of
from cli.flags import Parser, add_options, find_config, one_line_errors, parse_config_file
from models.catalog import entry
from run.config import NOT_RECIPE, RunConfig
from run.paths import check_input_name
from run.life import RunFinished, Start, resolve_run


def build_train_parser(prog: str | None = None, description: str | None = None) -> Parser:
    """train.py's parser: a flag for every option of ``base.schema``, grouped as the schema groups them."""
    parser = Parser(
        prog=prog,
        description=description or __doc__.splitlines()[0],
        argument_default=argparse.SUPPRESS,
        epilog="Flags typed on the command line override --config.",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved options as YAML (a --config file that runs them again) and exit without training",
    )
    add_options(parser, (name for name in FIELDS if option_of(name).flag))
    return parser


def parse_run_config(argv: Sequence[str], prog: str | None = None, description: str | None = None) -> RunConfig:
    """Flags win over ``--config``, which wins over a resumed run's saved options, then the defaults."""
    return _parse(argv, prog, description)[0]


def _parse(argv: Sequence[str], prog: str | None = None, description: str | None = None) -> tuple[RunConfig, Start, bool]:
    """The resolved options, the start plan (``run.life.Start``) and whether only --print-config was asked."""
    parser = build_train_parser(prog, description)
    typed = vars(parser.parse_args(list(argv)))
    print_config = typed.pop("print_config", False)
    if "config" in typed:
        check_input_name(Path(typed["config"]), "--config")
        # A shipped recipe by name, from any folder; the run records the file read.
        typed["config"] = find_config(typed["config"])
    config_file = parse_config_file(parser, typed["config"]) if "config" in typed else {}
    return (*resolve_run({**_network_recipe(parser, typed, config_file), **config_file}, typed), print_config)


def _network_recipe(parser: Parser, typed: dict[str, Any], config_file: dict[str, Any]) -> dict[str, Any]:
    """The options of the recipe of the network a new run names (its catalog entry's ``recipe``),
    read as a config file: under the ``--config`` file and the flags. Nothing for a resume (the run
    keeps its options) or where the network is not named (``--weights`` takes the checkpoint's)."""
    model = typed.get("model", config_file.get("model"))
    recipe = entry(model).recipe if model is not None else None
    if recipe is None or "resume" in typed or "resume" in config_file:
        return {}
    options = parse_config_file(parser, find_config(recipe))
    return {key: value for key, value in options.items() if key not in ("model", *NOT_RECIPE)}


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_errors(argv):
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            config, start, print_config = _parse(argv)
        except RunFinished as finished:
            print(finished)
            return 0
        if print_config:
            # The groups as sections, the way LightningCLI prints its config; --config reads it back.
            print(yaml.safe_dump(config.to_sections(), sort_keys=False), end="")
            return 0
        from run.lr_find import find_lr_only
        from run.report import summary_lines
        from run.training import train

        if config.find_lr:
            find_lr_only(config)
            return 0
        outcome = train(config, start, argv=argv)
        if outcome.is_global_zero:
            lines = summary_lines(outcome)
            width = max(len(label) for label, _ in lines)
            print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))
        return 1 if outcome.test_error else 0
