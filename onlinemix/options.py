"""Command-line options shared by ``train.py`` and ``onlinemix finetune``: YAML-plus-flags parsing
and the data options, which map one to one onto ``onlinemix.data.load_splits``'s arguments."""
from __future__ import annotations

import argparse

DATA_OPTIONS = ("dataset", "class_names", "shots", "imbalance_factor", "val_fraction", "data_seed")


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config FILE.yaml`` sets defaults and flags given override them.

    Keys of the YAML file are option names with ``_`` for ``-``; unknown keys are an error.
    """
    import yaml

    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None):
        with open(known.config) as f:
            defaults = yaml.safe_load(f) or {}
        unknown = sorted(set(defaults) - set(vars(known)))
        if unknown:
            parser.error(f"{known.config} sets unknown options {unknown}.")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def add_data_arguments(parser) -> None:
    """The data set options, on ``parser`` (or a group); ``data_options`` reads them back."""
    from .data import DATASETS

    parser.add_argument("--data-dir", help="ImageFolder root with train/ (val/, test/, test_<name>/ optional)")
    parser.add_argument("--dataset", choices=DATASETS, default="folder",
                        help="folder: train/<class>/ images; hf: a Hugging Face DatasetDict saved with save_to_disk; "
                             "toy / demo: write the toy shapes / the demo world of birds (onlinemix.data.demo_world) "
                             "into --data-dir first if it is missing, then read it as a folder")
    parser.add_argument("--class-names", help="text file with one class name per line, in label order "
                                              "(default: the folder or ClassLabel names)")
    parser.add_argument("--metaclass", default="object", help='what the classes are, for prompts ("bird" ...)')
    parser.add_argument("--shots", type=int, help="keep K training images per class (drawn with --data-seed)")
    parser.add_argument("--imbalance-factor", type=float,
                        help="the paper's long-tail subset with this factor (drawn with --data-seed)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="validation share of each class carved when there is no val/, from the training "
                             "images a --shots or --imbalance-factor subset leaves out")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the subset and the validation carve; keep it equal for the personalised "
                             "generator and the classifier, whatever their --seed")


def data_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``load_splits`` and ``check_data_options`` from parsed data options."""
    return {name: getattr(args, name) for name in DATA_OPTIONS}
