"""SDXL base's, SD 3 medium's and FLUX.1's architectures with random weights, for GPU benchmarks: each
denoiser and VAE at its real size (the same FLOPs), nothing to download.

The text encoders are real-size CLIPs, but T5 is a one-layer stand-in of T5-XXL's width. The sampler encodes
each prompt once and caches it, so the encoders' size does not enter images/s. SD 3 runs without T5, a mode
the real model has too (it then reads zeros in T5's place). Users load the real models with
``onlinemix.generator.components.load_components``.
"""
from __future__ import annotations

import torch

from onlinemix.generator.components import Components, dpm_solver_scheduler
from onlinemix.generator.tiny import tiny_tokenizer


def clip(*, hidden: int, layers: int, heads: int, projection: int = 0, act: str = "quick_gelu"):
    """A CLIP text encoder of the real width and depth over a CLIP-sized vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def vae(*, latent_channels: int, scale: float, shift=None):
    from diffusers import AutoencoderKL

    extra = {} if shift is None else dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=scale, **extra)


def sdxl_architecture() -> Components:
    """SDXL base: a 2.6 B-parameter U-Net, CLIP-L and OpenCLIP-bigG, the SDXL VAE."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return Components(tiny_tokenizer(size=49408), clip(hidden=768, layers=12, heads=12), unet,
                      vae(latent_channels=4, scale=0.13025), None, tokenizer_2=tiny_tokenizer(size=49408),
                      text_encoder_2=clip(hidden=1280, layers=32, heads=20, projection=1280, act="gelu"),
                      family="sdxl", pipeline_config=dict(force_zeros_for_empty_prompt=True))


def sd3_architecture() -> Components:
    """SD 3 medium: a 2 B-parameter MM-DiT (24 blocks of 24 heads), CLIP-L and CLIP-G, no T5, the 16-channel VAE."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    return Components(tiny_tokenizer(size=49408), clip(hidden=768, layers=12, heads=12, projection=768), None,
                      vae(latent_channels=16, scale=1.5305, shift=0.0609), None,
                      tokenizer_2=tiny_tokenizer(size=49408),
                      text_encoder_2=clip(hidden=1280, layers=32, heads=20, projection=1280, act="gelu"),
                      transformer=transformer, family="sd3")


def flux_architecture(*, guidance_embeds: bool = True) -> Components:
    """FLUX.1 dev (``guidance_embeds``) or schnell: a 12 B-parameter transformer (19 double, 38 single blocks),
    CLIP-L, a one-layer T5 stand-in of T5-XXL's width, the 16-channel VAE."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=guidance_embeds,
        axes_dims_rope=(16, 56, 56),
    )
    tokenizer_2 = tiny_tokenizer()
    tokenizer_2.model_max_length = 512
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, pad_token_id=1, eos_token_id=1))
    return Components(tiny_tokenizer(size=49408), clip(hidden=768, layers=12, heads=12), None,
                      vae(latent_channels=16, scale=0.3611, shift=0.1159), None, tokenizer_2=tokenizer_2,
                      text_encoder_2=t5, transformer=transformer, family="flux")


NATIVE = {"sdxl": sdxl_architecture, "sd3": sd3_architecture, "flux-dev": flux_architecture,
          "flux-schnell": lambda: flux_architecture(guidance_embeds=False)}


def native_scheduler(family: str):
    """The family's sampling scheduler, on the host in float32 (diffusers' schedulers compute their tables
    with NumPy): DPM-Solver++ on SDXL's schedule, SD 3's flow-matching Euler with shift 3, FLUX's shifted by
    resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sdxl":
        return dpm_solver_scheduler()
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def build_native(name: str, *, device: str, dtype: torch.dtype) -> Components:
    """``NATIVE[name]`` built directly on ``device`` in ``dtype`` (a 12 B model never passes through host memory),
    frozen, in eval mode, with SDPA attention."""
    from onlinemix.generator.components import set_attention

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            components = NATIVE[name]()
    finally:
        torch.set_default_dtype(previous)
    components.scheduler = native_scheduler(components.family)
    set_attention(components, "sdpa")
    for module in components.modules:
        module.requires_grad_(False).eval()
    return components
