"""Personalisation, Diff-Mix's first stage: textual inversion + LoRA ("TI+DB"), TI-only, DB-only.

``Personaliser`` turns loaded ``Components`` of any model family (``generator.families``) into a trainable
personalisation: one new token ``<class_i>`` per class (``ti_db``, ``ti``) of K learned vectors (K tokenizer
words, ``token_words``) in each of the family's CLIP text encoders (``Family.token_encoders``: SDXL's and
SD 3's two, FLUX's CLIP-L), initialised from an existing word (the paper's rare "ktn") or from a description
of each class, and LoRA on the denoiser's attention projections (``ti_db``, ``db``; ``Family.lora_targets``).
Tokens and LoRA learn at learning rates of their own. Its ``loss`` is the family's own objective
(``training_noise.training_noise_of``: noise prediction on the DDPM schedule for the U-Nets, the flow velocity
for SD 3 and FLUX) on captions "a photo of a <class_i> {metaclass}" (``db``: the class name instead of a
token), the very prompts the generator later uses. ``onlinemix finetune`` (``onlinemix.finetune``) trains it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .generator.adapters import add_tokens, token_words, tokenizer_of
from .generator.components import Components
from .plan import PERSONALISATIONS, get_strategy, placeholder_token
from .training_noise import training_noise_of

# The authors initialised every token from CLIP's rare sub-word "ktn" (id 42170).
INITIALIZER = "ktn"


def class_tokens(class_names: Sequence[str], method: str) -> list:
    """What stands for each class in captions: ``<class_i>``, or the class name for ``db``."""
    if method == "db":
        return list(class_names)
    return [placeholder_token(i) for i in range(len(class_names))]


class TokenRows:
    """The learned tokens' rows of one text encoder's embedding table, the only rows of it that learn.

    Args:
        encoder: The text encoder, its table already holding the new rows (``add_tokens``).
        ids: The new rows, in class order, K per class.
    """

    def __init__(self, encoder: torch.nn.Module, ids: Sequence[int]):
        self.encoder, self.ids = encoder, list(ids)
        table = self.table
        table.requires_grad_(True)
        # Every other row is put back after each step: only the new tokens learn.
        self.frozen = table.detach().clone()
        self.keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
        self.keep[self.ids] = False

    @property
    def table(self) -> torch.nn.Parameter:
        return self.encoder.get_input_embeddings().weight

    def drop_frozen_gradients(self) -> None:
        if self.table.grad is not None:
            self.table.grad[self.keep] = 0

    def restore_frozen_rows(self) -> None:
        with torch.no_grad():
            self.table[self.keep] = self.frozen[self.keep]

    def rows(self) -> torch.Tensor:
        """float32 ``[len(ids), D]`` on the CPU."""
        return self.table.detach()[self.ids].float().cpu()

    def load(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.table[self.ids] = rows.reshape(len(self.ids), -1).to(self.table.device, self.table.dtype)


class Forwarding:
    """A module's stand-in whose calls go through ``wrapper`` (a DDP copy: its gradients are synchronised)
    while every attribute (``config``, ``dtype``) is read from ``module``, so the family's code runs on it
    unchanged."""

    def __init__(self, wrapper, module: torch.nn.Module):
        self.wrapper, self.module = wrapper, module

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


class Personaliser:
    """The trainable part of a personalised generator and its training loss.

    Args:
        components: A loaded base model (``load_components``) of any family; it is modified in place
            (tokens added to its CLIP tokenizers and text encoders, a LoRA adapter on its denoiser).
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
        self.family = components.kind
        self.class_names, self.metaclass = list(class_names), metaclass
        self.vectors_per_token = vectors_per_token
        self.tokens = class_tokens(class_names, method)
        # What stands for each class in a caption: its token's K words, or its name (db).
        self.prompt_tokens = list(self.tokens)
        for module in components.modules:
            module.requires_grad_(False)
        self.token_rows: dict[str, TokenRows] = {}
        if method != "db":
            for encoder in self.family.token_encoders:
                starts = {token: self.initial_vectors(descriptions.get(name, initializer), vectors_per_token,
                                                      encoder=encoder)
                          for token, name in zip(self.tokens, self.class_names)}
                self.prompt_tokens = list(add_tokens(components, starts, encoder=encoder).values())
                words = [w for t in self.tokens for w in token_words(t, vectors_per_token)]
                ids = tokenizer_of(components, encoder).convert_tokens_to_ids(words)
                self.token_rows[encoder] = TokenRows(getattr(components, encoder), ids)
        if method != "ti":
            from peft import LoraConfig

            components.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                       target_modules=list(self.family.lora_targets)))
        prompt = get_strategy("diffmix")
        self.captions = [prompt.prompt_for(c, self.class_names, metaclass, self.prompt_tokens)
                         for c in range(len(class_names))]
        self.training_noise = training_noise_of(components)
        # What `loss` runs; `wrap` swaps in wrapped (e.g. DDP) versions of the modules that learn.
        self.view = components

    @property
    def learning(self) -> list[str]:
        """The names of the components that learn: the denoiser (LoRA) and the text encoders (tokens)."""
        return ([self.components.denoiser_name] if self.method != "ti" else []) + list(self.token_rows)

    def wrap(self, prepare) -> None:
        """Run the loss through ``prepare(module)`` (``accelerator.prepare``) of each module that learns, and
        only those: DDP refuses a module without trainable parameters."""
        wrapped = {name: Forwarding(prepare(getattr(self.components, name)), getattr(self.components, name))
                   for name in self.learning}
        self.view = dataclasses.replace(self.components, **wrapped)

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
        for encoder in components.kind.token_encoders if method != "db" else ():
            vocab = tokenizer_of(components, encoder).get_vocab()
            clash = [placeholder_token(i) for i in range(len(class_names)) if placeholder_token(i) in vocab]
            if clash:
                raise ValueError(f"The tokenizer already holds {clash[:3]}: fine-tune from the base model, not from "
                                 "an already personalised one.")

    def initial_vectors(self, words: str, count: int, *, encoder: str = "text_encoder") -> torch.Tensor:
        """``[count, D]``: the sub-word embeddings of ``words`` in ``encoder`` split into ``count`` consecutive
        runs (each sub-word reused in turn when there are fewer), each run averaged."""
        ids = tokenizer_of(self.components, encoder)(words, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"{words!r} encodes to no token; pass existing words to --initializer or "
                             "--class-descriptions.")
        table = getattr(self.components, encoder).get_input_embeddings().weight.detach().float()
        if len(ids) < count:
            return table[[ids[k % len(ids)] for k in range(count)]]
        return torch.stack([table[list(run)].mean(0) for run in np.array_split(ids, count)])

    def parameters(self) -> list:
        """The trainable tensors: the LoRA weights (db, ti_db) and the embedding tables (ti, ti_db)."""
        return [p for group in self.parameter_groups(1.0, 1.0) for p in group["params"]]

    def parameter_groups(self, lr: float, token_lr: float) -> list:
        """Optimizer groups: LoRA at ``lr``, the embedding tables (only the new rows learn) at ``token_lr``."""
        groups = []
        lora = [p for p in self.components.denoiser.parameters() if p.requires_grad]
        if lora:
            groups.append({"params": lora, "lr": lr})
        if self.token_rows:
            groups.append({"params": [rows.table for rows in self.token_rows.values()], "lr": token_lr})
        return groups

    def conditioning(self, labels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The family's conditioning (states, pooled or None) of each label's caption, through the learning
        modules (``wrap``)."""
        return self.family.encode(self.view, [self.captions[int(c)] for c in labels])

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The family's training objective for ``images`` (float ``[B, 3, R, R]`` in [-1, 1]) of classes ``labels``.

        Noise, timesteps and the VAE's posterior sample come from ``generator`` (on the CPU). SDXL's size
        conditioning is the sampler's, ``(R, R, 0, 0, R, R)``: images are stretched to R, never cropped.
        """
        vae, device = self.components.vae, images.device
        with torch.no_grad():
            posterior = vae.encode(images.to(vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
            latents = self.family.to_latents(self.components, (posterior.mean + posterior.std * eps).float())
        drawn = self.training_noise(latents, generator)
        states, pooled = self.conditioning(labels)
        guidance = torch.full((len(latents),), self.family.training_guidance, device=device)
        prediction = self.family.predict(self.view, drawn.noisy, drawn.timesteps, states, pooled, guidance)
        return F.mse_loss(prediction.float(), drawn.target.float())

    def drop_frozen_gradients(self) -> None:
        """Zero the embedding tables' gradients outside the new tokens' rows. The caption's other words
        ("a photo of a", the metaclass, padding) get gradients too; clipping must measure only what learns."""
        for rows in self.token_rows.values():
            rows.drop_frozen_gradients()

    def restore_frozen_rows(self) -> None:
        """Put back every embedding row but the new tokens' (weight decay and Adam touch them all)."""
        for rows in self.token_rows.values():
            rows.restore_frozen_rows()

    def embeddings(self) -> dict:
        """``{encoder: {token: learned vectors}}`` in class order (empty for ``db``): ``[D]`` for one vector per
        token (the paper's and diffusers' file layout), ``[K, D]`` for K."""
        learned = {}
        for encoder, rows in self.token_rows.items():
            table = rows.rows().reshape(len(self.tokens), self.vectors_per_token, -1)
            learned[encoder] = {t: (row[0] if self.vectors_per_token == 1 else row).clone()
                                for t, row in zip(self.tokens, table)}
        return learned

    def trainable_state(self) -> dict:
        """The learned tensors, for checkpoints: LoRA (peft keys) and the new rows of each text encoder."""
        state = {f"{state_prefix(encoder)}.{t}": row for encoder, rows in self.embeddings().items()
                 for t, row in rows.items()}
        if self.method != "ti":
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.components.denoiser)
            state.update({f"lora.{k}": v.detach().cpu() for k, v in lora.items()})
        return state

    def load_trainable_state(self, state: dict) -> None:
        for encoder, rows in self.token_rows.items():
            rows.load(torch.stack([state[f"{state_prefix(encoder)}.{t}"].reshape(self.vectors_per_token, -1)
                                   for t in self.tokens]))
        if self.method != "ti":
            from peft.utils import set_peft_model_state_dict

            lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
            set_peft_model_state_dict(self.components.denoiser, lora)


def state_prefix(encoder: str) -> str:
    """A checkpoint's key prefix for the tokens of ``encoder``: ``embedding``, ``embedding_2`` (``text_encoder_2``)."""
    return "embedding" + encoder[len("text_encoder"):]


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a frozen diffusers model's weights. Through ``torch.nn.Module.to``: diffusers' own
    ``to`` warns about fp32-kept modules on every dtype cast, even when there are none."""
    torch.nn.Module.to(module, dtype=dtype)
