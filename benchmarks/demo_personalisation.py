"""Which personalisation levers make the demo generator draw the species its token names?

Each variant fine-tunes the shipped demo generator with ``configs/finetune/demo.yaml`` plus
the variant's options (``onlinemix finetune``), then is measured like
``demo_generator.py --finetuned``, on the same fresh renders and probe for every variant:
how often the probe CNN calls a Diff-Mix translation (personalised prompt, s = 0.5/0.7/0.9)
the target species, the pixel change outside the bird mask, and how often it recognises
the species in Diff-Gen samples. ``demo_generator.py`` measures the word prompts, the
reference for background change.

    python benchmarks/demo_personalisation.py                      # every variant
    python benchmarks/demo_personalisation.py --variants paper k4  # some

Writes ``benchmarks/results/demo_personalisation.json``, after every variant; a run of some
variants replaces their rows in an existing report of the same settings and keeps the
others. Fine-tuning seconds are only comparable when nothing else runs on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from demo_generator import (STRENGTHS, batches, personalised_prompts, predict, renders, train_probe,
                            translation_runs)
from report import RESULTS, machine, write_report

from onlinemix.data.demo_world import SPECIES, class_descriptions
from onlinemix.finetune import main as finetune
from onlinemix.generator.adapters import attach_personalisation
from onlinemix.generator.components import load_components
from onlinemix.generator.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "finetune", "demo.yaml")

# name: onlinemix finetune options on top of configs/finetune/demo.yaml
VARIANTS = {
    "paper": [],  # one vector, one learning rate (the demo recipe before this study)
    "k4-token-lr-1e-2": ["--vectors-per-token", "4", "--token-lr", "0.01"],
    "token-lr-1e-2": ["--token-lr", "0.01"],
    "k4": ["--vectors-per-token", "4"],
    "k4-token-lr-1e-2-described": ["--vectors-per-token", "4", "--token-lr", "0.01", "--class-descriptions",
                                   "{descriptions}"],
    "ti-only-token-lr-1e-2": ["--method", "ti", "--token-lr", "0.01"],
    "k8-token-lr-2e-2": ["--vectors-per-token", "8", "--token-lr", "0.02"],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "demo"))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "personalisation-levers"))
    p.add_argument("--references", type=int, default=8, help="SDEdit references and Diff-Gen samples per species")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "demo_personalisation.json"))
    args = p.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    descriptions = os.path.join(args.work, "class_descriptions.json")
    with open(descriptions, "w") as f:
        json.dump(class_descriptions(), f, indent=2)
    train_x, train_y, _, _ = renders(150, args.seed)
    probe = train_probe(train_x, train_y, epochs=15, seed=args.seed)
    refs, ref_y, masks, environments = renders(args.references, args.seed + 2)
    rng = np.random.default_rng(args.seed)
    targets = torch.tensor([int(rng.choice([c for c in range(len(SPECIES)) if c != y])) for y in ref_y.tolist()])
    settings = dict(config=os.path.relpath(CONFIG, ROOT), references=len(refs), diff_gen_samples=len(refs),
                    strengths=STRENGTHS, probe_train_per_species=150, seed=args.seed,
                    sampler="DPM-Solver++ (2M), 25 steps, CFG 7.5")
    runs = []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        if earlier["settings"] != json.loads(json.dumps(settings)):
            raise ValueError(f"{args.out} was measured with other settings; pass another --out.")
        runs = [r for r in earlier["runs"] if r["prompts"] not in args.variants]
    for name in args.variants:
        options = [o.format(descriptions=descriptions) for o in VARIANTS[name]]
        out = os.path.join(args.work, name)
        start = time.perf_counter()
        finetune(["--config", CONFIG, "--data-dir", args.data_dir, "--out", out, "--overwrite",
                  "--preview-steps", "0", *options])
        seconds = time.perf_counter() - start
        components = load_components("demo")
        info = attach_personalisation(components, out)
        sampler = Sampler(components, steps=25)
        prompts = personalised_prompts(info)
        measured, _ = translation_runs(sampler, refs, masks, ref_y, targets, [prompts[t] for t in targets.tolist()],
                                       probe, name)
        labels = torch.arange(len(SPECIES)).repeat_interleave(args.references)
        generated = torch.cat([sampler.generate([prompts[c] for c in labels[part].tolist()], seeds, height=64, width=64)
                               for part, seeds in batches(len(labels))])
        text_to_image = float((predict(probe, generated) == labels).float().mean())
        with open(os.path.join(out, "loss.csv")) as f:
            last = [float(line.split(",")[1]) for line in f.readlines()[-50:]]
        for run in measured:
            run.update(options=" ".join(VARIANTS[name]), finetune_seconds=round(seconds, 1),
                       text_to_image_probe_accuracy=text_to_image, final_loss_mean_50=float(np.mean(last)))
        print(name, f"{seconds:.0f} s", "target", [round(r["probe_says_target"], 3) for r in measured],
              "text-to-image", round(text_to_image, 3))
        runs += measured
        report = write_report("demo_personalisation", args.out, settings, runs, machine=machine())  # after each
    return report


if __name__ == "__main__":
    main()
