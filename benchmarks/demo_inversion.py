"""Do inverted conditions reconstruct their images? Diffusion Inversion on the demo world.

Every training image of the demo world is regenerated from its learned condition (no
perturbation, λ = 0) by text-to-image from noise, with classifier-free guidance whose
unconditional input is the mean of all conditions (the method's choice), at each
``--guidance`` scale. The demo probe (``demo_generator.py``'s species CNN, trained on fresh
renders) says which species each regeneration shows; reported: the share it calls the
image's own species, next to the probe's accuracy on the training images themselves and,
as the reference of what conditioning can do on this model at all, the share for the same
images generated from their species' description in words (``class_descriptions``: the
caption words the demo generator was pretrained on) with the empty prompt as guidance's
unconditional input.

Attribute probes (family, wing colour, head colour, tail colour, wing pattern; trained on the
same renders) say which of the species' parts each set of images shows. Beside the probes,
what the objective itself reached: the U-Net's noise-prediction error on
the training images at each of ``--error-timesteps`` (on draws fixed by one seed) under the
learned conditions, the conditions they started from, the species' words and the generic
prompt "a photo of a bird"; and the norms of the learned vectors next to the text encoder's
output states.

    onlinemix invert --config configs/invert/demo.yaml
    python benchmarks/demo_inversion.py --store runs/demo-inversion

Writes ``benchmarks/results/demo_inversion.json`` and a grid (``demo_inversion.png``: each
row an image, then its regenerations at each scale).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from demo_generator import attribute_probes, attributes_shown, predict, renders, train_probe
from report import RESULTS, machine, write_report
from safetensors.torch import load_file

from onlinemix.data import load_splits
from onlinemix.data.demo_world import SPECIES, class_descriptions
from onlinemix.generator.components import load_components
from onlinemix.generator.conditions import STORE, STORE_JSON
from onlinemix.generator.sampler import Sampler
from onlinemix.invert import encode_images, image_groups, starting_conditions
from onlinemix.training_noise import noise_prediction_error


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="runs/demo-inversion", help="the output folder of `onlinemix invert`")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--probe-train", type=int, default=150, help="probe training renders per species")
    p.add_argument("--error-timesteps", type=int, nargs="+", default=[50, 150, 250, 350, 450, 550, 650, 750, 850, 950],
                   help="timesteps of the noise-prediction error")
    p.add_argument("--out", default=os.path.join(RESULTS, "demo_inversion.json"))
    args = p.parse_args(argv)

    begun = time.perf_counter()
    with open(os.path.join(args.store, STORE_JSON)) as f:
        info = json.load(f)
    store = load_file(os.path.join(args.store, STORE))
    splits = load_splits(info["data"]["data_dir"], dataset=info["data"]["dataset"])
    species = torch.tensor([[s.name for s in SPECIES].index(name) for name in info["class_names"]])
    labels = species[store["labels"]]  # each image's species, in the probe's order
    probe_x, probe_y, _, _ = renders(args.probe_train, 0)
    probe = train_probe(probe_x, probe_y, epochs=15, seed=0)
    attributes = attribute_probes(probe_x, probe_y, seed=0)
    size = info["resolution"]
    originals = torch.stack([torch.nn.functional.interpolate(splits.train.load(i)[None].float(), size=(size, size),
                                                             mode="bilinear", antialias=True)[0]
                             for i in store["ids"].tolist()]) / 255
    runs = [dict(images="training images", probe_says_own_species=float((predict(probe, originals) == labels)
                                                                        .float().mean()),
                 attributes_shown=attributes_shown(attributes, originals, labels))]
    components = load_components(info["base_model"])
    sampler = Sampler(components, steps=args.steps)
    described = class_descriptions()
    words = [described[info["class_names"][int(y)]] for y in store["labels"]]
    objective = reconstruction_errors(components, info, store, splits.train, words, args.error_timesteps)
    print(objective, flush=True)
    for scale in args.guidance:
        generated = torch.cat([sampler.generate(words[k:k + 16], list(range(k, k + len(words[k:k + 16]))), height=size,
                                                width=size, guidance=[scale] * len(words[k:k + 16]))
                               for k in range(0, len(words), 16)])
        runs.append(dict(images=f"generated from the species' words, guidance {scale}", guidance=scale,
                         probe_says_own_species=float((predict(probe, generated) == labels).float().mean()),
                         attributes_shown=attributes_shown(attributes, generated, labels)))
        print(runs[-1], flush=True)
    regenerations = {}
    for scale in args.guidance:
        out = []
        for start in range(0, len(labels), 16):
            conditions = store["conditions"][start:start + 16]
            out.append(sampler.generate(conditions, list(range(start, start + len(conditions))), height=size,
                                        width=size, guidance=[scale] * len(conditions), unconditional=store["mean"]))
        regenerations[scale] = torch.cat(out)
        runs.append(dict(images=f"regenerated from c (lambda 0), guidance {scale}", guidance=scale,
                         probe_says_own_species=float((predict(probe, regenerations[scale]) == labels).float().mean()),
                         attributes_shown=attributes_shown(attributes, regenerations[scale], labels)))
        print(runs[-1], flush=True)
    grid = os.path.splitext(args.out)[0] + ".png"
    save_grid(originals, regenerations, grid)
    return write_report("demo_inversion", args.out, {**vars(args), "store": info}, runs, objective=objective,
                        machine=machine(), seconds=round(time.perf_counter() - begun, 1), grid=os.path.basename(grid))


def encoded(components, texts) -> torch.Tensor:
    """The text encoder's output states ``[N, 77, D]`` of ``texts``."""
    tokenizer = components.tokenizer
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0].float()


def reconstruction_errors(components, info: dict, store: dict, train, words: list, timesteps: list) -> dict:
    """The noise-prediction error per timestep under each conditioning, and the vectors' norms."""
    moments = encode_images(components, train, store["ids"].numpy(), info["resolution"])
    groups = image_groups(info["count"], info["group_size"])
    start = torch.cat([starting_conditions(components, len(members), init=info["init"], vectors=info["vectors"],
                                           group_size=info["group_size"], metaclass=info["metaclass"],
                                           seed=info["seed"], group=group) for group, members in enumerate(groups)])
    conditionings = {"learned conditions": store["conditions"], "their starting conditions": start,
                     "the species' words": encoded(components, words),
                     f"'a photo of a {info['metaclass']}'": encoded(components, [f"a photo of a {info['metaclass']}"])[0]}
    errors = {name: [round(float(e), 5) for e in noise_prediction_error(components, c, moments, timesteps, seed=0)]
              for name, c in conditionings.items()}
    norms = store["conditions"].norm(dim=-1)
    text_norms = conditionings["the species' words"].norm(dim=-1)
    return {"timesteps": list(timesteps), "noise_prediction_error": errors,
            "mean_error": {name: round(sum(e) / len(e), 5) for name, e in errors.items()},
            "learned_vector_norm": {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())},
            "text_encoder_state_norm": {"mean": float(text_norms.mean()), "min": float(text_norms.min()),
                                        "max": float(text_norms.max())}}


def save_grid(originals: torch.Tensor, regenerations: dict, path: str, rows: int = 12) -> None:
    from torchvision.utils import save_image

    step = max(1, len(originals) // rows)
    tiles = [tile for i in range(0, step * rows, step) for tile in (originals[i], *(r[i] for r in regenerations.values()))]
    save_image(torch.nn.functional.interpolate(torch.stack(tiles), scale_factor=2, mode="nearest"), path,
               nrow=1 + len(regenerations), padding=2, pad_value=1.0)


if __name__ == "__main__":
    main()
