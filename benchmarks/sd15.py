"""Stable Diffusion 1.5's architecture with random weights, for benchmarks: the same FLOPs as the real
model, nothing to download. Users load the real model with ``onlinemix.generator.components.load_components``."""
import torch

from onlinemix.generator.components import Components, dpm_solver_scheduler, set_attention
from onlinemix.generator.tiny import tiny_tokenizer


def sd15_architecture(seed: int = 0) -> Components:
    """Stable Diffusion 1.5's architecture (860 M-parameter U-Net, its VAE and a CLIP ViT-L/14
    text encoder) with random weights: the same FLOPs as the real model, for benchmarks only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(size=49408)  # CLIP's vocabulary size: the embedding table fine-tuning updates
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    components = Components(tokenizer, text_encoder, unet, vae, dpm_solver_scheduler())
    set_attention(components, "sdpa")
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval()
    return components
