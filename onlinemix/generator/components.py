"""The parts of a Stable-Diffusion-like generator, loaded from a folder or a hub id, or built tiny.

``Components`` holds tokenizer, text encoder, U-Net, VAE and a DPM-Solver++
scheduler. ``load_components`` reads a diffusers folder or hub id (Stable
Diffusion 1.x/2.x layout); ``tiny_components`` builds a small model in code, with
the same architecture family and an 8x VAE, for tests and demos without downloads.

It stays one module because every part of it answers one question, "which weights does
this generator run": where a model is read from (``model_source``, checked before any
work), the parts, the LoRAs and tokens attached to them, and the tiny stand-ins.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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
    """A text-to-image latent diffusion model, split into the parts the sampler drives."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "Components":
        # Only name what changes: diffusers warns about fp32-kept modules whenever `dtype=` is passed, even None.
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(**moves)
        return self

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Save in the diffusers folder layout, loadable by ``load_components`` and diffusers' pipelines."""
        from diffusers import StableDiffusionPipeline

        quiet_loading_bars()  # transformers draws a "Writing model shards" bar too
        self.pipeline(StableDiffusionPipeline).save_pretrained(folder, safe_serialization=True)

    def pipeline(self, cls):
        """A diffusers pipeline of class ``cls`` over these very modules (no safety checker)."""
        return cls(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                   scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)


def dpm_solver_scheduler(config: Optional[dict] = None):
    """DPM-Solver++ (2M) with a Stable Diffusion noise schedule, or adapted from ``config``."""
    from diffusers import DPMSolverMultistepScheduler

    if config is None:
        return DPMSolverMultistepScheduler(**SD_SCHEDULER)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


SCHEDULERS = ("dpm-solver++", "ddim-trailing", "lcm", "tcd")


def sampling_scheduler(name: str, config: dict):
    """The scheduler ``name`` (``SCHEDULERS``) on the noise schedule of ``config``.

    ``dpm-solver++``: DPM-Solver++ (2M), the paper's; ``ddim-trailing``: DDIM with trailing
    timestep spacing, what Hyper-SD's LoRAs are distilled for; ``lcm`` / ``tcd``: what LCM-LoRA /
    TCD-LoRA are distilled for.
    """
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    if name == "dpm-solver++":
        return dpm_solver_scheduler(config)
    if name == "ddim-trailing":
        # Latents are not images: never clip them to [-1, 1] (SD 1.5's own config says so; a DPM config is silent).
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    if name in ("lcm", "tcd"):
        return {"lcm": LCMScheduler, "tcd": TCDScheduler}[name].from_config(config)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}.")


def accelerator_location(source: Union[str, os.PathLike], *, local_files_only: bool = False) -> tuple[str, dict]:
    """Where diffusers reads an acceleration LoRA from (``attach_accelerator``'s ``source``): its folder or
    hub repository and the keywords naming the file; raises before any work if a local one is missing."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return os.path.dirname(source) or ".", dict(weight_name=os.path.basename(source))
    if os.path.isdir(source):
        return source, dict(weight_name=LORA_WEIGHTS)
    if source.count("/") >= 2 and source.endswith(".safetensors") and not source.startswith(("/", ".", "~")):
        org, name, file = source.split("/", 2)
        return f"{org}/{name}", dict(weight_name=file, local_files_only=local_files_only)
    raise FileNotFoundError(f"No acceleration LoRA at {source!r}: pass a .safetensors file, a folder with "
                            f"{LORA_WEIGHTS}, or org/name/file.safetensors on a model hub.")


def attach_accelerator(components: Components, source: Union[str, os.PathLike], *, weight: float = 1.0,
                       local_files_only: bool = False) -> None:
    """Load a few-step acceleration LoRA (Hyper-SD, LCM-LoRA, TCD) into the U-Net as the adapter
    ``accelerator``, next to the personalisation's ``personalised`` adapter when there is one.

    Args:
        source: A LoRA file (``.safetensors``), a folder holding ``pytorch_lora_weights.safetensors``,
            or ``org/name/file.safetensors`` on a model hub.
        weight: The adapter's weight (its model card gives it).
    """
    from diffusers import StableDiffusionPipeline

    location, kwargs = accelerator_location(source, local_files_only=local_files_only)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(location, return_lora_metadata=True, **kwargs)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=components.unet, adapter_name="accelerator",
                                                metadata=metadata)
    names = [name for name in ("personalised", "accelerator") if name in components.unet.peft_config]
    components.unet.set_adapters(names, weights=[1.0 if name == "personalised" else weight for name in names])


MODEL_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def model_source(model: Union[str, os.PathLike], *, local_files_only: bool = False) -> str:
    """What ``load_components`` reads ``model`` from, checked without loading any weights: a complete
    diffusers folder (``demo``: the shipped one), or a hub id of the form org/name (with
    ``local_files_only``, one already in the hub cache).

    Raises:
        FileNotFoundError: A path that is no complete diffusers folder, or an uncached hub id offline.
    """
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
        missing = [p for p in MODEL_PARTS if not os.path.isdir(os.path.join(model, p))]
        if missing:
            raise FileNotFoundError(
                f"{model!r} is not a complete diffusers Stable Diffusion folder: it lacks {missing}. "
                "Save one with StableDiffusionPipeline.save_pretrained(folder)."
            )
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
    """Load tokenizer, text encoder, U-Net, VAE and scheduler of a Stable Diffusion model.

    Args:
        model: A diffusers folder (``model_index.json`` with ``tokenizer/``,
            ``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``), a hub id, or
            ``"demo"``: the tiny generator shipped with the package (``demo_model.py``).
        dtype: Weights' dtype (``torch.float16``/``bfloat16`` on GPUs).
        device: Where the modules go.
        local_files_only: Never reach a hub.
        attention: ``"sdpa"`` (PyTorch's scaled-dot-product attention, default) or
            ``"xformers"`` (needs the ``xformers`` package).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}.")
    model = model_source(model, local_files_only=local_files_only)
    quiet_loading_bars()
    kwargs = dict(local_files_only=local_files_only)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        from diffusers import DPMSolverMultistepScheduler

        scheduler = dpm_solver_scheduler(DPMSolverMultistepScheduler.load_config(model, subfolder="scheduler", **kwargs))
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the model {model!r} ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            "Without network access, download it elsewhere and pass its local folder, e.g. "
            "--gen-model /models/stable-diffusion-v1-5."
        ) from None
    components = Components(tokenizer, text_encoder, unet, vae, scheduler).to(device=device)
    set_attention(components, attention)
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval()
    return components


def set_attention(components: Components, attention: str) -> None:
    """Route the U-Net's and VAE's attention through SDPA or xformers."""
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


def tiny_tokenizer(size: Optional[int] = None):
    """A CLIP tokenizer whose vocabulary is the 512 byte-level characters (no merges), padded
    with never-produced ``<|unused_k|>`` entries to ``size`` tokens when given (e.g. CLIP's 49 408)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # byte-level BPE's printable stand-ins

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    characters = bytes_to_unicode()
    for char in (characters[byte] for byte in range(256)):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    while size is not None and len(vocab) < size:
        vocab[f"<|unused_{len(vocab)}|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(seed: int = 0, *, cross_attention_dim: int = 32) -> Components:
    """A small SD-like model built in code: byte-level CLIP tokenizer, 2-layer CLIP text
    encoder, a two-level conditional U-Net and a 4-block (8x) VAE. Random weights from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=64,
    )
    components = Components(tokenizer, text_encoder, unet, vae, dpm_solver_scheduler())
    set_attention(components, "sdpa")
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval()
    return components


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


PERSONALISATION_JSON = "onlinemix.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"
DIFFMIX_EMBEDDINGS = "learned_embeds-steps-last.bin"  # what the original Diff-Mix fine-tuning writes
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_personalisation(folder: Union[str, os.PathLike], unet: torch.nn.Module, embeddings: dict,
                         info: dict) -> None:
    """Write a personalised generator as one folder: LoRA weights with their alpha (if the
    U-Net carries a LoRA adapter), learned token embeddings, and ``onlinemix.json``.

    Args:
        folder: Output folder (created).
        unet: The fine-tuned U-Net, with a peft LoRA adapter or none.
        embeddings: ``{token: embedding}`` of the learned tokens in class order, each ``[D]`` or ``[K, D]``
            (K vectors per token; ``info`` then says ``vectors_per_token``).
        info: JSON-able facts: base model, method, class names, metaclass, steps.
    """
    import json

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if getattr(unet, "peft_config", None):
        config = next(iter(unet.peft_config.values()))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                                  unet_lora_adapter_metadata=config.to_dict())
    if embeddings:
        save_file({t: e.detach().float().cpu().contiguous() for t, e in embeddings.items()},
                  os.path.join(folder, EMBEDDINGS))
    with open(os.path.join(folder, PERSONALISATION_JSON), "w") as f:
        json.dump({**info, "tokens": list(embeddings)}, f, indent=2)


def attach_personalisation(components: Components, folder: Union[str, os.PathLike]) -> dict:
    """Load a personalised generator's LoRA and learned tokens into ``components``.

    Reads the folder ``save_personalisation`` writes, or the original Diff-Mix
    outputs (``pytorch_lora_weights.safetensors`` and ``learned_embeds-steps-last.bin``,
    the latter with ``torch.load(weights_only=True)``).

    Returns:
        The folder's facts (``personalisation_info``), with ``tokens`` what stands for each class in a
        prompt, in class order: its learned token, or its K tokenizer words space-separated when the
        folder learned ``vectors_per_token`` K > 1 (``token_words``).
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    info = personalisation_info(folder)
    embeddings_file, has_lora = personalisation_weights(folder)
    embeddings = {}
    if embeddings_file is not None and embeddings_file.endswith(EMBEDDINGS):
        embeddings = load_file(embeddings_file)
        embeddings = {t: embeddings[t] for t in info.get("tokens", embeddings)}
    elif embeddings_file is not None:
        embeddings = torch.load(embeddings_file, map_location="cpu", weights_only=True)
    vectors = info.get("vectors_per_token", 1)
    counts = {t: row.reshape(-1, row.shape[-1]).shape[0] for t, row in embeddings.items()}
    wrong = [t for t, count in counts.items() if count != vectors]
    if wrong:
        raise ValueError(f"{os.fspath(folder)!r} says vectors_per_token = {vectors} in {PERSONALISATION_JSON}, but the "
                         f"embedding of {wrong[0]!r} holds {counts[wrong[0]]} vectors: its files come from different "
                         "runs; fine-tune it again into an empty folder.")
    words = add_tokens(components, embeddings) if embeddings else {}
    if has_lora:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            folder, weight_name=LORA_WEIGHTS, return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=components.unet, adapter_name="personalised",
                                                    metadata=metadata)
    info["tokens"] = list(words.values())
    return info


def personalisation_weights(folder: Union[str, os.PathLike]) -> tuple[Optional[str], bool]:
    """The learned-embeddings file of a personalised folder (ours, else the original Diff-Mix's; None
    without one) and whether it holds LoRA weights. Raises if it holds neither."""
    folder = os.fspath(folder)
    embeddings = next((os.path.join(folder, name) for name in (EMBEDDINGS, DIFFMIX_EMBEDDINGS)
                       if os.path.isfile(os.path.join(folder, name))), None)
    lora = os.path.isfile(os.path.join(folder, LORA_WEIGHTS))
    if embeddings is None and not lora:
        raise FileNotFoundError(
            f"{folder!r} holds neither {EMBEDDINGS} / {DIFFMIX_EMBEDDINGS} nor {LORA_WEIGHTS}; pass the output "
            "folder of `onlinemix finetune` or of the original Diff-Mix fine-tuning.")
    return embeddings, lora


def personalisation_info(folder: Union[str, os.PathLike]) -> dict:
    """The facts of a personalised generator folder: its ``onlinemix.json`` (empty for the original
    Diff-Mix outputs), with ``method`` always set: ``ti_db``, ``ti`` or ``db``, read from the file or,
    without one, told by which weights the folder holds."""
    import json

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No personalised generator folder at {folder!r}.")
    info = {}
    if os.path.isfile(os.path.join(folder, PERSONALISATION_JSON)):
        with open(os.path.join(folder, PERSONALISATION_JSON)) as f:
            info = json.load(f)
    if "method" not in info:
        embeddings, lora = personalisation_weights(folder)
        info["method"] = "ti_db" if embeddings and lora else ("ti" if embeddings else "db")
    return info


def token_words(token: str, vectors: int) -> list[str]:
    """The tokenizer words of a learned token with ``vectors`` embedding vectors: ``token`` itself, then
    ``token_1`` ... ``token_{K-1}`` (diffusers' multi-vector textual inversion naming)."""
    return [token] + [f"{token}_{k}" for k in range(1, vectors)]


def add_tokens(components: Components, embeddings: dict) -> dict:
    """Add learned tokens to the tokenizer and their embedding rows to the text encoder.

    Args:
        components: The generator to extend.
        embeddings: ``{token: row}``, each row ``[D]`` (one vector) or ``[K, D]`` (K vectors: the
            token becomes K tokenizer words, see ``token_words``).

    Returns:
        ``{token: text}``: what stands for each token in a prompt, its K words space-separated.
    """
    tokenizer, encoder = components.tokenizer, components.text_encoder
    rows = {token: row.reshape(-1, row.shape[-1]) for token, row in embeddings.items()}
    words = {token: token_words(token, len(row)) for token, row in rows.items()}
    clash = [w for ws in words.values() for w in ws if w in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"Tokens {clash[:3]} already exist in the tokenizer; a generator can be personalised once.")
    tokenizer.add_tokens([w for ws in words.values() for w in ws])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # every new row is set below
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, row in rows.items():
            if row.shape[-1] != table.shape[1]:
                raise ValueError(f"Token {token!r} has a {row.shape[-1]}-d embedding but the text encoder uses "
                                 f"{table.shape[1]}: the personalised folder belongs to another base model.")
            table[tokenizer.convert_tokens_to_ids(words[token])] = row.to(table.dtype)
    return {token: " ".join(ws) for token, ws in words.items()}
