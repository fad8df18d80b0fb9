"""DeepCache-style feature reuse for a diffusers ``UNet2DConditionModel``.

DeepCache (Ma et al., CVPR 2024) observes that a U-Net's deep features change little
between neighbouring denoising steps. ``DeepCacheUNet`` splits the U-Net at its
shallowest branch: a *full* call runs the whole U-Net and also returns the deep
features that enter the last layer of the last up block; a *shallow* call runs only
``conv_in``, that last layer (fed the cached deep features and the fresh ``conv_in``
skip) and the output head. That is DeepCache's ``cache_branch_id=0``, its fastest
branch: on a shallow call everything between ``conv_in`` and the last layer is skipped.
"""
from __future__ import annotations

import torch


class DeepCacheUNet:
    """Full and shallow calls of one U-Net.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout).

    Raises:
        ValueError: If the U-Net's last up-block layer does not take ``conv_in``'s output as
            its skip, so no shallow branch exists.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        last = unet.up_blocks[-1]
        if getattr(last, "upsamplers", None) is not None or not hasattr(unet, "conv_in"):
            raise ValueError("DeepCache needs a U-Net whose last up block ends at full resolution after conv_in's "
                             f"skip (Stable Diffusion's layout); {type(unet).__name__} has another layout.")
        config = unet.config
        if (config.class_embed_type or config.addition_embed_type or config.center_input_sample
                or getattr(unet, "encoder_hid_proj", None) is not None):
            raise ValueError("DeepCache's shallow call supports Stable Diffusion's U-Net only: no class, addition or "
                             "encoder-projection embeddings and no centred input.")
        if any(getattr(block, attr, None) for block in unet.up_blocks for attr in ("s1", "s2", "b1", "b2")):
            raise ValueError("DeepCache and FreeU do not mix: call unet.disable_freeu() first.")
        self.resnet = last.resnets[-1]
        self.attention = last.attentions[-1] if getattr(last, "attentions", None) else None

    def full(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor):
        """The U-Net's own forward; returns ``(noise prediction, deep features)``.

        The deep features are the input of the last up-block layer without ``conv_in``'s skip.
        """
        captured = []

        def capture(module, args):
            captured.append(args[0])

        hook = self.resnet.register_forward_pre_hook(capture)
        try:
            noise = self.unet(latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]
        finally:
            hook.remove()
        skip_channels = self.unet.conv_in.out_channels
        return noise, captured[-1][:, :-skip_channels]

    def shallow(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                deep: torch.Tensor) -> torch.Tensor:
        """The noise prediction from fresh shallow features and cached ``deep`` ones."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timesteps), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = self.resnet(torch.cat([deep, unet.conv_in(latents)], dim=1), emb)
        if self.attention is not None:
            hidden = self.attention(hidden, encoder_hidden_states=states, return_dict=False)[0]
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)
