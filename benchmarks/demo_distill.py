"""Does the distilled student translate like its teacher? Measured on the demo world.

Fresh demo renders (``--references`` per species) are translated toward another species with
the personalised demo generator at s = 0.5 / 0.7 / 0.9:

- the teacher: 25 DPM-Solver++ steps at CFG 7.5 (the default generator);
- the undistilled model at ``--steps`` LCM steps, with guidance 1 and 7.5;
- each acceleration LoRA of ``--accelerators`` (``onlinemix distill`` outputs) at ``--steps`` LCM
  steps, guidance 1 (one U-Net call per step).

Every few-step sampler runs all its steps inside each strength (``--gen-scheduler lcm-strength``), so
a strength noises to what its label says.

Per strength: the mean squared pixel distance to the teacher's translation of the same
reference and seed, and how often the demo probe (``demo_generator.py``) calls a translation its
target or its source species.

    python benchmarks/demo_distill.py --accelerators runs/demo-distill

Writes ``benchmarks/results/demo_distill.json``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from demo_generator import STRENGTHS, batches, personalised_prompts, predict, renders, train_probe
from report import RESULTS, machine, write_report

from onlinemix.generator.adapters import accelerator_schedule, attach_accelerator, attach_personalisation
from onlinemix.generator.components import load_components, sampling_scheduler
from onlinemix.generator.sampler import Sampler


def sampler(finetuned: str, *, scheduler: str, steps: int, guidance: float, accelerator: str | None = None):
    components = load_components("demo")
    info = attach_personalisation(components, finetuned)
    if accelerator:
        attach_accelerator(components, accelerator)
    components.unet.fuse_lora()
    components.unet.unload_lora()
    config = {**components.scheduler.config, **(accelerator_schedule(accelerator) if accelerator else {})}
    components.scheduler = sampling_scheduler(scheduler, config)  # a student samples on its own grid
    return (Sampler(components, steps=steps, guidance=guidance, schedule_in_strength=scheduler == "lcm-strength"),
            personalised_prompts(info))


@torch.no_grad()
def translations(sampler_, refs, prompts) -> dict:
    return {s: torch.cat([sampler_.translate(refs[part], prompts[part], [s] * len(seeds), seeds)
                          for part, seeds in batches(len(refs))]) for s in STRENGTHS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", default="runs/demo-ti-db", help="the personalised demo generator (teacher)")
    parser.add_argument("--accelerators", nargs="*", default=[], help="onlinemix distill outputs to compare")
    parser.add_argument("--steps", type=int, nargs="+", default=[4], help="LCM steps of the few-step samplers")
    parser.add_argument("--references", type=int, default=8, help="references per species")
    parser.add_argument("--probe-train", type=int, default=150, help="probe training renders per species")
    parser.add_argument("--out", default=os.path.join(RESULTS, "demo_distill.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    probe_x, probe_y, _, _ = renders(args.probe_train, 0)
    probe = train_probe(probe_x, probe_y, epochs=15, seed=0)
    refs, sources, _, _ = renders(args.references, 2)
    rng = np.random.default_rng(0)
    classes = int(probe_y.max()) + 1
    targets = torch.tensor([int(rng.choice([c for c in range(classes) if c != y])) for y in sources.tolist()])
    teacher, prompts = sampler(args.finetuned, scheduler="dpm-solver++", steps=25, guidance=7.5)
    prompts = [prompts[t] for t in targets.tolist()]
    reference = translations(teacher, refs, prompts)
    arms = [("teacher", None, 25, 7.5)]
    for steps in args.steps:
        arms += [("undistilled", None, steps, 1.0), ("undistilled", None, steps, 7.5)]
        arms += [("distilled", folder, steps, 1.0) for folder in args.accelerators]
    runs = []
    for kind, folder, steps, guidance in arms:
        out = reference if kind == "teacher" else translations(
            sampler(args.finetuned, scheduler="lcm-strength", steps=steps, guidance=guidance, accelerator=folder)[0],
            refs, prompts)
        for s in STRENGTHS:
            called = predict(probe, out[s])
            runs.append(dict(sampler=kind, accelerator=folder, steps=steps, guidance=guidance, strength=s,
                             mse_to_teacher=float((out[s] - reference[s]).pow(2).mean()),
                             probe_says_target=float((called == targets).float().mean()),
                             probe_says_source=float((called == sources).float().mean())))
            print({k: v for k, v in runs[-1].items() if k != "accelerator"}, folder or "", flush=True)
    return write_report("demo_distill", args.out, vars(args), runs, machine=machine(),
                        references=len(refs), seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
