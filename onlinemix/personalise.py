"""Personalisation, Diff-Mix's first stage: textual inversion + LoRA ("TI+DB"), TI-only, DB-only.

``Personaliser`` turns loaded ``Components`` into a trainable personalisation: one new
token ``<class_i>`` per class (``ti_db``, ``ti``) of K learned vectors (K tokenizer words,
``token_words``), initialised from an existing word (the paper's rare "ktn") or from a
description of each class, and LoRA on the U-Net's attention projections (``ti_db``, ``db``).
Tokens and LoRA learn at learning rates of their own. Its ``loss`` is Stable Diffusion's
noise-prediction MSE on captions "a photo of a <class_i> {metaclass}" (``db``: the class
name instead of a token), the very prompts the generator later uses. ``onlinemix
finetune`` (``onlinemix.finetune``) trains it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .generator.adapters import LORA_TARGETS, add_tokens, token_words
from .generator.components import Components
from .plan import PERSONALISATIONS, get_strategy, placeholder_token
from .training_noise import TrainingNoise

# The authors initialised every token from CLIP's rare sub-word "ktn" (id 42170).
INITIALIZER = "ktn"


def class_tokens(class_names: Sequence[str], method: str) -> list:
    """What stands for each class in captions: ``<class_i>``, or the class name for ``db``."""
    if method == "db":
        return list(class_names)
    return [placeholder_token(i) for i in range(len(class_names))]


class Personaliser:
    """The trainable part of a personalised generator and its training loss.

    Args:
        components: A loaded base model (``load_components``); it is modified in place
            (tokens added to tokenizer and text encoder, a LoRA adapter on the U-Net).
        class_names: Class names in label order.
        metaclass: What the classes are ("bird" ...), the caption's last word.
        method: ``ti_db`` (tokens + LoRA, the paper's), ``ti`` (tokens only) or ``db``
            (LoRA only, class names in captions).
        rank: LoRA rank (10 in the paper); alpha equals the rank.
        vectors_per_token: K, the learned vectors of each class token (1 in the paper).
        initializer: Existing word whose embedding (mean over its sub-words) starts every vector of
            every class without a description.
        descriptions: ``{class name: words}``: a class's K vectors start from its description's
            sub-word embeddings, split into K consecutive runs, each run's mean one vector.
    """

    def __init__(self, components: Components, class_names: Sequence[str], metaclass: str, *,
                 method: str = "ti_db", rank: int = 10, vectors_per_token: int = 1,
                 initializer: str = INITIALIZER, descriptions: Optional[dict] = None):
        descriptions = descriptions or {}
        self.check_inputs(components, class_names, method, rank, vectors_per_token, descriptions)
        self.components, self.method, self.rank = components, method, rank
        self.class_names, self.metaclass = list(class_names), metaclass
        self.vectors_per_token = vectors_per_token
        self.tokens = class_tokens(class_names, method)
        # What stands for each class in a caption: its token's K words, or its name (db).
        self.prompt_tokens = list(self.tokens)
        # What `loss` runs; a training loop may swap in wrapped (e.g. DDP) versions.
        self.unet, self.text_encoder = components.unet, components.text_encoder
        for module in (self.unet, self.text_encoder, components.vae):
            module.requires_grad_(False)
        self.token_ids = []
        if method != "db":
            starts = {token: self.initial_vectors(descriptions.get(name, initializer), vectors_per_token)
                      for token, name in zip(self.tokens, self.class_names)}
            self.prompt_tokens = list(add_tokens(components, starts).values())
            table = components.text_encoder.get_input_embeddings().weight
            self.token_ids = components.tokenizer.convert_tokens_to_ids(
                [w for t in self.tokens for w in token_words(t, vectors_per_token)])
            table.requires_grad_(True)
            # Every other row is put back after each step: only the new tokens learn.
            self.frozen_rows = table.detach().clone()
            self.keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
            self.keep[self.token_ids] = False
        if method != "ti":
            from peft import LoraConfig

            components.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=LORA_TARGETS))
        prompt = get_strategy("diffmix")
        captions = [prompt.prompt_for(c, self.class_names, metaclass, self.prompt_tokens)
                    for c in range(len(class_names))]
        self.captions = captions
        self.caption_ids = components.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt",
                                                max_length=components.tokenizer.model_max_length).input_ids
        self.training_noise = TrainingNoise(components.scheduler.config)

    @staticmethod
    def check_inputs(components: Components, class_names: Sequence[str], method: str, rank: int,
                     vectors_per_token: int, descriptions: dict) -> None:
        if method not in PERSONALISATIONS:
            raise ValueError(f"--method must be one of {', '.join(PERSONALISATIONS)}, got {method!r}.")
        if len(class_names) < 2:
            raise ValueError(f"Personalisation needs at least 2 classes, the data set has {len(class_names)}.")
        if method != "ti" and rank < 1:
            raise ValueError(f"--rank must be >= 1, got {rank}.")
        if vectors_per_token < 1:
            raise ValueError(f"--vectors-per-token must be >= 1, got {vectors_per_token}.")
        if method == "db" and (vectors_per_token != 1 or descriptions):
            raise ValueError("--method db learns no tokens: drop --vectors-per-token and --class-descriptions, "
                             "or use --method ti_db.")
        unknown = sorted(set(descriptions) - set(class_names))
        if unknown:
            raise ValueError(f"--class-descriptions names classes the data set lacks: {unknown[:3]}; its keys must be "
                             f"class names such as {list(class_names)[:2]}.")
        if method != "db":
            vocab = components.tokenizer.get_vocab()
            clash = [placeholder_token(i) for i in range(len(class_names)) if placeholder_token(i) in vocab]
            if clash:
                raise ValueError(f"The tokenizer already holds {clash[:3]}: fine-tune from the base model, not from "
                                 "an already personalised one.")

    def initial_vectors(self, words: str, count: int) -> torch.Tensor:
        """``[count, D]``: the sub-word embeddings of ``words`` split into ``count`` consecutive runs (each
        sub-word reused in turn when there are fewer), each run averaged."""
        ids = self.components.tokenizer(words, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"{words!r} encodes to no token; pass existing words to --initializer or "
                             "--class-descriptions.")
        table = self.components.text_encoder.get_input_embeddings().weight.detach().float()
        if len(ids) < count:
            return table[[ids[k % len(ids)] for k in range(count)]]
        return torch.stack([table[list(run)].mean(0) for run in np.array_split(ids, count)])

    def parameters(self) -> list:
        """The trainable tensors: the LoRA weights (db, ti_db) and the embedding table (ti, ti_db)."""
        return [p for group in self.parameter_groups(1.0, 1.0) for p in group["params"]]

    def parameter_groups(self, lr: float, token_lr: float) -> list:
        """Optimizer groups: LoRA at ``lr``, the embedding table (only the new rows learn) at ``token_lr``."""
        groups = []
        lora = [p for p in self.components.unet.parameters() if p.requires_grad]
        if lora:
            groups.append({"params": lora, "lr": lr})
        if self.token_ids:
            groups.append({"params": [self.components.text_encoder.get_input_embeddings().weight], "lr": token_lr})
        return groups

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction MSE for ``images`` (float ``[B, 3, R, R]`` in [-1, 1]) of classes ``labels``.

        Noise, timesteps and the VAE's posterior sample come from ``generator`` (on the CPU)."""
        vae, device = self.components.vae, images.device
        with torch.no_grad():
            posterior = vae.encode(images.to(vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
            latents = (posterior.mean + posterior.std * eps).float() * vae.config.scaling_factor
        drawn = self.training_noise(latents, generator)
        text = self.text_encoder(self.caption_ids[labels.cpu()].to(device))[0]
        prediction = self.unet(drawn.noisy, drawn.timesteps, text).sample
        return F.mse_loss(prediction.float(), drawn.target.float())

    def drop_frozen_gradients(self) -> None:
        """Zero the embedding table's gradient outside the new tokens' rows. The caption's other words
        ("a photo of a", the metaclass, padding) get gradients too; clipping must measure only what learns."""
        if self.token_ids:
            grad = self.components.text_encoder.get_input_embeddings().weight.grad
            if grad is not None:
                grad[self.keep] = 0

    def restore_frozen_rows(self) -> None:
        """Put back every embedding row but the new tokens' (weight decay and Adam touch them all)."""
        if self.token_ids:
            table = self.components.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[self.keep] = self.frozen_rows[self.keep]

    def embeddings(self) -> dict:
        """``{token: learned vectors}`` in class order (empty for ``db``): ``[D]`` for one vector per
        token (the paper's and diffusers' file layout), ``[K, D]`` for K."""
        if not self.token_ids:
            return {}
        table = self.components.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        rows = table[self.token_ids].reshape(len(self.tokens), self.vectors_per_token, -1)
        return {t: (row[0] if self.vectors_per_token == 1 else row).clone() for t, row in zip(self.tokens, rows)}

    def trainable_state(self) -> dict:
        """The learned tensors, for checkpoints: LoRA (peft keys) and the new rows."""
        state = {f"embedding.{t}": row for t, row in self.embeddings().items()}
        if self.method != "ti":
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.components.unet)
            state.update({f"lora.{k}": v.detach().cpu() for k, v in lora.items()})
        return state

    def load_trainable_state(self, state: dict) -> None:
        table = self.components.text_encoder.get_input_embeddings().weight
        ids = torch.tensor(self.token_ids).reshape(len(self.tokens), self.vectors_per_token)
        with torch.no_grad():
            for token, rows in zip(self.tokens, ids):
                table[rows] = state[f"embedding.{token}"].reshape(len(rows), -1).to(table.dtype)
        if self.method != "ti":
            from peft.utils import set_peft_model_state_dict

            lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
            set_peft_model_state_dict(self.components.unet, lora)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a frozen diffusers model's weights. Through ``torch.nn.Module.to``: diffusers' own
    ``to`` warns about fp32-kept modules on every dtype cast, even when there are none."""
    torch.nn.Module.to(module, dtype=dtype)
