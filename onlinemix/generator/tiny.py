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


def _tiny_clip(tokenizer, *, seed: int, hidden: int, projection: Optional[int] = None):
    """A 2-layer CLIP text encoder over ``tokenizer``; with ``projection``, the pooled-projection variant
    (``CLIPTextModelWithProjection``) that SDXL's second and SD 3's encoders are."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tiny_t5(*, seed: int, width: int, length: int):
    """A 2-layer T5 encoder over ``tokenizer`` (byte-level: no sentencepiece model can be fetched), read up to
    ``length`` tokens as SD 3 and FLUX read theirs."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = length
    return tokenizer, T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width,
                                              num_layers=2, num_heads=2, pad_token_id=1, eos_token_id=1))


def _tiny_vae(*, seed: int, shift: Optional[float] = None, scale: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {} if shift is None else dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=64,
                         scaling_factor=scale, **extra)


def _finish(components: Components) -> Components:
    for module in components.modules:
        module.requires_grad_(False).eval()
    return components


def tiny_sdxl_components(seed: int = 0) -> Components:
    """A small SDXL-like model: two CLIP encoders (the second with a pooled projection), a U-Net with SDXL's
    ``text_time`` added conditioning, the 8x VAE. Random weights from ``seed``."""
    from diffusers import UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    text_encoder = _tiny_clip(tokenizer, seed=seed, hidden=32)
    text_encoder_2 = _tiny_clip(tokenizer, seed=seed + 1, hidden=32, projection=32)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # six size ids of 8 dimensions, the 32-d pooled text
    )
    vae = _tiny_vae(seed=seed + 3, scale=0.13025)
    components = Components(tokenizer, text_encoder, unet, vae, dpm_solver_scheduler(), tokenizer_2=tiny_tokenizer(),
                            text_encoder_2=text_encoder_2, family="sdxl",
                            pipeline_config=dict(force_zeros_for_empty_prompt=True))
    set_attention(components, "sdpa")
    return _finish(components)


def tiny_sd3_components(seed: int = 0, *, t5: bool = True) -> Components:
    """A small SD 3-like model: CLIP-L- and CLIP-G-like encoders with pooled projections, a T5-like encoder
    (or none: SD 3 then reads zeros in its place), a one-layer MM-DiT on 2x2 patches, the 8x VAE with a shift,
    flow-matching Euler with SD 3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer = tiny_tokenizer()
    text_encoder = _tiny_clip(tokenizer, seed=seed, hidden=32, projection=32)
    text_encoder_2 = _tiny_clip(tokenizer, seed=seed + 1, hidden=32, projection=32)
    tokenizer_3, text_encoder_3 = _tiny_t5(seed=seed + 2, width=64, length=256) if t5 else (None, None)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = _tiny_vae(seed=seed + 4, shift=0.0609, scale=1.5305)
    return _finish(Components(tokenizer, text_encoder, None, vae, FlowMatchEulerDiscreteScheduler(shift=3.0),
                              tokenizer_2=tiny_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_3=tokenizer_3,
                              text_encoder_3=text_encoder_3, transformer=transformer, family="sd3"))


def tiny_flux_components(seed: int = 0, *, guidance_embeds: bool = True) -> Components:
    """A small FLUX.1-like model: a CLIP-L-like encoder for the pooled vector, a T5-like one for the sequence,
    a one-double- and one-single-block transformer on 2x2-packed latents (``guidance_embeds``: dev's guidance
    embedding; False: schnell's none), the 8x VAE with a shift, FLUX's dynamically shifted flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = tiny_tokenizer()
    text_encoder = _tiny_clip(tokenizer, seed=seed, hidden=32)
    tokenizer_2, text_encoder_2 = _tiny_t5(seed=seed + 1, width=32, length=512)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    vae = _tiny_vae(seed=seed + 3, shift=0.1159, scale=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _finish(Components(tokenizer, text_encoder, None, vae, scheduler, tokenizer_2=tokenizer_2,
                              text_encoder_2=text_encoder_2, transformer=transformer, family="flux"))
