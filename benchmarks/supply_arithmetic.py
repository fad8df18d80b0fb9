"""On paper: how many generator GPUs keep one trainer GPU in fresh Diff-Mix samples, per recipe in configs/.

A trainer at R images/s asks for p·R synthetic images/s. If every request must be a fresh sample, the
generators must make p·R images/s. The supply study measures how many unique synthetic images a run
needs before the gain saturates, N*, as a multiple f of the training set (f = N* / samples per epoch).
A run of E epochs lasts E·n / R seconds for n training images, so N* = f·n fresh images over the run
is f·R / E images/s, whatever n is; each fresh image is then read p·E / f times. Generator GPUs per
trainer GPU = that rate / one generator GPU's images/s.

One generator GPU's images/s come from a FLOPs model of an SDEdit translation, anchored on
../shared/notes/anchors-2026.md: the U-Net runs ⌊s·steps⌋ steps at the strategy's mean strength s, each
0.84 TFLOPs at 512 px without guidance, twice that with classifier-free guidance; the VAE encodes the
reference (ENCODE_TFLOPS) and decodes the result (DECODE_TFLOPS); the GPU delivers UTILISATION of its
dense fp16 peak. At 25 steps and s = 0.7 on an H200 this gives 12.3 images/s, inside the anchors'
11-14; the fast set is the 25-step figure times the measured FAST_SET_SPEEDUP. Every assumption is a
flag, so the table can be re-run with measured GPU figures (``--gen-images-per-s``, ``--trainer-images-per-s``).

    python benchmarks/supply_arithmetic.py                                # f from benchmarks/results/supply_study.json
    python benchmarks/supply_arithmetic.py --fresh-per-training-image 2 --gen-images-per-s 25=9.8

Prints the table (markdown) and writes ``benchmarks/results/supply_arithmetic.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

UNET_TFLOPS = 0.84  # one SD 1.5 U-Net call at 512 px (the anchors' 1.68 per step with CFG, halved)
DECODE_TFLOPS = 2.5  # SD VAE decoder at 512 px [V]
ENCODE_TFLOPS = 1.1  # SD VAE encoder at 512 px [R]: about half the decoder's convolutions at the same sizes
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense fp16/bf16 tensor-core peaks [V]
UTILISATION = 0.4  # the middle of the anchors' 35-45 %
MEAN_STRENGTH = 0.7  # Diff-Mix draws s from {0.5, 0.7, 0.9}
FAST_SET_SPEEDUP = 2.3  # --gen-deep-cache 2 --gen-steps 20, measured on the demo; DeepCache's 2.3x on SD 1.5 [V]
# What one trainer GPU (an A100) consumes, images/s. ResNet-50 at 448 px is the anchors' 650 [D]; the
# others scale it by forward FLOPs: ResNet-50 4.1 GFLOPs at 224 px (x4 at 448), ViT-B/16 55.5 at 384 [V].
TRAINER_IMAGES_PER_S = {("resnet50", 448): 650.0, ("resnet50", 224): 650.0 * 4,
                        ("vit_base_patch16_384", 384): 650.0 * 4 * 4.1 / 55.5}
GENERATORS = {"25 steps, CFG 7.5": dict(steps=25, guided=True),
              "fast set (DeepCache 2, 20 steps)": dict(steps=25, guided=True, speedup=FAST_SET_SPEEDUP),
              "8-step accelerator, no CFG": dict(steps=8, guided=False),
              "4-step accelerator, no CFG": dict(steps=4, guided=False)}


def translation_tflops(steps: int, *, guided: bool, strength: float = MEAN_STRENGTH) -> float:
    """TFLOPs of one SDEdit translation at 512 px: ⌊strength·steps⌋ U-Net steps (two calls each with
    guidance), one VAE encode and one decode."""
    calls = max(1, math.floor(strength * steps)) * (2 if guided else 1)
    return calls * UNET_TFLOPS + ENCODE_TFLOPS + DECODE_TFLOPS


def generator_images_per_s(setting: dict, gpu: str) -> float:
    flops = translation_tflops(setting["steps"], guided=setting["guided"])
    return PEAK_TFLOPS[gpu] * UTILISATION / flops * setting.get("speedup", 1.0)


def recipes() -> list:
    """Each config in configs/ with a trainer throughput in TRAINER_IMAGES_PER_S: its name, model, size, p
    and epochs."""
    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        with open(path) as f:
            config = yaml.safe_load(f)
        model = str(config.get("model", "")).split(".")[0]
        if (model, config.get("img_size")) in TRAINER_IMAGES_PER_S and config.get("p"):
            rows.append(dict(config=os.path.basename(path), model=model, img_size=config["img_size"],
                             p=config["p"], epochs=config["epochs"]))
    return rows


def saturation(study_path: str) -> dict:
    """From the supply study: N*, the smallest offline set whose mean top-1 is within one standard error of
    the largest set's on the test *and* the counterfactual set (where Diff-Mix's gain lies), each set's own
    N*, and f = N* / samples per epoch."""
    with open(study_path) as f:
        study = json.load(f)
    offline = sorted((int(arm.split("-")[1]), s) for arm, s in study["summary"].items() if arm.startswith("offline-"))
    if not offline:
        raise SystemExit(f"{study_path} has no offline arm yet; run benchmarks/supply_study.py or pass "
                         "--fresh-per-training-image.")
    per_set = {}
    for key in ("test", "counterfactual"):
        best = offline[-1][1][key]
        per_set[key] = next(n for n, s in offline if s[key]["mean"] >= best["mean"] - best["se"])
    n_star = max(per_set.values())
    return {"n_star": n_star, "n_star_per_set": per_set, "samples_per_epoch": study["samples_per_epoch"],
            "fresh_per_training_image": n_star / study["samples_per_epoch"], "from": os.path.relpath(study_path, ROOT)}


def table(f: float, gpu: str, measured: dict, trainer_override: float | None) -> list:
    rows = []
    for recipe in recipes():
        rate = trainer_override or TRAINER_IMAGES_PER_S[recipe["model"], recipe["img_size"]]
        demand = recipe["p"] * rate
        at_n_star = min(demand, f * rate / recipe["epochs"])
        row = dict(recipe, trainer_images_per_s=round(rate, 1), synthetic_demand_per_s=round(demand, 1),
                   fresh_at_n_star_per_s=round(at_n_star, 2),
                   reads_per_fresh_image_at_n_star=round(demand / at_n_star, 1), generator_gpus={})
        for name, setting in GENERATORS.items():
            speed = measured.get(setting["steps"] if "speedup" not in setting else "fast") or \
                generator_images_per_s(setting, gpu)
            row["generator_gpus"][name] = {"images_per_s": round(speed, 1), "all_fresh": round(demand / speed, 2),
                                           "at_n_star": round(at_n_star / speed, 3)}
        rows.append(row)
    return rows


def markdown(rows: list, gpu: str) -> str:
    """Two tables: each generator setting's images/s, and per recipe the generator GPUs per trainer GPU."""
    names = list(GENERATORS)
    speeds = rows[0]["generator_gpus"]
    lines = [f"| generator setting | images/s per {gpu} |", "|---|---|"]
    lines += [f"| {n} | {speeds[n]['images_per_s']} |" for n in names]
    lines += ["", "| recipe | p | epochs | trainer img/s | synthetic img/s | fresh img/s at N* | "
              + " | ".join(f"{gpu}s, {n}: all fresh / at N*" for n in names) + " |",
              "|" + "---|" * (6 + len(names))]
    for r in rows:
        cells = [r["config"], r["p"], r["epochs"], r["trainer_images_per_s"], r["synthetic_demand_per_s"],
                 r["fresh_at_n_star_per_s"]]
        cells += [f"{r['generator_gpus'][n]['all_fresh']} / {r['generator_gpus'][n]['at_n_star']}" for n in names]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=os.path.join(RESULTS, "supply_study.json"),
                   help="the supply study's JSON, for N* (unless --fresh-per-training-image)")
    p.add_argument("--fresh-per-training-image", type=float, help="f = N* / training images, instead of the study's")
    p.add_argument("--gpu", choices=tuple(PEAK_TFLOPS), default="H200", help="the generator GPU of the FLOPs model")
    p.add_argument("--gen-images-per-s", nargs="+", default=[], metavar="STEPS=RATE",
                   help="measured generator images/s replacing the model's: 25=, 8=, 4= or fast=")
    p.add_argument("--trainer-images-per-s", type=float, help="one measured trainer throughput for every recipe")
    p.add_argument("--out", default=os.path.join(RESULTS, "supply_arithmetic.json"))
    args = p.parse_args(argv)
    measured = {}
    for item in args.gen_images_per_s:
        key, _, value = item.partition("=")
        if key not in ("25", "8", "4", "fast") or not value:
            p.error(f"--gen-images-per-s takes STEPS=RATE with STEPS 25, 8, 4 or fast, got {item!r}.")
        measured[int(key) if key != "fast" else "fast"] = float(value)
    if args.fresh_per_training_image is not None:
        source = {"fresh_per_training_image": args.fresh_per_training_image, "from": "--fresh-per-training-image"}
    else:
        source = saturation(args.study)
    rows = table(source["fresh_per_training_image"], args.gpu, measured, args.trainer_images_per_s)
    report = {"benchmark": "supply_arithmetic", "saturation": source, "gpu": args.gpu, "measured_overrides": measured,
              "assumptions": dict(unet_tflops=UNET_TFLOPS, encode_tflops=ENCODE_TFLOPS, decode_tflops=DECODE_TFLOPS,
                                  peak_tflops=PEAK_TFLOPS[args.gpu], utilisation=UTILISATION,
                                  mean_strength=MEAN_STRENGTH, fast_set_speedup=FAST_SET_SPEEDUP,
                                  trainer_images_per_s={f"{m} {s}px": r for (m, s), r in TRAINER_IMAGES_PER_S.items()}),
              "recipes": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(markdown(rows, args.gpu))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
