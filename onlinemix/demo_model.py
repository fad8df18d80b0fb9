"""The demo generator: a tiny Stable-Diffusion-like model pretrained by the project on CPU.

Stable Diffusion cannot be downloaded here, so the demo ships its own text-to-image
model, trained by ``pretrain`` on the demo world's *generic* corpus: random birds with
captions that describe shape, colours, pattern and background in words and never a
species. Like Stable Diffusion on CUB, it knows the domain loosely and needs
personalisation (``onlinemix finetune``) to draw a given species.

Architecture, all diffusers / transformers classes, so that ``load_components`` reads
it like Stable Diffusion 1.5:

- a CLIP tokenizer whose vocabulary is the 512 byte-level characters plus BPE merges
  learned on the corpus captions (every corpus word is one token);
- a 3-layer, 64-wide CLIP text encoder;
- an ``AutoencoderKL`` with **4x** downsampling (16x16x4 latents at 64 px): an 8x VAE
  at 64 px blurs away wing patterns and head colours, the very attributes that tell
  the demo's species apart (``../shared/notes/demo-findings.md``);
- a conditional U-Net on the 16x16 latents with cross-attention at 8x8 and 4x4.

Run ``onlinemix pretrain-demo --out FOLDER`` to reproduce the shipped weights
(``onlinemix.generator.components.DEMO_MODEL``, saved in float16 to keep the package small).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data.demo_world import generic_corpus
from .generator.components import Components, dpm_solver_scheduler, set_attention
from .generator.tiny import tiny_tokenizer
from .training_noise import TrainingNoise

TEXT_WIDTH = 64


def corpus_tokenizer(captions):
    """A CLIP tokenizer: byte-level characters plus BPE merges learned on ``captions``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=4096, end_of_word_suffix="</w>",
                                                          show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in
              json.loads(bpe.to_str())["model"]["merges"]]
    vocab = dict(tiny_tokenizer().get_vocab())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def demo_architecture(tokenizer, seed: int = 0) -> Components:
    """The demo generator's modules with random weights from ``seed`` (see the module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=64,
    )
    components = Components(tokenizer, text_encoder, unet, vae, dpm_solver_scheduler())
    set_attention(components, "sdpa")
    return components


def render_corpus(count: int, seed: int):
    """The generic corpus as a uint8 tensor ``[count, 3, 64, 64]`` and its captions."""

    images, captions = [], []
    for image, text in generic_corpus(count, seed=seed):
        images.append(np.asarray(image))
        captions.append(text)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def _schedule(optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _bar(steps: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)


def train_vae(vae, images: torch.Tensor, *, steps: int, batch_size: int, crop: int, lr: float, seed: int,
              progress: bool = True) -> list:
    """Train the autoencoder on random ``crop`` px crops (it is convolutional: 4x fewer pixels per
    step than full images, same weights) with L1 + MSE reconstruction and a tiny KL term."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _schedule(optimizer, steps, warmup=steps // 20)
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    losses = []
    bar = _bar(steps, "pretrain VAE", progress)
    for _ in bar:
        rows = torch.randint(0, len(images), (batch_size,), generator=g)
        i, j = torch.randint(0, size - crop + 1, (2,), generator=g).tolist()
        x = _to_unit(images[rows, :, i:i + crop, j:j + crop])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator=g)).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_corpus(vae, images: torch.Tensor, batch_size: int = 256):
    """Posterior means and standard deviations of every image."""
    means, stds = [], []
    for k in range(0, len(images), batch_size):
        posterior = vae.encode(_to_unit(images[k:k + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(components: Components, means: torch.Tensor, stds: torch.Tensor, captions: list, *, steps: int,
                   batch_size: int, lr: float, seed: int, caption_dropout: float = 0.1,
                   progress: bool = True) -> list:
    """Train U-Net and text encoder jointly to predict the noise (Stable Diffusion's objective and
    noise schedule) on the corpus latents, with random horizontal flips and dropped captions
    (the empty prompt, which classifier-free guidance uses as the unconditional one)."""
    c = components
    training_noise = TrainingNoise(c.scheduler.config)
    modules = (c.unet, c.text_encoder)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = _schedule(optimizer, steps, warmup=steps // 20)
    ids = c.tokenizer(captions + [""], padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    empty = len(captions)
    scale = c.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = _bar(steps, "pretrain U-Net + text encoder", progress)
    for _ in bar:
        rows = torch.randint(0, len(means), (batch_size,), generator=g)
        latents = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=g)) * scale
        flip = torch.rand(batch_size, generator=g) < 0.5
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
        text = torch.where(torch.rand(batch_size, generator=g) < caption_dropout, empty, rows)
        drawn = training_noise(latents, g)
        states = c.text_encoder(ids[text])[0]
        loss = F.mse_loss(c.unet(drawn.noisy, drawn.timesteps, encoder_hidden_states=states).sample, drawn.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    for m in modules:
        m.eval().requires_grad_(False)
    return losses


def pretrain(out: str, *, seed: int = 0, corpus: int = 20000, vae_steps: int = 2000, unet_steps: int = 2400,
             batch_size: int = 64, progress: bool = True) -> dict:
    """Build and pretrain the demo generator; save it to ``out`` (float16 diffusers folder).

    Returns:
        What was done and measured: settings, losses, minutes per stage.
    """
    from diffusers.utils import logging as diffusers_logging

    start = time.perf_counter()
    images, captions = render_corpus(corpus, seed)
    components = demo_architecture(corpus_tokenizer(captions), seed)
    rendered = time.perf_counter()
    vae_losses = train_vae(components.vae, images, steps=vae_steps, batch_size=batch_size, crop=32, lr=1e-3,
                           seed=seed, progress=progress)
    means, stds = encode_corpus(components.vae, images)
    # Stable Diffusion's convention: scaled latents have unit variance, so the noise schedule fits them.
    components.vae.register_to_config(scaling_factor=float(1 / means.std()))
    vae_done = time.perf_counter()
    unet_losses = train_denoiser(components, means, stds, captions, steps=unet_steps, batch_size=batch_size,
                                 lr=1e-3, seed=seed, progress=progress)
    done = time.perf_counter()
    # Half precision keeps the package small; diffusers warns on any dtype cast, needlessly here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        components.to(dtype=torch.float16).save(out)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    info = dict(
        seed=seed, corpus=corpus, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
        scaling_factor=components.vae.config.scaling_factor, vocabulary=len(components.tokenizer),
        parameters={name: sum(p.numel() for p in getattr(components, name).parameters())
                    for name in ("text_encoder", "unet", "vae")},
        vae_loss_last_100=float(np.mean(vae_losses[-100:])), unet_loss_first_100=float(np.mean(unet_losses[:100])),
        unet_loss_last_100=float(np.mean(unet_losses[-100:])),
        minutes=dict(corpus=(rendered - start) / 60, vae=(vae_done - rendered) / 60, unet=(done - vae_done) / 60),
        threads=torch.get_num_threads(), torch=torch.__version__,
    )
    with open(os.path.join(out, "pretraining.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter

    p = argparse.ArgumentParser(prog="onlinemix pretrain-demo", formatter_class=HelpFormatter, description=(
        "Pretrain the demo generator on the demo world's generic captioned corpus (CPU is enough)."))
    p.add_argument("--out", required=True, help="output folder (a diffusers Stable Diffusion folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the training")
    p.add_argument("--corpus", type=int, default=20000, help="generic images rendered")
    p.add_argument("--vae-steps", type=int, default=2000, help="training steps of the VAE")
    p.add_argument("--unet-steps", type=int, default=2400, help="training steps of the U-Net")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if os.path.exists(os.path.join(args.out, "model_index.json")):
        raise FileExistsError(f"{args.out!r} already holds a model; pick another --out or remove it.")
    if min(args.corpus, args.vae_steps, args.unet_steps, args.batch_size) < 1:
        raise ValueError("--corpus, --vae-steps, --unet-steps and --batch-size must be >= 1.")
    info = pretrain(args.out, seed=args.seed, corpus=args.corpus, vae_steps=args.vae_steps,
                    unet_steps=args.unet_steps, batch_size=args.batch_size)
    print(json.dumps(info["minutes"]), f"saved to {args.out}")
    return info
