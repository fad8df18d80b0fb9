"""Tiny Stable-Diffusion-like generators built in code, for tests and smoke runs without downloads:
a byte-level CLIP tokenizer and small text encoder, U-Net and 8x VAE of the same architecture family."""
from __future__ import annotations

from typing import Optional

import torch

from .components import Components, dpm_solver_scheduler, set_attention

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
