"""What is attached to a generator's weights: a personalisation (the LoRA and learned tokens of
``onlinemix finetune``, or the original Diff-Mix outputs) and few-step acceleration LoRAs (Hyper-SD,
LCM-LoRA, TCD), with the personalised folder's files and facts."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .components import Components

PERSONALISATION_JSON = "onlinemix.json"
DISTILL_JSON = "onlinemix-distill.json"  # the facts of an `onlinemix distill` output
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"  # the first text encoder's tokens; a second's: learned_embeds_2...
DIFFMIX_EMBEDDINGS = "learned_embeds-steps-last.bin"  # what the original Diff-Mix fine-tuning writes


def embeddings_file(encoder: str) -> str:
    """The file of the tokens learned in ``encoder`` (``text_encoder``, ``text_encoder_2``): ``EMBEDDINGS``, or
    its name with the encoder's suffix."""
    return EMBEDDINGS.replace(".safetensors", encoder[len("text_encoder"):] + ".safetensors")


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


def accelerator_schedule(source: Union[str, os.PathLike]) -> dict:
    """The LCM solver grid an ``onlinemix distill`` folder was trained on, as the scheduler option
    ``{"original_inference_steps": N}`` (its few steps must lie on that grid); {} for any other LoRA."""
    import json

    facts = os.path.join(os.fspath(source), DISTILL_JSON)
    if not os.path.isfile(facts):
        return {}
    with open(facts) as f:
        return {"original_inference_steps": json.load(f)["solver_steps"]}


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


def save_personalisation(folder: Union[str, os.PathLike], components: Components, embeddings: dict,
                         info: dict) -> None:
    """Write a personalised generator as one folder: LoRA weights with their alpha (if the denoiser carries
    a LoRA adapter) in the layout the family's pipeline's ``load_lora_weights`` reads, the learned token
    embeddings of each text encoder, and ``onlinemix.json``.

    Args:
        folder: Output folder (created).
        components: The fine-tuned generator, its denoiser with a peft LoRA adapter or none.
        embeddings: ``{encoder: {token: embedding}}``, one entry per text encoder that learned tokens
            (``text_encoder``, ``text_encoder_2``; empty for none), tokens in class order, each ``[D]`` or ``[K, D]``
            (K vectors per token; ``info`` then says ``vectors_per_token``).
        info: JSON-able facts: base model, method, class names, metaclass, steps.
    """
    import json

    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    denoiser = components.denoiser
    if getattr(denoiser, "peft_config", None):
        config = next(iter(denoiser.peft_config.values()))
        name = components.denoiser_name
        layers = get_peft_model_state_dict(denoiser)
        if name == "unet":  # as diffusers' U-Net LoRA scripts save it; its transformer scripts keep peft's keys
            layers = convert_state_dict_to_diffusers(layers)
        pipeline = getattr(diffusers, components.kind.pipelines[0])
        pipeline.save_lora_weights(folder, weight_name=LORA_WEIGHTS, **{f"{name}_lora_layers": layers,
                                                                         f"{name}_lora_adapter_metadata": config.to_dict()})
    for encoder, rows in embeddings.items():
        if rows:
            save_file({t: e.detach().float().cpu().contiguous() for t, e in rows.items()},
                      os.path.join(folder, embeddings_file(encoder)))
    tokens = next((list(rows) for rows in embeddings.values() if rows), [])
    with open(os.path.join(folder, PERSONALISATION_JSON), "w") as f:
        json.dump({**info, "family": components.family, "tokens": tokens}, f, indent=2)


def attach_personalisation(components: Components, folder: Union[str, os.PathLike]) -> dict:
    """Load a personalised generator's LoRA and learned tokens into ``components``.

    Reads the folder ``save_personalisation`` writes (the LoRA through the family's pipeline's
    ``load_lora_weights``, the tokens of each of the family's ``token_encoders``), or the original Diff-Mix
    outputs (``pytorch_lora_weights.safetensors`` and ``learned_embeds-steps-last.bin``, the latter with
    ``torch.load(weights_only=True)``).

    Returns:
        The folder's facts (``personalisation_info``), with ``tokens`` what stands for each class in a
        prompt, in class order: its learned token, or its K tokenizer words space-separated when the
        folder learned ``vectors_per_token`` K > 1 (``token_words``).
    """
    import diffusers

    info = personalisation_info(folder)
    family = components.kind
    trained_on = info.get("family", "sd")
    if trained_on != components.family:
        raise ValueError(f"{os.fspath(folder)!r} personalises a {trained_on} model, but the generator is a "
                         f"{family.title} model: pass the base model it was fine-tuned from.")
    embeddings_path, has_lora = personalisation_weights(folder)
    words = {}
    if embeddings_path is not None:
        for encoder in family.token_encoders:
            words = add_tokens(components, read_embeddings(folder, encoder, embeddings_path, info), encoder=encoder)
    if has_lora:
        from diffusers.utils import logging as diffusers_logging

        # The pipeline also looks for LoRA of each text encoder, which these folders never hold, and warns
        # once per encoder that it found none.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            components.pipeline(getattr(diffusers, family.pipelines[0])).load_lora_weights(
                os.fspath(folder), weight_name=LORA_WEIGHTS, adapter_name="personalised")
        finally:
            diffusers_logging.set_verbosity(verbosity)
    info["tokens"] = list(words.values())
    return info


def read_embeddings(folder: Union[str, os.PathLike], encoder: str, first: str, info: dict) -> dict:
    """``{token: [K, D] or [D]}`` learned in ``encoder``, in class order: from its ``embeddings_file``, or, for the
    first encoder, from ``first`` (ours or the original Diff-Mix's, ``personalisation_weights``)."""
    from safetensors.torch import load_file

    path = first if encoder == "text_encoder" else os.path.join(os.fspath(folder), embeddings_file(encoder))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)!r} lacks {embeddings_file(encoder)}, the tokens of {encoder}; "
                                "its files are incomplete: fine-tune it again into an empty folder.")
    if path.endswith(".safetensors"):
        embeddings = load_file(path)
        embeddings = {t: embeddings[t] for t in info.get("tokens", embeddings)}
    else:
        embeddings = torch.load(path, map_location="cpu", weights_only=True)
    vectors = info.get("vectors_per_token", 1)
    counts = {t: row.reshape(-1, row.shape[-1]).shape[0] for t, row in embeddings.items()}
    wrong = [t for t, count in counts.items() if count != vectors]
    if wrong:
        raise ValueError(f"{os.fspath(folder)!r} says vectors_per_token = {vectors} in {PERSONALISATION_JSON}, but the "
                         f"embedding of {wrong[0]!r} holds {counts[wrong[0]]} vectors: its files come from different "
                         "runs; fine-tune it again into an empty folder.")
    return embeddings


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


def tokenizer_of(components: Components, encoder: str):
    """The tokenizer that feeds ``encoder`` (``text_encoder_2``: ``tokenizer_2``)."""
    return getattr(components, encoder.replace("text_encoder", "tokenizer"))


def add_tokens(components: Components, embeddings: dict, *, encoder: str = "text_encoder") -> dict:
    """Add learned tokens to a tokenizer and their embedding rows to its text encoder.

    Args:
        components: The generator to extend.
        embeddings: ``{token: row}``, each row ``[D]`` (one vector) or ``[K, D]`` (K vectors: the
            token becomes K tokenizer words, see ``token_words``).
        encoder: Which text encoder (``text_encoder``, ``text_encoder_2``) and tokenizer of the same suffix.

    Returns:
        ``{token: text}``: what stands for each token in a prompt, its K words space-separated.
    """
    tokenizer, encoder = tokenizer_of(components, encoder), getattr(components, encoder)
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
