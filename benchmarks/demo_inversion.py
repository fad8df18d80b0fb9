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

    onlinemix invert --model demo --dataset demo --data-dir data/demo --metaclass bird \\
        --resolution 64 --steps 800 --batch-size 32 --lr 1e-2 --out runs/demo-inversion
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
from demo_generator import predict, renders, train_probe
from report import RESULTS, machine, write_report
from safetensors.torch import load_file

from onlinemix.data import load_splits
from onlinemix.data.demo_world import SPECIES, class_descriptions
from onlinemix.generator.components import load_components
from onlinemix.generator.sampler import Sampler
from onlinemix.generator.conditions import STORE, STORE_JSON


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="runs/demo-inversion", help="the output folder of `onlinemix invert`")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--probe-train", type=int, default=150, help="probe training renders per species")
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
    size = info["resolution"]
    originals = torch.stack([torch.nn.functional.interpolate(splits.train.load(i)[None].float(), size=(size, size),
                                                             mode="bilinear", antialias=True)[0]
                             for i in store["ids"].tolist()]) / 255
    runs = [dict(images="training images", probe_says_own_species=float((predict(probe, originals) == labels)
                                                                        .float().mean()))]
    sampler = Sampler(load_components(info["base_model"]), steps=args.steps)
    described = class_descriptions()
    words = [described[info["class_names"][int(y)]] for y in store["labels"]]
    for scale in args.guidance:
        generated = torch.cat([sampler.generate(words[k:k + 16], list(range(k, k + len(words[k:k + 16]))), height=size,
                                                width=size, guidance=[scale] * len(words[k:k + 16]))
                               for k in range(0, len(words), 16)])
        runs.append(dict(images=f"generated from the species' words, guidance {scale}", guidance=scale,
                         probe_says_own_species=float((predict(probe, generated) == labels).float().mean())))
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
                         probe_says_own_species=float((predict(probe, regenerations[scale]) == labels).float().mean())))
        print(runs[-1], flush=True)
    grid = os.path.splitext(args.out)[0] + ".png"
    save_grid(originals, regenerations, grid)
    return write_report("demo_inversion", args.out, {**vars(args), "store": info}, runs, machine=machine(),
                        seconds=round(time.perf_counter() - begun, 1), grid=os.path.basename(grid))


def save_grid(originals: torch.Tensor, regenerations: dict, path: str, rows: int = 12) -> None:
    from torchvision.utils import save_image

    step = max(1, len(originals) // rows)
    tiles = [tile for i in range(0, step * rows, step) for tile in (originals[i], *(r[i] for r in regenerations.values()))]
    save_image(torch.nn.functional.interpolate(torch.stack(tiles), scale_factor=2, mode="nearest"), path,
               nrow=1 + len(regenerations), padding=2, pad_value=1.0)


if __name__ == "__main__":
    main()
