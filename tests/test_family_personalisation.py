"""Personalisation on SDXL, SD 3 and FLUX: the flow-matching objective pinned to diffusers' scheduler and
training scripts, each family's loss equal to the one its DreamBooth LoRA script computes, and the saved folder
read back (LoRA through the family pipeline's ``load_lora_weights``, tokens into each CLIP encoder)."""
from __future__ import annotations

import os

import diffusers
import pytest
import torch

from onlinemix.generator.adapters import EMBEDDINGS, LORA_WEIGHTS, attach_personalisation, embeddings_file
from onlinemix.generator.sampler import Sampler
from onlinemix.personalise import Personaliser
from onlinemix.training_noise import FlowTrainingNoise
from tests.test_families import BUILDERS

NAMES = ["tern", "gull", "dove"]
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("config", [SD3_SCHEDULER, FLUX_SCHEDULER], ids=["sd3", "flux"])
def test_flow_noising_is_the_schedulers_per_timestep_and_its_target_the_paths_velocity(config):
    """At every tenth training timestep: the noised latents equal ``FlowMatchEulerDiscreteScheduler.scale_noise``
    (SD 3's schedule shifted by 3, FLUX's unshifted until a resolution is known); the target is the velocity
    of the straight path from x0 to ε (a finite difference in σ), so one Euler step of it from σ lands on x0."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    noise_of = FlowTrainingNoise(config, sampling="uniform")
    latents = torch.randn(100, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = scheduler.timesteps[::10]
    drawn = noise_of(latents, torch.Generator().manual_seed(1), timesteps)
    sigmas = noise_of.sigmas(timesteps)
    plain = 1 - torch.arange(0, 1000, 10) / 1000  # the training grid's σ before any shift: 1, 0.99, ...
    shifted = plain if "use_dynamic_shifting" in config else 3 * plain / (1 + 2 * plain)
    torch.testing.assert_close(sigmas, shifted, rtol=0, atol=1e-6)
    for k, t in enumerate(timesteps):
        expected = scheduler.scale_noise(latents[k:k + 1], t[None], drawn.noise[k:k + 1])
        torch.testing.assert_close(drawn.noisy[k:k + 1], expected, rtol=0, atol=1e-6)
    h = 1e-3
    sigma = sigmas.reshape(-1, 1, 1, 1).double()
    path = lambda s: (1 - s) * latents.double() + s * drawn.noise.double()  # noqa: E731
    torch.testing.assert_close(drawn.target.double(), (path(sigma + h) - path(sigma)) / h, rtol=0, atol=1e-6)
    torch.testing.assert_close(drawn.noisy - sigma.float() * drawn.target, latents, rtol=0, atol=1e-5)


def test_flow_timesteps_are_drawn_as_the_families_scripts_draw_them():
    """SD 3: logit-normal(0, 1) on its shifted grid, so the median σ is shift·½ / (1 + (shift-1)·½) = 0.75.
    FLUX: uniform on its unshifted grid, so σ's quartiles are ¼, ½, ¾."""
    zeros = torch.zeros(20000, 1)
    quartiles = torch.tensor([0.25, 0.5, 0.75])
    sd3 = FlowTrainingNoise(SD3_SCHEDULER, sampling="logit_normal")
    sigmas = sd3.sigmas(sd3(zeros, torch.Generator().manual_seed(0)).timesteps)
    assert float(sigmas.median()) == pytest.approx(0.75, abs=0.01)
    middle = float(((sigmas > 0.6) & (sigmas < 0.9)).float().mean())
    flux = FlowTrainingNoise(FLUX_SCHEDULER, sampling="uniform")
    sigmas = flux.sigmas(flux(zeros, torch.Generator().manual_seed(0)).timesteps)
    torch.testing.assert_close(sigmas.quantile(quartiles), quartiles, rtol=0, atol=0.01)
    assert middle > 1.5 * float(((sigmas > 0.6) & (sigmas < 0.9)).float().mean()), "logit-normal favours the middle"
    with pytest.raises(ValueError, match="training timesteps"):
        flux.sigmas(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="sampling must be one of"):
        FlowTrainingNoise(FLUX_SCHEDULER, sampling="mode")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    return request.param


def batch(n=4, size=64):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return images, torch.tensor([c % len(NAMES) for c in range(n)])


def script_loss(components, personaliser, images, labels, seed):
    """The loss as diffusers' DreamBooth LoRA scripts for the family compute it, with the pipeline's own
    ``encode_prompt`` and latent packing, on the same draws: the VAE's posterior sample, the noise, then the
    timesteps (uniform integers on the DDPM schedule; ``compute_density_for_timestep_sampling`` indices on the
    flow one)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    family, generator = components.kind, torch.Generator().manual_seed(seed)
    pipe = components.pipeline(getattr(diffusers, family.pipelines[0]))
    captions = [personaliser.captions[int(c)] for c in labels]
    posterior = components.vae.encode(images).latent_dist
    x0 = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    shift = getattr(components.vae.config, "shift_factor", None) if family.flow else None
    x0 = ((x0 - shift) if shift is not None else x0) * components.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=generator)
    b, c, h, w = x0.shape
    size = h * pipe.vae_scale_factor
    if family.name == "sdxl":
        timesteps = torch.randint(0, 1000, (b,), generator=generator)
        ddpm = diffusers.DDPMScheduler.from_config(components.scheduler.config)
        states, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * b, dtype=states.dtype)
        prediction = components.unet(ddpm.add_noise(x0, noise, timesteps), timesteps, states,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return torch.nn.functional.mse_loss(prediction, noise)
    # The scripts' defaults: --weighting_scheme logit_normal (SD 3), none (FLUX).
    u = compute_density_for_timestep_sampling("logit_normal" if family.name == "sd3" else "none", b,
                                              logit_mean=0.0, logit_std=1.0, generator=generator)
    copy = diffusers.FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config)
    indices = (u * copy.config.num_train_timesteps).long()
    timesteps = copy.timesteps[indices]
    sigmas = copy.sigmas[indices].reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    if family.name == "sd3":
        states, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
        prediction = components.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                                             pooled_projections=pooled).sample
    else:
        states, pooled, text_ids = pipe.encode_prompt(captions, None, device="cpu")
        guidance = torch.full((b,), 3.5) if components.transformer.config.guidance_embeds else None
        packed = diffusers.FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", noisy.dtype)
        prediction = components.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                             pooled_projections=pooled, encoder_hidden_states=states,
                                             txt_ids=text_ids, img_ids=image_ids).sample
        prediction = diffusers.FluxPipeline._unpack_latents(prediction, size, size, pipe.vae_scale_factor)
    return torch.nn.functional.mse_loss(prediction, noise - x0)


def test_the_loss_is_the_familys_dreambooth_script_loss(family):
    components = BUILDERS[family](0)
    personaliser = Personaliser(components, NAMES, "bird", rank=4)
    images, labels = batch()
    with torch.no_grad():
        ours = personaliser.loss(images, labels, torch.Generator().manual_seed(7))
        expected = script_loss(components, personaliser, images, labels, 7)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)


def train(personaliser, steps=2):
    optimizer = torch.optim.AdamW(personaliser.parameters(), lr=5e-2, weight_decay=1e-2)
    images, labels = batch()
    for step in range(steps):
        loss = personaliser.loss(images, labels, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        personaliser.drop_frozen_gradients()
        optimizer.step()
        personaliser.restore_frozen_rows()


def test_the_saved_folder_loads_into_a_fresh_model_and_generates_what_the_trained_one_does(family, tmp_path):
    """Tokens learn in each of the family's CLIP encoders (SDXL and SD 3: two; FLUX: CLIP-L), every other row
    stays; the LoRA on the denoiser's attention learns; the folder, read back by the family pipeline's own
    ``load_lora_weights`` and our token loader, gives the trained model's images."""
    from onlinemix.generator.adapters import save_personalisation

    components = BUILDERS[family](0)
    encoders = components.kind.token_encoders
    tables = {e: getattr(components, e).get_input_embeddings().weight.detach().clone() for e in encoders}
    personaliser = Personaliser(components, NAMES, "bird", rank=4)
    train(personaliser)
    for encoder, before in tables.items():
        after = getattr(components, encoder).get_input_embeddings().weight
        assert torch.equal(after[: len(before)], before), f"{encoder}: old rows unchanged"
        rows = personaliser.token_rows[encoder]
        starts = personaliser.initial_vectors("ktn", 1, encoder=encoder)[0]
        assert all(not torch.allclose(after[i], starts) for i in rows.ids), f"{encoder}: every new token learned"
    lora = {n.split(".lora_B")[0]: bool(p.abs().sum() > 0) for n, p in components.denoiser.named_parameters()
            if "lora_B" in n}  # lora_B starts at zero: non-zero means it learned
    kinds = {name.removesuffix(".0").rsplit(".", 1)[-1] for name in lora}
    assert kinds == {"to_q", "to_k", "to_v", "to_out"} | ({"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
                                                          if family.startswith("flux") else set()) | (
        {"add_q_proj", "add_k_proj", "add_v_proj"} if family.startswith("sd3") else set())
    # SD 3's last block (the tiny model's only one) drops the text stream's output: it has no to_add_out and its
    # add_q_proj gets an all-zero gradient. Every other LoRA learns.
    silent = {name for name, moved in lora.items() if not moved}
    assert silent == ({"transformer_blocks.0.attn.add_q_proj"} if family.startswith("sd3") else set()), silent

    info = {"method": "ti_db", "class_names": NAMES, "metaclass": "bird"}
    save_personalisation(tmp_path, components, personaliser.embeddings(), info)
    assert (tmp_path / LORA_WEIGHTS).is_file() and (tmp_path / EMBEDDINGS).is_file()
    assert (tmp_path / embeddings_file("text_encoder_2")).is_file() == (len(encoders) == 2)

    prompts = [personaliser.captions[1], personaliser.captions[2]]
    images = (batch(2)[0] + 1) / 2
    components.denoiser.eval()
    expected = Sampler(components, steps=6, guidance=3.0).translate(images, prompts, [0.7, 0.9], [1, 2])
    fresh = BUILDERS[family](0)
    info = attach_personalisation(fresh, tmp_path)
    assert info["tokens"] == ["<class_0>", "<class_1>", "<class_2>"] and info["family"] == fresh.family
    loaded = Sampler(fresh, steps=6, guidance=3.0).translate(images, prompts, [0.7, 0.9], [1, 2])
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)
    base = Sampler(BUILDERS[family](0), steps=6, guidance=3.0).translate(images, ["a photo of a bird"] * 2,
                                                                          [0.7, 0.9], [1, 2])
    assert (loaded - base).abs().max() > 1e-3, "the personalisation changes the images"


def test_a_folder_of_another_family_is_refused(tmp_path):
    from onlinemix.generator.adapters import save_personalisation
    from onlinemix.generator.tiny import tiny_components

    sd = tiny_components(0)
    personaliser = Personaliser(sd, NAMES, "bird", method="ti")
    save_personalisation(tmp_path, sd, personaliser.embeddings(), {"method": "ti", "class_names": NAMES})
    with pytest.raises(ValueError, match="personalises a sd model, but the generator is a SDXL model"):
        attach_personalisation(BUILDERS["sdxl"](0), tmp_path)


def shared_memory():
    return {n for n in os.listdir("/dev/shm") if n.startswith("onlinemix-")}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux-dev"])
def test_finetune_then_train_with_diffmix_end_to_end(family, data_dir, tmp_path):
    """`onlinemix finetune` on a tiny model folder of the family, then `train.py --aug diffmix` with its live
    generator on the CPU: the run trains on synthetic samples, writes its metrics, and leaves nothing in
    /dev/shm."""
    import train
    from onlinemix.finetune import main as finetune

    model, tuned = tmp_path / "model", tmp_path / "tuned"
    BUILDERS[family](0).save(str(model))
    info = finetune(["--model", str(model), "--data-dir", data_dir, "--out", str(tuned), "--steps", "2",
                     "--resolution", "32", "--batch-size", "2", "--workers", "0", "--lr", "1e-2",
                     "--metaclass", "shape", "--preview-steps", "2"])["info"]
    assert info["family"] == family.split("-")[0] and (tuned / "preview.png").is_file()
    before = shared_memory()
    result = train.main(["--data-dir", data_dir, "--output", str(tmp_path / "runs"), "--name", "run", "--model",
                         "resnet18", "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                         "--device", "cpu", "--aug", "diffmix", "--p", "0.5", "--gen-device", "cpu", "--gen-model",
                         str(model), "--gen-finetuned", str(tuned), "--gen-steps", "4", "--gen-resolution", "32",
                         "--gen-batch-size", "4", "--gen-dtype", "float32", "--guidance", "3", "--ring-slots", "16"])
    assert result["augmentation"]["replaced"] > 0 and result["generator"]["restarts"] == 0
    assert (tmp_path / "runs" / "run" / "metrics.jsonl").is_file()
    assert shared_memory() <= before, "the ring and its segments are gone"


@pytest.mark.slow
def test_two_processes_personalise_a_flow_model(data_dir, tmp_path):
    """torchrun on the CPU (gloo), SD 3: one data-parallel run over the transformer's LoRA and both CLIP
    encoders' tokens. The last block's text-query LoRA gets an all-zero gradient (the block drops the text
    output), which DDP accepts without find_unused_parameters."""
    import subprocess
    import sys

    BUILDERS["sd3"](0).save(str(tmp_path / "sd3"))
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "onlinemix.cli", "finetune", "--model", str(tmp_path / "sd3"), "--data-dir", data_dir,
               "--out", str(tmp_path / "ddp"), "--steps", "2", "--batch-size", "2", "--resolution", "32",
               "--workers", "0", "--preview-steps", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / embeddings_file("text_encoder_2")).is_file()
