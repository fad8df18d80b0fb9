"""Command-line options shared by ``train.py``, ``onlinemix finetune`` and ``onlinemix generate``: YAML-plus-flags
parsing, the data options, which map one to one onto ``onlinemix.data.load_splits``'s arguments, and the
generator options, which map onto ``GeneratorSpec``."""
from __future__ import annotations

import argparse
import os
import sys

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of every command: the description as written, each option's default after its help."""


DATA_OPTIONS = ("dataset", "class_names", "shots", "imbalance_factor", "val_fraction", "data_seed")


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config FILE.yaml`` sets defaults and flags given override them.

    Keys of the YAML file are option names with ``_`` for ``-``. Each value goes through the option's
    own type, choices and count as if it had been typed before the flags (``opt: rmsprop`` is refused
    as ``--opt rmsprop`` is), and an error names the file; unknown keys are an error too.
    """
    import yaml

    known, _ = parser.parse_known_args(argv)
    config = getattr(known, "config", None)
    if not config:
        return parser.parse_args(argv)
    if not os.path.isfile(config):
        parser.error(f"--config {config!r} is not a file; pass a YAML file of options (configs/ holds examples).")
    try:
        with open(config) as f:
            settings = yaml.safe_load(f)
    except yaml.YAMLError as error:
        parser.error(f"{config} is not valid YAML: {' '.join(str(error).split())}")
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        parser.error(f"{config} must map option names to values (lr: 0.01, one per line); it holds a "
                     f"{type(settings).__name__}.")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(str(key) for key in set(settings) - set(actions))
    if unknown:
        parser.error(f"{config} sets unknown options {unknown}.")
    tokens = [token for key, value in settings.items() for token in config_tokens(actions[key], value, config, parser)]
    error = parser.error
    parser.error = lambda message: error(f"{config}: {message}")  # the file's values alone first: their errors
    try:                                                             # name the file
        parser.parse_args(tokens)
    finally:
        del parser.error
    return parser.parse_args(tokens + list(sys.argv[1:] if argv is None else argv))


def config_tokens(action: argparse.Action, value, config: str, parser: argparse.ArgumentParser) -> list:
    """A YAML value as the command-line tokens of ``action`` (None: the option's default, no tokens)."""
    flag = max(action.option_strings, key=len)
    where = f"{config}: {action.dest}"
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            parser.error(f"{where} is a switch; set it to true or false, got {value!r}.")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0] if value else action.option_strings[1]]
        if value == (action.const is True):  # store_true on true, store_false on false
            return [flag]
        return []
    if isinstance(value, dict):
        parser.error(f"{where} must be a value or a list of values, got a mapping.")
    if isinstance(value, list):
        if action.nargs in (None, "?"):
            parser.error(f"{where} takes one value, got the list {value}.")
        return [flag, *(str(v) for v in value)]
    if action.nargs in (None, "?"):
        return [f"{flag}={value}"]  # '=': a value starting with '-' stays a value
    return [flag, str(value)]


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


def data_record(args: argparse.Namespace) -> dict:
    """What a written artefact records of the data it was made from: the data folder as an absolute path,
    so the record reads the same from any working directory, and the data options."""
    return {"data_dir": os.path.abspath(args.data_dir), **data_options(args)}


def model_record(model: str) -> str:
    """A base model as an artefact records it: a local folder as its absolute path, ``demo`` or a hub id as given."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def add_generator_arguments(parser) -> None:
    """The generator's options (model, sampling, strategy inputs), on ``parser`` (or a group); ``--aug`` and the
    data options come from the caller. ``check_generator_args`` and ``generator_factory`` read them back."""
    from .generator.captions import CAPTION_WEIGHTS
    from .generator.components import SCHEDULERS
    from .generator.worker import COMPILE_MODES

    parser.add_argument("--strengths", type=float, nargs="+", help="SDEdit strengths (default: the strategy's)")
    parser.add_argument("--referable-classes", type=int,
                        help="inter-class strategies: each target class takes references from only this many "
                             "source classes, chosen at random (the paper's Fig. 7b)")
    parser.add_argument("--gen-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="diffusers folder or hub id of Stable Diffusion 1.x/2.x, SDXL, SD 3.x or FLUX.1 (read "
                             "from its model_index.json); 'demo': the shipped demo generator; 'tiny': an untrained "
                             "tiny model (smoke runs only)")
    parser.add_argument("--gen-finetuned", help="personalised generator folder (onlinemix finetune)")
    parser.add_argument("--gen-steps", type=int, default=25, help="sampling steps of a full trajectory")
    parser.add_argument("--guidance", type=float, nargs="+", metavar="SCALE",
                        help="classifier-free guidance scale, or several that each sample draws one of "
                             "(default: the strategy's set, diffinversion 2 3 4; else 7.5)")
    parser.add_argument("--gen-resolution", type=int, default=512, help="pixels the generator samples at")
    parser.add_argument("--gen-batch-size", type=int, default=8, help="samples per U-Net call of a worker")
    parser.add_argument("--gen-continuous", action=argparse.BooleanOptionalAction, default=True,
                        help="continuous batching: start a request as soon as a slot of the generator batch frees")
    parser.add_argument("--gen-deep-cache", type=int, default=1, metavar="K",
                        help="DeepCache: recompute the U-Net's deep features every K-th step only (1: exact)")
    parser.add_argument("--gen-posterior-cache", type=int, default=1024, metavar="N",
                        help="VAE posteriors of the last N references each generator worker keeps")
    parser.add_argument("--gen-scheduler", choices=SCHEDULERS, default="dpm-solver++",
                        help="sampling scheduler of a U-Net generator (SD 3 and FLUX always use their own "
                             "flow-matching Euler); an acceleration LoRA needs the one it was distilled for "
                             "(lcm-strength: LCM with every step inside the strength, for `onlinemix distill` output)")
    parser.add_argument("--gen-accelerator", metavar="LORA",
                        help="few-step acceleration LoRA (a .safetensors file, a folder, or "
                             "org/name/file.safetensors), fused next to the personalisation: Hyper-SD's CFG LoRAs "
                             "with --gen-scheduler ddim-trailing; an `onlinemix distill` folder with lcm-strength")
    parser.add_argument("--gen-accelerator-weight", type=float, default=1.0, help="the acceleration LoRA's weight")
    parser.add_argument("--gen-attention", choices=["sdpa", "xformers"], default="sdpa",
                        help="the U-Net's attention: PyTorch's SDPA, or xformers (needs the xformers package)")
    parser.add_argument("--gen-channels-last", action="store_true", help="the U-Net in channels-last memory format")
    parser.add_argument("--gen-fuse-qkv", action="store_true",
                        help="one projection for each attention's query, key and value (exact up to rounding)")
    parser.add_argument("--gen-compile", choices=COMPILE_MODES, metavar="MODE",
                        help=f"torch.compile the U-Net in MODE ({', '.join(COMPILE_MODES)}; reduce-overhead adds "
                             "CUDA graphs)")
    parser.add_argument("--gen-dtype", choices=["float32", "float16", "bfloat16"], default="float16",
                        help="the generator's weights (float32 on the CPU)")
    parser.add_argument("--inversion", metavar="STORE",
                        help="--aug diffinversion: the condition store of `onlinemix invert` on this run's data")
    parser.add_argument("--inversion-noise", type=float, default=0.1, metavar="LAMBDA",
                        help="--aug diffinversion: Gaussian perturbation c + LAMBDA * eps of every condition")
    parser.add_argument("--inversion-interpolation", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="--aug diffinversion: mix each condition c with c2 of another image of its class, "
                             "(1 - alpha) * c + alpha * c2 with alpha uniform in [LOW, HIGH], then add the noise "
                             "(default 0.1 0.1, the method's; 0 0: no mixing)")
    parser.add_argument("--captions", metavar="FILE",
                        help="--aug sgid: the caption store of `onlinemix caption` (or your own) for this run's "
                             "images")
    parser.add_argument("--caption-weights", type=float, nargs=2, default=list(CAPTION_WEIGHTS),
                        metavar=("CAPTION", "LABEL"),
                        help="--aug sgid: prompt weights of the caption's and the class name's tokens")
    parser.add_argument("--clip-filter",
                        help="CLIP folder or hub id (the paper's openai/clip-vit-base-patch32): drop the 10%% of "
                             "samples least confidently showing a --metaclass; needed by --aug realfilter")
    parser.add_argument("--local-files-only", action="store_true", help="never reach a model hub")


# GeneratorSpec's fields and the options that set them; a list value becomes a tuple. A new generator option
# is a flag in add_generator_arguments, a spec field and a row here. Options a command lacks (generate has no
# closed loop) leave their field at the spec's default.
SPEC_OPTIONS = {
    "model": "gen_model", "finetuned": "gen_finetuned", "referable_classes": "referable_classes",
    "strengths": "strengths", "steps": "gen_steps", "guidance": "guidance", "resolution": "gen_resolution",
    "batch_size": "gen_batch_size", "continuous": "gen_continuous", "deep_cache": "gen_deep_cache",
    "posterior_cache": "gen_posterior_cache", "attention": "gen_attention", "channels_last": "gen_channels_last",
    "fuse_qkv": "gen_fuse_qkv", "compile": "gen_compile", "scheduler": "gen_scheduler",
    "accelerator": "gen_accelerator", "accelerator_weight": "gen_accelerator_weight", "dtype": "gen_dtype",
    "clip_model": "clip_filter",
    "local_files_only": "local_files_only", "policy": "gen_policy", "policy_floor": "gen_policy_floor",
    "strength_schedule": "strength_schedule", "inversion": "inversion", "inversion_noise": "inversion_noise",
    "inversion_interpolation": "inversion_interpolation", "captions": "captions",
    "caption_weights": "caption_weights",
}


def generator_spec(args: argparse.Namespace):
    """The ``GeneratorSpec`` of the generator options (``SPEC_OPTIONS``) and ``args.aug``'s strategy, checked by
    the spec itself; a field out of range is reported by its flag. ``generator_factory`` completes the fields
    that depend on the data (image size, long-tail weights, the ``tiny`` model's folder)."""
    from .augmentation import strategy_of
    from .generator.worker import GeneratorSpec, SpecFieldError

    fields = {field: getattr(args, option) for field, option in SPEC_OPTIONS.items() if hasattr(args, option)}
    fields = {field: tuple(value) if isinstance(value, list) else value for field, value in fields.items()}
    try:
        return GeneratorSpec(strategy=strategy_of(args.aug), **fields)
    except SpecFieldError as error:
        raise flag_error(error) from None


def flag_error(error) -> ValueError:
    """A ``SpecFieldError`` told by the command-line flag of its field."""
    return ValueError(f"--{SPEC_OPTIONS[error.field].replace('_', '-')} {error.requirement}")


def check_generator_args(args: argparse.Namespace) -> None:
    """Stop before any work on generator options that cannot run with ``args.aug``'s strategy: the spec's own
    checks (``generator_spec``), then the files the options name (model, personalisation, acceleration LoRA,
    condition and caption stores), read without loading weights."""
    from .augmentation import strategy_of
    from .generator.captions import CaptionStore
    from .generator.conditions import read_store_info
    from .generator.adapters import accelerator_location, personalisation_info
    from .generator.components import model_family, model_source
    from .generator.worker import SpecFieldError, check_family_options
    from .plan import get_strategy

    family = None
    if args.gen_model != "tiny":
        family = model_family(model_source(args.gen_model, local_files_only=args.local_files_only))
    to_be_made = getattr(args, "gen_finetune_config", None)  # train.py personalises it first
    if args.gen_finetuned and not to_be_made and get_strategy(strategy_of(args.aug)).personalised:
        personalisation_info(args.gen_finetuned)  # made by `onlinemix finetune`
    if args.gen_accelerator:
        accelerator_location(args.gen_accelerator, local_files_only=args.local_files_only)
    spec = generator_spec(args)
    if family is not None:
        try:
            check_family_options(family, spec)
        except SpecFieldError as error:
            raise flag_error(error) from None
    if args.inversion:
        read_store_info(args.inversion)
    if args.captions:  # its rows now; whether it covers every training image once the data is loaded
        CaptionStore.load(args.captions)


def generator_factory(args: argparse.Namespace, splits, work_dir: str, *, image_size: int, seed: int = 0,
                      feedback=None):
    """The ``DiffusionProducerFactory`` of ``generator_spec(args)`` over ``splits``' training images, handing
    over images of ``image_size``; ``feedback`` is the closed loop's ``FeedbackBlock`` (``train.py``); ``seed``
    makes ``--gen-model tiny`` in ``work_dir``, once every setting has been checked (a refused run writes
    nothing)."""
    import dataclasses

    import numpy as np

    from .generator.components import generator_model
    from .generator.worker import DiffusionProducerFactory

    weights = None
    if args.imbalance_factor:  # the paper: tail classes are translated toward more often
        from .plan import long_tail_weights

        counts = np.bincount(splits.train.labels, minlength=len(splits.class_names))
        weights = tuple(long_tail_weights(counts).tolist())
    spec = dataclasses.replace(generator_spec(args), image_size=image_size, target_weights=weights)
    factory = DiffusionProducerFactory(spec, splits.train, splits.class_names, args.metaclass, feedback=feedback)
    factory.spec = dataclasses.replace(spec, model=generator_model(args.gen_model, work_dir, seed=seed))
    return factory
