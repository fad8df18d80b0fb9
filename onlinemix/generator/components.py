"""The parts of a Stable-Diffusion-like generator and where they are read from.

``Components`` holds tokenizer, text encoder, U-Net, VAE and a DPM-Solver++ scheduler.
``model_source`` says, without loading weights, what a model name means (a diffusers folder,
a hub id, ``demo``: the shipped demo generator) and ``generator_model`` makes ``tiny`` a folder;
``load_components`` reads the parts (Stable Diffusion 1.x/2.x layout); the sampling schedulers
and the attention processor are set here. What is attached to the weights (personalisation,
acceleration LoRAs) is ``adapters.py``; the tiny models built in code are ``tiny.py``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Union

import torch

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    algorithm_type="dpmsolver++",
    solver_order=2,
    prediction_type="epsilon",
)


@dataclass
class Components:
    """A text-to-image latent diffusion model, split into the parts the sampler drives.

    ``family`` (``families.FAMILIES``) says which parts it has: Stable Diffusion 1.x/2.x a tokenizer, text
    encoder and ``unet``; SDXL a second tokenizer and encoder; SD 3.x a third (T5, optional) and a
    ``transformer`` for the U-Net; FLUX.1 a CLIP and a T5 encoder and a ``transformer``.
    ``pipeline_config`` holds the pipeline's own settings from ``model_index.json`` (SDXL's
    ``force_zeros_for_empty_prompt``).
    """

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: Optional[torch.nn.Module]
    vae: torch.nn.Module
    scheduler: object
    tokenizer_2: object = None
    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_3: object = None
    text_encoder_3: Optional[torch.nn.Module] = None
    transformer: Optional[torch.nn.Module] = None
    family: str = "sd"
    pipeline_config: dict = field(default_factory=dict)

    def __post_init__(self):
        from .families import FAMILIES

        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}.")
        if (self.unet is None) == (self.transformer is None):
            raise ValueError("A generator has one denoiser: a unet (sd, sdxl) or a transformer (sd3, flux).")

    @property
    def kind(self):
        """The family (``families.Family``) that drives these parts."""
        from .families import FAMILIES

        return FAMILIES[self.family]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The U-Net or the transformer."""
        return getattr(self, self.denoiser_name)

    @property
    def denoiser_name(self) -> str:
        """Which part holds the denoiser: ``unet`` or ``transformer``."""
        return "unet" if self.unet is not None else "transformer"

    @property
    def modules(self) -> list:
        """Every model (text encoders, denoiser, VAE) this generator has."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.denoiser, self.vae)
                if m is not None]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "Components":
        # Only name what changes: diffusers warns about fp32-kept modules whenever `dtype=` is passed, even None.
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in self.modules:
            module.to(**moves)
        return self

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Save in the diffusers folder layout, loadable by ``load_components`` and diffusers' pipelines."""
        import diffusers

        quiet_loading_bars()  # transformers draws a "Writing model shards" bar too
        self.pipeline(getattr(diffusers, self.kind.pipelines[0])).save_pretrained(folder, safe_serialization=True)

    def pipeline(self, cls):
        """A diffusers pipeline of class ``cls`` over these very modules (no safety checker, watermark or
        image encoder)."""
        import inspect

        accepts = inspect.signature(cls.__init__).parameters
        parts = {name: getattr(self, name) for name in accepts if name in PART_NAMES}
        absent = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, image_encoder=None,
                      add_watermarker=False)
        settings = {**{k: v for k, v in absent.items() if k in accepts},
                    **{k: v for k, v in self.pipeline_config.items() if k in accepts}}
        return cls(**parts, **settings)


PART_NAMES = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3", "unet",
              "transformer", "vae", "scheduler")


def dpm_solver_scheduler(config: Optional[dict] = None):
    """DPM-Solver++ (2M) with a Stable Diffusion noise schedule, or adapted from ``config``."""
    from diffusers import DPMSolverMultistepScheduler

    if config is None:
        return DPMSolverMultistepScheduler(**SD_SCHEDULER)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


SCHEDULERS = ("dpm-solver++", "ddim-trailing", "lcm", "lcm-strength", "tcd")


def sampling_scheduler(name: str, config: dict):
    """The scheduler ``name`` (``SCHEDULERS``) on the noise schedule of ``config``.

    ``dpm-solver++``: DPM-Solver++ (2M), the paper's; ``ddim-trailing``: DDIM with trailing
    timestep spacing, what Hyper-SD's LoRAs are distilled for; ``lcm`` / ``tcd``: what LCM-LoRA /
    TCD-LoRA are distilled for; ``lcm-strength``: LCM with every strength running all its steps
    (the sampler's ``schedule_in_strength``), what ``onlinemix distill``'s students sample with.
    """
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    if name == "dpm-solver++":
        return dpm_solver_scheduler(config)
    if name == "ddim-trailing":
        # Latents are not images: never clip them to [-1, 1] (SD 1.5's own config says so; a DPM config is silent).
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    if name in ("lcm", "lcm-strength", "tcd"):
        return {"lcm": LCMScheduler, "lcm-strength": LCMScheduler, "tcd": TCDScheduler}[name].from_config(config)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}.")


def model_index(model: str, *, local_files_only: bool = False) -> dict:
    """A diffusers model's ``model_index.json`` (its pipeline class and the classes of its parts); a folder
    without one is read as the Stable Diffusion layout it predates."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        return {"_class_name": "StableDiffusionPipeline"}
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(model, local_files_only=local_files_only))


def model_family(source: str):
    """The family (``families.Family``) of a ``model_source``: a folder's, or a hub model's already in the hub
    cache; None for a hub model not downloaded yet, whose ``model_index.json`` is read once it is loaded."""
    from huggingface_hub import try_to_load_from_cache

    from .families import family_of

    if not os.path.isdir(source) and not isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        return None
    return family_of(model_index(source, local_files_only=True)["_class_name"])


def model_source(model: Union[str, os.PathLike], *, local_files_only: bool = False,
                 families: Optional[tuple] = None) -> str:
    """What ``load_components`` reads ``model`` from, checked without loading any weights: a complete
    diffusers folder of a supported family (``demo``: the shipped one), or a hub id of the form org/name
    (with ``local_files_only``, one already in the hub cache). ``families``: the family names a caller can
    use (a folder of another is refused); None: any.

    Raises:
        FileNotFoundError: A path that is no complete diffusers folder, or an uncached hub id offline.
        ValueError: A folder of a pipeline no family supports (``families.family_of``), or of a family
            outside ``families``.
    """
    from .families import FAMILIES, family_of

    model = os.fspath(model)
    if model == "demo":
        model = demo_model_path()
    if model == "tiny":
        raise FileNotFoundError("'tiny' is train.py's untrained smoke-test generator, made in its run folder, with "
                                "nothing to learn from; pass 'demo' (the pretrained demo generator), a diffusers "
                                "folder or a hub id.")
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") != 1
    if not os.path.isdir(model) and looks_like_path:
        raise FileNotFoundError(f"No model folder at {model!r}; pass a diffusers folder or a hub id (org/name).")
    if os.path.isdir(model):
        index = model_index(model)
        family = family_of(index["_class_name"])
        missing = [p for p in family.parts if not os.path.isdir(os.path.join(model, p))
                   and not (p in family.optional_parts and index.get(p, [None])[0] is None)]
        if missing:
            raise FileNotFoundError(
                f"{model!r} is not a complete diffusers {family.title} folder: it lacks {missing}. "
                "Save one with the pipeline's save_pretrained(folder)."
            )
        if families is not None and family.name not in families:
            raise ValueError(f"{model!r} is a {family.title} model; this command takes "
                             f"{' or '.join(FAMILIES[f].title for f in families)} models only (it trains a Stable "
                             f"Diffusion U-Net's objective); `onlinemix finetune` and the generator take every family "
                             f"({', '.join(FAMILIES[f].title for f in FAMILIES)}).")
    elif local_files_only:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            raise FileNotFoundError(f"{model!r} is not in the hub cache and --local-files-only forbids fetching it; "
                                    "download it first, or pass its local folder.")
    return model


def quiet_loading_bars() -> None:
    """No "Loading weights" or "Writing model shards" bars from transformers and diffusers when stderr is no
    terminal: in a log file each model load or save would leave a line per redraw."""
    if sys.stderr.isatty():
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def load_components(
    model: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    local_files_only: bool = False,
    attention: str = "sdpa",
) -> Components:
    """Load the parts of a text-to-image model of a supported family (``families.FAMILIES``).

    The family is read from the model's ``model_index.json``; each part is loaded with the class it names.
    The sampling scheduler is DPM-Solver++ on the model's noise schedule for the U-Net families (the paper's),
    the model's own flow-matching Euler for SD 3 and FLUX.

    Args:
        model: A diffusers folder (``model_index.json`` and a sub-folder per part), a hub id, or ``"demo"``:
            the tiny Stable Diffusion generator shipped with the package (``demo_model.py``).
        dtype: Weights' dtype (``torch.float16``/``bfloat16`` on GPUs). SDXL's VAE stays float32 under float16
            when its config says ``force_upcast``, as its pipelines upcast it.
        device: Where the modules go.
        local_files_only: Never reach a hub.
        attention: ``"sdpa"`` (PyTorch's scaled-dot-product attention, default) or
            ``"xformers"`` (needs the ``xformers`` package).
    """
    import importlib

    from .families import family_of

    if attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}.")
    model = model_source(model, local_files_only=local_files_only)
    quiet_loading_bars()
    kwargs = dict(local_files_only=local_files_only)
    try:
        index = model_index(model, local_files_only=local_files_only)
        family = family_of(index["_class_name"])
        parts = {}
        for name in family.parts[:-1]:  # the scheduler is the sampler's choice, below
            # A folder older than model_index.json names no classes: Stable Diffusion's.
            library, class_name = index.get(name, SD_CLASSES.get(name)) or (None, None)
            if library is None and name in family.optional_parts:
                parts[name] = None
                continue
            if library is None:
                raise FileNotFoundError(f"{model!r}'s model_index.json names no class for its {name!r}, which a "
                                        f"{family.name} generator needs.")
            cls = getattr(importlib.import_module(library), class_name)
            weights = {} if "tokenizer" in name else dict(torch_dtype=dtype)
            if name == "vae" and family.name == "sdxl" and dtype == torch.float16:
                weights = dict(torch_dtype=torch.float32) if cls.load_config(model, subfolder="vae", **kwargs).get(
                    "force_upcast", True) else weights
            parts[name] = cls.from_pretrained(model, subfolder=name, **weights, **kwargs)
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        base = FlowMatchEulerDiscreteScheduler if family.flow else DPMSolverMultistepScheduler
        config = base.load_config(model, subfolder="scheduler", **kwargs)
        scheduler = base.from_config(config) if family.flow else dpm_solver_scheduler(config)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the model {model!r} ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            "Without network access, download it elsewhere and pass its local folder, e.g. "
            "--gen-model /models/stable-diffusion-v1-5."
        ) from None
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
    components = Components(parts.pop("tokenizer"), parts.pop("text_encoder"), parts.pop("unet", None),
                            parts.pop("vae"), scheduler, **parts, family=family.name, pipeline_config=settings)
    components.to(device=device)
    set_attention(components, attention)
    for module in components.modules:
        module.requires_grad_(False).eval()
    return components


SD_CLASSES = {"tokenizer": ("transformers", "CLIPTokenizer"), "text_encoder": ("transformers", "CLIPTextModel"),
              "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}


def set_attention(components: Components, attention: str) -> None:
    """Route the U-Net's and VAE's attention through SDPA or xformers. The transformers of SD 3 and FLUX keep
    their own joint-attention processors, which are SDPA already."""
    if components.unet is None:
        if attention == "xformers":
            raise ValueError(f"attention='xformers' is for the U-Net families; a {components.family} generator's "
                             "transformer runs PyTorch's SDPA (attention='sdpa').")
        return
    if attention == "xformers":
        try:
            import xformers  # noqa: F401 - only whether it imports
        except ImportError:
            raise ValueError("attention='xformers' needs the xformers package: pip install 'onlinemix[xformers]'.") from None
        components.unet.enable_xformers_memory_efficient_attention()
        components.vae.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        components.unet.set_attn_processor(AttnProcessor2_0())
        components.vae.set_attn_processor(AttnProcessor2_0())


def generator_model(model: str, work_dir: str, *, seed: int = 0) -> str:
    """``model`` as the generator loads it: ``tiny`` is written once, untrained, to ``work_dir/tiny-generator``
    (smoke runs only); anything else (a folder, a hub id, ``demo``) is passed through."""
    if model != "tiny":
        return model
    from .tiny import tiny_components

    folder = os.path.join(work_dir, "tiny-generator")
    if not os.path.isdir(folder):
        tiny_components(seed=seed).save(folder)
    return folder


# The shipped demo generator's weights (package data); ``onlinemix.demo_model`` trains them.
DEMO_MODEL = os.fspath(resources.files("onlinemix.generator") / "demo_model")


def demo_model_path() -> str:
    """The shipped, pretrained demo generator's folder (a diffusers Stable Diffusion folder)."""
    if not os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")):
        raise FileNotFoundError(
            f"The pretrained demo generator is missing from {DEMO_MODEL!r}; rebuild it with "
            f"`onlinemix pretrain-demo --out {DEMO_MODEL}` (see docs/usage/demo-generator.md)."
        )
    return DEMO_MODEL
