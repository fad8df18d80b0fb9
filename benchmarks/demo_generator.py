"""Is the demo generator good enough for the method? Two measurements on fresh demo-world renders.

1. The VAE keeps the species: a small CNN trained on original renders classifies held-out
   originals and their VAE reconstructions (encode to the posterior mean, decode). Equal
   accuracy means the autoencoder keeps what tells the species apart.
2. SDEdit changes the bird and keeps the background: reference images are translated
   toward another species' full description (same environment word) at strengths
   0.5/0.7/0.9. Reported per strength: mean absolute pixel change inside and outside the
   known bird mask, and how often the probe CNN calls the result the source or the
   target species. Also writes a grid: reference, the three strengths, a render of the
   target species.
3. With ``--finetuned``: the same translations with the personalised prompts ("a photo of a
   <class_i> bird", Diff-Mix's), and how often the probe recognises the species in
   text-to-image samples of each token (Diff-Gen). Then which attributes the tokens carry:
   one probe per attribute (family, wing, head and tail colour, wing pattern), each
   trained on the same renders, reports how often a Diff-Gen sample or a translation
   shows the attribute value of the species it was asked for.

    python benchmarks/demo_generator.py                        # the shipped demo generator
    python benchmarks/demo_generator.py --model FOLDER         # e.g. a fresh `onlinemix pretrain-demo` output
    python benchmarks/demo_generator.py --finetuned runs/demo-ti-db

Writes ``benchmarks/results/demo_generator.json``, ``demo_generator_grid.png`` and, with
``--finetuned``, ``demo_generator_personalised.png``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from report import RESULTS, machine, write_report

from onlinemix.data.demo_world import ENVIRONMENTS, SPECIES, caption, render
from onlinemix.generator.adapters import attach_personalisation
from onlinemix.generator.components import load_components
from onlinemix.generator.sampler import Sampler

STRENGTHS = (0.5, 0.7, 0.9)
ATTRIBUTES = ("family", "wing", "head", "tail", "pattern")


def renders(per_class: int, seed: int):
    """``per_class`` renders of every species in random environments: images in [0, 1], labels,
    masks, environments."""
    rng = np.random.default_rng([seed, 31])
    images, labels, masks, environments = [], [], [], []
    for label, species in enumerate(SPECIES):
        for _ in range(per_class):
            environment = ENVIRONMENTS[int(rng.integers(2))]
            image, mask = render(species, environment, rng)
            images.append(np.asarray(image))
            masks.append(mask)
            labels.append(label)
            environments.append(environment)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor(labels), torch.from_numpy(np.stack(masks)), environments


def train_probe(images: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int,
                classes: int = len(SPECIES)) -> torch.nn.Module:
    """A three-layer CNN classifier of ``classes`` classes (the species by default)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(128, classes),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for k in range(0, len(order), 64):
            rows = order[k:k + 64]
            loss = F.cross_entropy(net(images[rows] * 2 - 1), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def predict(net, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(images[k:k + 256] * 2 - 1).argmax(1) for k in range(0, len(images), 256)])


def attribute_labels(species: torch.Tensor, attribute: str) -> tuple[torch.Tensor, int]:
    """Each species label's value of ``attribute`` as a class index, and the number of values."""
    values = sorted({getattr(s, attribute) for s in SPECIES})
    return torch.tensor([values.index(getattr(SPECIES[int(y)], attribute)) for y in species]), len(values)


def attribute_probes(images: torch.Tensor, species: torch.Tensor, *, seed: int) -> dict:
    """One probe per attribute, trained on the species probe's renders."""
    probes = {}
    for attribute in ATTRIBUTES:
        labels, count = attribute_labels(species, attribute)
        probes[attribute] = train_probe(images, labels, epochs=15, seed=seed, classes=count)
    return probes


def attributes_shown(probes: dict, images: torch.Tensor, species: torch.Tensor) -> dict:
    """Per attribute, the share of ``images`` whose probed value is that of the species asked for."""
    return {a: float((predict(net, images) == attribute_labels(species, a)[0]).float().mean())
            for a, net in probes.items()}


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    out = []
    for k in range(0, len(images), 64):
        x = images[k:k + 64].to(vae.dtype) * 2 - 1
        out.append((vae.decode(vae.encode(x).latent_dist.mean).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="diffusers folder of a demo generator ('demo': the shipped one)")
    p.add_argument("--finetuned", help="also measure this personalised generator (onlinemix finetune output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-train", type=int, default=150, help="probe training renders per species")
    p.add_argument("--probe-test", type=int, default=40, help="held-out renders per species")
    p.add_argument("--references", type=int, default=4, help="SDEdit references per species")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default=os.path.join(RESULTS, "demo_generator.json"))
    args = p.parse_args(argv)

    start = time.perf_counter()
    components = load_components(args.model)
    train_x, train_y, _, _ = renders(args.probe_train, args.seed)
    test_x, test_y, _, _ = renders(args.probe_test, args.seed + 1)
    probe = train_probe(train_x, train_y, epochs=15, seed=args.seed)
    recon = reconstruct(components.vae, test_x)
    vae = dict(
        probe_accuracy_originals=float((predict(probe, test_x) == test_y).float().mean()),
        probe_accuracy_reconstructions=float((predict(probe, recon) == test_y).float().mean()),
        psnr_db=float(10 * torch.log10(1 / (recon - test_x).pow(2).mean())),
    )
    print("VAE:", vae)

    refs, ref_y, masks, environments = renders(args.references, args.seed + 2)
    rng = np.random.default_rng(args.seed)
    # Each reference goes toward a random other species, in the reference's environment.
    targets = torch.tensor([int(rng.choice([c for c in range(len(SPECIES)) if c != y])) for y in ref_y.tolist()])
    sampler = Sampler(components, steps=args.steps, guidance=args.guidance)
    described = [caption(SPECIES[t], env) for t, env in zip(targets.tolist(), environments)]
    runs, translations = translation_runs(sampler, refs, masks, ref_y, targets, described, probe, "words")
    grid_path = os.path.splitext(args.out)[0] + "_grid.png"
    save_grid(refs, translations, targets, environments, grid_path, rows=min(len(SPECIES), len(refs)))
    extra = {}
    if args.finetuned:
        # The personalised generator: Diff-Mix's prompts, and Diff-Gen samples of every species.
        info = attach_personalisation(components, args.finetuned)
        sampler = Sampler(components, steps=args.steps, guidance=args.guidance)
        prompts = personalised_prompts(info)
        personal, personal_images = translation_runs(sampler, refs, masks, ref_y, targets,
                                                     [prompts[t] for t in targets.tolist()], probe, "personalised")
        runs += personal
        labels = torch.arange(len(SPECIES)).repeat_interleave(args.references)
        generated = torch.cat([sampler.generate([prompts[c] for c in labels[part].tolist()], seeds,
                                                height=64, width=64)
                               for part, seeds in batches(len(labels))])
        extra["text_to_image_probe_accuracy"] = float((predict(probe, generated) == labels).float().mean())
        print("personalised text-to-image, probe accuracy:", extra["text_to_image_probe_accuracy"])
        probes = attribute_probes(train_x, train_y, seed=args.seed)
        extra["attributes_shown"] = {
            "held_out_renders": attributes_shown(probes, test_x, test_y),  # each attribute probe's own accuracy
            "diff_gen": attributes_shown(probes, generated, labels),
            **{f"{kind}_translation_s{s}": attributes_shown(probes, images[s], targets)
               for kind, images in (("words", translations), ("personalised", personal_images)) for s in STRENGTHS},
        }
        print("attributes shown:", extra["attributes_shown"])
        save_grid(refs, personal_images, targets, environments, os.path.splitext(args.out)[0] + "_personalised.png",
                  rows=min(len(SPECIES), len(refs)))
    settings = dict(model=args.model, finetuned=args.finetuned, seed=args.seed,
                    probe_train_per_species=args.probe_train, probe_test_per_species=args.probe_test,
                    references=len(refs), steps=args.steps, guidance=args.guidance, sampler="DPM-Solver++ (2M)",
                    resolution=64)
    return write_report("demo_generator", args.out, settings, runs, machine=machine(), vae=vae, **extra,
                        seconds=round(time.perf_counter() - start, 1), grid=os.path.basename(grid_path))


def personalised_prompts(info: dict) -> list:
    """Diff-Mix's prompt for every species, in ``SPECIES`` order, from ``attach_personalisation``'s facts.
    The folder's tokens are in its data set's label order (sorted names), not ``SPECIES`` order."""
    token_of = dict(zip(info["class_names"], info["tokens"]))
    return [f"a photo of a {token_of[species.name]} bird" for species in SPECIES]


def batches(count: int, size: int = 16):
    """Slices of ``count`` samples, ``size`` at a time, with the samples' seeds (their indices)."""
    for start in range(0, count, size):
        seeds = list(range(start, min(start + size, count)))
        yield slice(start, start + size), seeds


def translation_runs(sampler, refs, masks, sources, targets, prompts, probe, kind: str):
    """SDEdit every reference toward its prompt at each strength; change inside / outside the bird
    mask and what the probe calls the result."""
    runs, translations = [], {}
    for strength in STRENGTHS:
        out = torch.cat([sampler.translate(refs[part], prompts[part], [strength] * len(seeds), seeds)
                         for part, seeds in batches(len(refs))])
        translations[strength] = out
        change = (out - refs).abs().mean(1)  # [N, H, W], per pixel over channels
        inside = (change * masks).sum((1, 2)) / masks.sum((1, 2))
        outside = (change * ~masks).sum((1, 2)) / (~masks).sum((1, 2))
        called = predict(probe, out)
        runs.append(dict(
            prompts=kind, strength=strength, change_inside_mask=float(inside.mean()),
            change_outside_mask=float(outside.mean()), inside_over_outside=float(inside.mean() / outside.mean()),
            probe_says_target=float((called == targets).float().mean()),
            probe_says_source=float((called == sources).float().mean()),
        ))
        print(runs[-1])
    return runs, translations


def save_grid(refs, translations, targets, environments, path: str, rows: int) -> None:
    """One row per reference (one per species): reference, s = 0.5/0.7/0.9, a render of the target."""
    from torchvision.utils import save_image

    step = len(refs) // rows
    tiles = []
    for r in range(rows):
        i = r * step
        example, _ = render(SPECIES[int(targets[i])], environments[i], np.random.default_rng([99, i]))
        tiles += [refs[i], *(translations[s][i] for s in STRENGTHS),
                  torch.from_numpy(np.asarray(example)).permute(2, 0, 1).float() / 255]
    grid = torch.stack(tiles)
    save_image(F.interpolate(grid, scale_factor=2, mode="nearest"), path, nrow=len(STRENGTHS) + 2, padding=2,
               pad_value=1.0)


if __name__ == "__main__":
    main()
